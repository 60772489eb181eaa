"""Fixtures shared by several test files."""

import os

# Triton's kernels run under its interpreter on CPU tensors (tests/test_triton_attention.py). It must
# be on before anything imports triton (transformers may, through torch), so it is set here, first;
# SMARTKV_TEST_DEVICE=cuda (scripts/gpu_check.sh) runs them compiled instead.
if os.environ.get("SMARTKV_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from smartkv import kernels  # noqa: E402

# `make test` runs the suite on two xdist workers, whole files per worker (`--dist loadfile`, so a
# module's fixtures, a loaded model or the pipeline's reproduced study, are built once). Each worker
# then gets one torch thread: two workers of two threads would oversubscribe two cores, and tiny-model
# tests are bound by Python overhead, not by threads. Tests about threads set their own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch  # noqa: E402

    torch.set_num_threads(1)

# The pipeline's checks on its tiny study run first, so that the other worker works through everything
# else while that study is built (the longest single piece of the suite on 2 cores); the two files of
# checks on clones of the same study run last, the longer first, one on each worker as it comes free
# (each takes minutes: one after the other they were the suite's tail). tests/pipeline_support.py
# builds the study once per run for all three. `make test` passes --no-loadscope-reorder: by default
# xdist hands out the files with the most tests first.
FIRST, LAST = ("test_pipeline.py",), ("test_pipeline_sweeps.py", "test_pipeline_clone.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return -1 if name in FIRST else 1 + LAST.index(name) if name in LAST else 0

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="module")
def kernel():
    if kernels.disabled():
        pytest.skip("SMARTKV_NO_KERNEL=1 is set: the PyTorch path is in use on purpose")
    assert kernels.kernel_available()  # a failed build raises KernelBuildError: the test errors
    return kernels


@pytest.fixture(scope="session")
def origin(tmp_path_factory, worker_id):
    """The tiny study both pipeline test files check, built once per run (tests/pipeline_support.py)."""
    from pipeline_support import shared_origin

    return shared_origin(tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def tiny_llama():
    """A small random Llama (4 query / 2 KV heads of 32 dims) with SmartKV's attention function: the model the
    premise and memory-breakdown tests plant attention in and count bytes on; one per test module."""
    import torch

    from smartkv.attention import use_smartkv_attention
    from smartkv.models import tiny_model

    torch.set_num_threads(1)
    m = tiny_model("llama", seed=0, hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4,
                   num_key_value_heads=2)
    use_smartkv_attention(m)
    return m
