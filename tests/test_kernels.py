"""The fused de-quantization kernel equals the PyTorch path bit for bit; the fallback always works.

The first run builds the C++ extension (about a minute on two cores) into
`$SMARTKV_HOME/torch_extensions`; later runs load it from there.
"""

import logging

import pytest
import torch

from smartkv import kernels
from smartkv.quantize import QuantizedRows, quantize_rows

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def kernel():
    if not kernels.kernel_available():
        pytest.skip(f"fused kernel unavailable: {kernels.fallback_reason()}")
    return kernels


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
            got = kernels.dequantize_into(rows, out.clone(), index)
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
    kernels.dequantize_into(rows, out, index)
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
    kernels.dequantize_into(rows, out, torch.zeros(0, dtype=torch.int32))
    kernels.dequantize_into(rows, out)
    assert torch.equal(out, torch.ones(4, 64))


def test_kernel_rejects_bad_index(kernel):
    rows = make_rows(3, False, 64, 32, n=4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.dequantize_into(rows, torch.zeros(4, 64), torch.tensor([0, 1, 2, 4], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.dequantize_into(rows, torch.zeros(4, 64), torch.tensor([0, -1, 2, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError):
        kernels.dequantize_into(rows, torch.zeros(3, 64))  # fewer rows than quantized rows


def test_shape_checks():
    rows = make_rows(3, False, 64, 32, n=4)
    with pytest.raises(ValueError):
        kernels.dequantize_into(rows, torch.zeros(4, 63))
    with pytest.raises(ValueError):
        kernels.dequantize_into(rows, torch.zeros(4, 64), torch.arange(3, dtype=torch.int32))


# --- fallback: runs whether or not a compiler is present ------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fallback_matches_reference(monkeypatch, bits, symmetric):
    monkeypatch.setattr(kernels, "_load", lambda: None)
    check_all(make_rows(bits, symmetric, 50, 16))


def test_fallback_when_env_var_set(monkeypatch):
    monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    assert not kernels.kernel_available()
    assert "SMARTKV_NO_KERNEL" in kernels.fallback_reason()
    rows = make_rows(5, False, 64, 32)
    check_all(rows)
    out = torch.zeros(40, 64)
    index = torch.randperm(40)[: rows.n_rows].to(torch.int32)
    assert torch.equal(rows.dequantize_into(out, index), reference(rows, torch.zeros(40, 64), index))


def test_fallback_when_build_fails_logs_once(monkeypatch, caplog):
    def broken_build():
        raise RuntimeError("Error building extension 'smartkv_dequant'\nno compiler")

    monkeypatch.delenv("SMARTKV_NO_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "_build", broken_build)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_logged", False)
    monkeypatch.setattr(kernels, "_reason", None)
    with caplog.at_level(logging.INFO, logger="smartkv.kernels"):
        assert not kernels.kernel_available()
        assert not kernels.kernel_available()
        check_all(make_rows(3, False, 50, 16))
    messages = [r.getMessage() for r in caplog.records if r.name == "smartkv.kernels"]
    assert len(messages) == 1 and "no compiler" in messages[0]
    assert "no compiler" in kernels.fallback_reason()


def test_fallback_for_unsupported_out_dtype():
    rows = make_rows(3, False, 64, 32)
    out = torch.zeros(40, 64, dtype=torch.float64)
    index = torch.randperm(40)[: rows.n_rows].to(torch.int32)
    assert torch.equal(kernels.dequantize_into(rows, out, index), reference(rows, torch.zeros(40, 64, dtype=torch.float64), index))
