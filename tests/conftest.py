"""Fixtures shared by several test files."""

import os

# Triton's kernels run under its interpreter on CPU tensors (tests/test_triton_attention.py). It must
# be on before anything imports triton (transformers may, through torch), so it is set here, first;
# SMARTKV_TEST_DEVICE=cuda (scripts/gpu_check.sh) runs them compiled instead.
if os.environ.get("SMARTKV_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from smartkv import kernels  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    if kernels.disabled():
        pytest.skip("SMARTKV_NO_KERNEL=1 is set: the PyTorch path is in use on purpose")
    assert kernels.kernel_available()  # a failed build raises KernelBuildError: the test errors
    return kernels
