"""The one quantizer: round-trip bounds, real packed sizes, SQNR floors, edge cases."""

import pytest
import torch

from smartkv.quantize import packed_row_bytes, plane_widths, quantize, quantize_rows, row_nbytes

BITS = (2, 3, 4, 8)
# Signal-to-quantization-noise floors (dB) for Gaussian data, groups of 32, asymmetric.
# Each extra bit is worth ~6 dB; the floors sit a few dB under what the quantizer reaches.
SQNR_FLOOR = {2: 8.0, 3: 14.0, 4: 20.0, 8: 43.0}


def sqnr_db(x, y):
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def step_of(q, length):
    return q.scale.float().repeat_interleave(q.group_size, dim=1)[:, :length]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", [64, 50, 7, 128])
def test_round_trip_within_half_a_step(bits, length):
    torch.manual_seed(bits * 100 + length)
    x = torch.randn(200, length) * 3 + 1
    q = quantize_rows(x, bits, 32)
    err = (q.dequantize() - x).abs()
    assert bool((err <= step_of(q, length) / 2 + 1e-6).all())


@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes_match_formula(bits):
    x = torch.randn(33, 64)
    q = quantize_rows(x, bits, 32)
    assert sum(p.dtype == torch.uint8 for p in q.planes) == len(q.planes)
    assert sum(p.nbytes for p in q.planes) == 33 * 64 * bits // 8  # no padding bits: 3-bit costs 3 bits
    assert q.nbytes == 33 * row_nbytes(64, bits, 32)
    # 2 groups x (fp16 scale + fp16 zero) = 8 bytes of metadata per row
    assert row_nbytes(64, bits, 32) == 64 * bits // 8 + 8


def test_three_bit_is_two_planes():
    assert plane_widths(3) == (2, 1)
    assert packed_row_bytes(64, 3) == 24


@pytest.mark.parametrize("bits", BITS)
def test_sqnr_floor(bits):
    torch.manual_seed(0)
    x = torch.randn(4096, 64)
    assert sqnr_db(x, quantize_rows(x, bits, 32).dequantize()) > SQNR_FLOOR[bits]


def test_more_bits_less_error():
    torch.manual_seed(1)
    x = torch.randn(512, 64)
    errs = [sqnr_db(x, quantize_rows(x, b, 32).dequantize()) for b in BITS]
    assert errs == sorted(errs)


@pytest.mark.parametrize("value", [0.0, 5.5, -3.25])
@pytest.mark.parametrize("bits", BITS)
def test_constant_and_zero_groups_are_exact(value, bits):
    x = torch.full((4, 64), value)
    assert torch.equal(quantize_rows(x, bits, 32).dequantize(), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_dtypes(dtype):
    torch.manual_seed(2)
    x = (torch.randn(64, 64) * 2).to(dtype)
    q = quantize_rows(x, 4, 32)
    out = q.dequantize(dtype)
    assert out.dtype == dtype
    tol = step_of(q, 64) / 2 + (2**-7 if dtype != torch.float32 else 1e-6) * x.float().abs()
    assert bool(((out.float() - x.float()).abs() <= tol + 1e-3).all())


def test_symmetric_round_trip():
    torch.manual_seed(3)
    x = torch.randn(100, 64)
    q = quantize_rows(x, 4, 32, symmetric=True)
    assert q.zero is None
    assert bool(((q.dequantize() - x).abs() <= step_of(q, 64) / 2 + 1e-6).all())
    assert q.nbytes == 100 * row_nbytes(64, 4, 32, symmetric=True)


def test_either_axis():
    torch.manual_seed(4)
    kv = torch.randn(2, 3, 96, 64)
    per_token = quantize(kv, 2, 32, axis=-1)
    per_channel = quantize(kv, 2, 32, axis=-2)
    for q in (per_token, per_channel):
        out = q.dequantize()
        assert out.shape == kv.shape
        assert sqnr_db(kv, out) > SQNR_FLOOR[2]
    # per-channel groups run over tokens: one scale per (B, H, D) channel and 32-token group
    assert per_channel.rows.scale.shape == (2 * 3 * 64, 3)
    assert per_token.rows.scale.shape == (2 * 3 * 96, 2)


def test_cat_rows_and_length():
    torch.manual_seed(5)
    a, b = torch.randn(10, 64), torch.randn(6, 64)
    qa, qb = quantize_rows(a, 3, 32), quantize_rows(b, 3, 32)
    assert torch.equal(qa.cat_rows(qb).dequantize(), torch.cat([qa.dequantize(), qb.dequantize()]))
    c = torch.randn(10, 32)
    qc = quantize_rows(c, 3, 32)
    assert torch.equal(qa.cat_length(qc).dequantize(), torch.cat([qa.dequantize(), qc.dequantize()], dim=1))
    with pytest.raises(ValueError, match="another bit width"):
        qa.cat_rows(quantize_rows(b, 2, 32))


@pytest.mark.parametrize("bad", [0, 9, 16])
def test_bad_bits_named(bad):
    with pytest.raises(ValueError, match=f"bit width {bad}"):
        quantize_rows(torch.randn(2, 8), bad, 8)
