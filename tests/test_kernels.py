"""The fused de-quantization kernel equals the PyTorch path bit for bit; a failed build is an error.

The first run builds the C++ extension (about a minute on two cores) into
`$SMARTKV_HOME/torch_extensions`; later runs load it from there. A build failure fails the
kernel tests (the fixture raises KernelBuildError); they skip only when SMARTKV_NO_KERNEL=1
is set on purpose, and the PyTorch-path tests below run either way.
"""

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smartkv import kernels
from smartkv.quantize import QuantizedRows, quantize_rows

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_rows(bits, symmetric, length, group_size, n=37, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + bits * 100 + length * 3 + group_size + int(symmetric))
    x = torch.randn(n, length, generator=gen) * 3 + 1
    if n > 5:
        x[3] = 2.5  # a constant row: scale falls back to 1
        x[5] *= 1000  # large magnitudes
    if symmetric and bits == 1:
        # quantize_rows refuses symmetric 1-bit, but the layout allows it (offset 0): build it by hand.
        q = quantize_rows(x, 1, group_size)
        return QuantizedRows(q.planes, q.scale, None, 1, length, group_size)
    return quantize_rows(x, bits, group_size, symmetric=symmetric)


def reference(rows, out, index):
    out = out.clone()
    deq = rows.dequantize(torch.float32).to(out.dtype)
    if index is None:
        out[: rows.n_rows] = deq
    else:
        out.index_copy_(0, index.long(), deq)
    return out


def index_cases(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m, generator=gen)[:n]
    return {"none": None, "int32": perm.to(torch.int32), "int64": perm.to(torch.int64)}


def check_all(rows, seed=0):
    n = rows.n_rows
    m = n + 11
    for name, index in index_cases(n, m, seed).items():
        for dtype in OUT_DTYPES:
            out = torch.randn(m, rows.length).to(dtype)
            want = reference(rows, out, index)
            got = rows.dequantize_into(out.clone(), index)
            assert got.dtype == dtype
            assert torch.equal(got, want), (name, dtype, (got.float() - want.float()).abs().max())


@pytest.mark.parametrize("group_size", [32, 16, 64])
@pytest.mark.parametrize("length", [64, 50, 7])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_kernel_matches_reference(kernel, bits, symmetric, length, group_size):
    check_all(make_rows(bits, symmetric, length, group_size))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_kernel_ragged_odd_groups_and_long_rows(kernel, bits):
    for length, group_size in [(129, 17), (1000, 128), (3, 1), (33, 5)]:
        check_all(make_rows(bits, False, length, group_size, n=9), seed=length)
        check_all(make_rows(bits, True, length, group_size, n=9), seed=length)


def test_kernel_many_rows_run_in_parallel(kernel):
    rows = make_rows(3, False, 64, 32, n=5000)
    check_all(rows)


def test_kernel_low_precision_rounding_edges(kernel):
    # fp16 subnormals and overflow to inf, exact ties for bf16/fp16 rounding, negative values.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 64, generator=gen)
    x[:16] *= 1e-6
    x[16:32] *= 7e4
    x[32:48] = x[32:48] * 1e4 - 6e4
    for bits in (2, 3, 8):
        for symmetric in (False, True):
            check_all(quantize_rows(x, bits, 16, symmetric=symmetric), seed=bits)


def test_kernel_rows_from_select_and_cat_length(kernel):
    rows = make_rows(4, False, 64, 32, n=40)
    check_all(rows.select(torch.arange(40) % 3 == 0))
    check_all(rows.cat_length(make_rows(4, False, 32, 32, n=40, seed=1)))


def test_kernel_strided_out_rows(kernel):
    rows = make_rows(3, False, 50, 16)
    big = torch.randn(60, 57)
    out = big[:, :50]  # rows 57 apart, contiguous within a row
    index = torch.randperm(60)[: rows.n_rows].to(torch.int32)
    want = reference(rows, out, index)
    rows.dequantize_into(out, index)
    assert torch.equal(out, want)
    assert torch.equal(big[:, 50:], big.clone()[:, 50:])


def test_kernel_method_on_quantized_rows(kernel):
    rows = make_rows(3, False, 64, 32)
    out = torch.zeros(50, 64, dtype=torch.bfloat16)
    index = torch.randperm(50)[: rows.n_rows].to(torch.int32)
    assert rows.dequantize_into(out, index) is out
    assert torch.equal(out, reference(rows, torch.zeros(50, 64, dtype=torch.bfloat16), index))


def test_kernel_empty_rows(kernel):
    rows = make_rows(3, False, 64, 32).select(torch.zeros(37, dtype=torch.bool))
    out = torch.ones(4, 64)
    rows.dequantize_into(out, torch.zeros(0, dtype=torch.int32))
    rows.dequantize_into(out)
    assert torch.equal(out, torch.ones(4, 64))


def test_kernel_rejects_bad_index(kernel):
    rows = make_rows(3, False, 64, 32, n=4)
    with pytest.raises(RuntimeError, match="out of range"):
        rows.dequantize_into(torch.zeros(4, 64), torch.tensor([0, 1, 2, 4], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        rows.dequantize_into(torch.zeros(4, 64), torch.tensor([0, -1, 2, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError):
        rows.dequantize_into(torch.zeros(3, 64))  # fewer rows than quantized rows


def test_shape_checks():
    rows = make_rows(3, False, 64, 32, n=4)
    with pytest.raises(ValueError):
        rows.dequantize_into(torch.zeros(4, 63))
    with pytest.raises(ValueError):
        rows.dequantize_into(torch.zeros(4, 64), torch.arange(3, dtype=torch.int32))


# --- PyTorch path: runs whether or not a compiler is present ---------------------------------


def reset_loader(monkeypatch, build):
    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(kernels, "_logged", False)


def broken_build():
    raise RuntimeError("Error building extension 'smartkv_cpu'\nno compiler")


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pytorch_path_matches_reference(monkeypatch, bits, symmetric):
    monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    check_all(make_rows(bits, symmetric, 50, 16))


def test_env_var_selects_pytorch_path_and_logs_once(monkeypatch, caplog):
    reset_loader(monkeypatch, broken_build)  # would raise if anything tried to build
    monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    with caplog.at_level(logging.INFO, logger="smartkv.kernels"):
        assert not kernels.kernel_available()
        assert not kernels.warm_up()
        rows = make_rows(5, False, 64, 32)
        check_all(rows)
    assert "SMARTKV_NO_KERNEL" in kernels.fallback_reason()
    messages = [r.getMessage() for r in caplog.records if r.name == "smartkv.kernels"]
    assert len(messages) == 1 and "SMARTKV_NO_KERNEL" in messages[0]
    out = torch.zeros(40, 64)
    index = torch.randperm(40)[: rows.n_rows].to(torch.int32)
    assert torch.equal(rows.dequantize_into(out, index), reference(rows, torch.zeros(40, 64), index))


def test_failed_build_raises_a_clear_error(monkeypatch):
    calls = []

    def counting_broken_build():
        calls.append(1)
        broken_build()

    rows = make_rows(3, False, 50, 16)  # (quantizing builds the kernel too: rows made before the break)
    reset_loader(monkeypatch, counting_broken_build)
    monkeypatch.delenv("SMARTKV_NO_KERNEL", raising=False)
    for _ in range(2):
        with pytest.raises(kernels.KernelBuildError, match="no compiler.*SMARTKV_NO_KERNEL=1"):
            rows.dequantize_into(torch.zeros(40, 50))
    with pytest.raises(kernels.KernelBuildError, match="no compiler"):
        quantize_rows(torch.randn(4, 32), 3, 16)
    with pytest.raises(kernels.KernelBuildError):
        kernels.kernel_available()
    assert len(calls) == 1  # the failure is remembered, not rebuilt on every call
    assert kernels.fallback_reason() is None


def test_tensors_the_kernel_cannot_take_never_build_it(monkeypatch):
    # float64 stands in for any tensor the kernel does not take (CUDA tensors included): the
    # device and dtype are checked before anything is built.
    rows = make_rows(3, False, 64, 32)  # (quantizing float32 CPU rows builds the kernel: made before the break)
    reset_loader(monkeypatch, broken_build)
    monkeypatch.delenv("SMARTKV_NO_KERNEL", raising=False)
    out = torch.zeros(40, 64, dtype=torch.float64)
    index = torch.randperm(40)[: rows.n_rows].to(torch.int32)
    want = reference(rows, torch.zeros(40, 64, dtype=torch.float64), index)
    assert torch.equal(rows.dequantize_into(out, index), want)
    assert kernels._error is None and kernels._module is None


def test_kernel_module_imports_nothing_from_smartkv():
    code = (
        "import sys, smartkv.kernels; "
        "bad = sorted(m for m in sys.modules if m.startswith('smartkv.') and m != 'smartkv.kernels'); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_sources_ship_as_package_data():
    for name in kernels.SOURCES:
        assert (kernels.SOURCE_DIR / name).is_file(), name
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"csrc/*.cpp"' in pyproject and '"csrc/*.h"' in pyproject
    assert re.search(r'^\s*"ninja', pyproject.split("[project.optional-dependencies]")[0], re.M)


def test_build_folder_follows_source_content_not_checkout_path(tmp_path, monkeypatch):
    # Two checkouts at different paths with the same sources share one build (no rebuild per
    # clone or experiment workspace); any changed byte under csrc/ gets its own folder.
    monkeypatch.setenv("SMARTKV_HOME", str(tmp_path / "home"))
    copies = []
    for name in ("a", "b"):
        folder = tmp_path / name / "csrc"
        shutil.copytree(kernels.SOURCE_DIR, folder)
        monkeypatch.setattr(kernels, "SOURCE_DIR", folder)
        copies.append(kernels.build_directory())
    assert copies[0] == copies[1]
    header = tmp_path / "b" / "csrc" / "half.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert kernels.build_directory() != copies[0]


def test_staged_sources_are_a_complete_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTKV_HOME", str(tmp_path / "home"))
    directory = kernels.build_directory()
    directory.mkdir(parents=True)
    staged = kernels._stage_sources(directory)
    names = sorted(p.name for p in kernels.SOURCE_DIR.iterdir() if p.is_file())
    assert sorted(p.name for p in staged.iterdir()) == names
    assert all((staged / n).read_bytes() == (kernels.SOURCE_DIR / n).read_bytes() for n in names)
    assert kernels._stage_sources(directory) == staged  # a second call reuses it
    assert [p.name for p in directory.iterdir()] == ["src"]  # no temporary folder left behind


def _pytorch_quantize(monkeypatch, x, bits, group_size, symmetric):
    with monkeypatch.context() as m:
        m.setenv(kernels.DISABLE_ENV, "1")
        return quantize_rows(x, bits, group_size, symmetric=symmetric)


# every valid (bits, symmetric) pair: symmetric 1-bit rows are refused (the test below)
WIDTHS = [(b, sym) for b in (1, 2, 3, 4, 5, 8) for sym in (False, True) if not (sym and b == 1)]


@pytest.mark.parametrize("bits,symmetric", WIDTHS)
@pytest.mark.parametrize("length,group_size", [(64, 64), (384, 64), (96, 32), (37, 16), (20, 64), (5, 2)])
def test_quantize_kernel_equals_pytorch_path_bit_for_bit(kernel, monkeypatch, bits, symmetric, length, group_size):
    gen = torch.Generator().manual_seed(bits * 100 + length + group_size + int(symmetric))
    x = torch.randn(53, length, generator=gen) * 3 + 1
    x[3] = 2.5  # a constant row: scale falls back to 1
    x[5] *= 1000  # large magnitudes
    x[7] *= 1e5  # beyond FP16's range: scale and zero-point clamp
    x[9] *= 1e-6  # subnormal FP16 metadata
    x[11] = 0.0
    x[13] = torch.round(x[13] * 2) / 2  # ties for round-half-to-even
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xi = x.to(dtype) if dtype != torch.float16 else x.clamp(-6e4, 6e4).to(dtype)
        got = quantize_rows(xi, bits, group_size, symmetric=symmetric)
        want = _pytorch_quantize(monkeypatch, xi, bits, group_size, symmetric)
        assert len(got.planes) == len(want.planes)
        for a, b in zip(got.planes, want.planes):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert got.scale.dtype == torch.float16 and torch.equal(got.scale, want.scale)
        assert (got.zero is None) == (want.zero is None)
        if want.zero is not None:
            assert torch.equal(got.zero, want.zero)


def test_quantize_kernel_takes_views_and_empty_input(kernel, monkeypatch):
    x = torch.randn(40, 200)[::2, 8:136]  # a strided view
    got, want = quantize_rows(x, 3, 32), _pytorch_quantize(monkeypatch, x, 3, 32, False)
    assert all(torch.equal(a, b) for a, b in zip(got.planes, want.planes)) and torch.equal(got.scale, want.scale)
    empty = quantize_rows(torch.empty(0, 64), 4, 32)
    assert empty.n_rows == 0 and empty.planes[0].shape == (0, 32) and empty.scale.shape == (0, 2)


def test_symmetric_one_bit_rows_are_refused():
    """One bit has no symmetric grid (0 levels either side of zero): the pair the parametrizations leave out."""
    with pytest.raises(ValueError, match="symmetric quantization needs at least 2 bits"):
        quantize_rows(torch.randn(4, 64), 1, 32, symmetric=True)


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_fresh_one_kept(tmp_path):
    """torch's baton file outlives a build killed mid-way, and every later process would wait on it
    forever; one older than any build is removed, one that may belong to a live build is not."""
    import os
    import time

    from smartkv.kernels import STALE_LOCK_S, clear_stale_lock

    assert not clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()  # a live build's
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()
