"""Scale/zero-point formats (smartkv/scale_format.py): FP16, BF16 and 8-bit double quantization.

Each format must bring every value back within half of its own group's step (the step as
stored, not the FP16 one it approximates), count every byte it holds, and the SmartKV cache
must spend what cheaper metadata saves on more bits under the same budget.
"""

import pytest
import torch

from smartkv.attention import use_smartkv_attention
from smartkv.methods import build_cache
from smartkv.methods.registry import ConfigError
from smartkv.models import tiny_model
from smartkv.quantize import quantize_rows, row_nbytes
from smartkv.scale_format import SCALE_FORMATS

FORMATS = list(SCALE_FORMATS)


def kv_like_rows(n=300, length=256, seed=0):
    """Rows whose first half has a wide, offset range (keys) and second half a narrow one (values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=g)
    x[:, : length // 2] = x[:, : length // 2] * 6 + 4
    x[:, length // 2 :] *= 0.3
    return x


def steps(q, length):
    return q.scale_values().float().repeat_interleave(q.group_size, dim=1)[:, :length]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group,length", [(32, 256), (64, 256), (32, 200)])
def test_within_half_of_the_stored_step(fmt, bits, group, length):
    x = kv_like_rows(length=length, seed=bits + group)
    q = quantize_rows(x, bits, group, scale_format=fmt)
    assert q.scale_format == fmt
    err = (q.dequantize() - x).abs()
    assert bool((err <= steps(q, length) / 2 * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_symmetric_within_half_a_step(fmt, bits):
    x = kv_like_rows(seed=bits)
    q = quantize_rows(x, bits, 32, symmetric=True, scale_format=fmt)
    assert q.zero is None
    assert bool(((q.dequantize() - x).abs() <= steps(q, 256) / 2 * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_byte_counted(fmt, symmetric):
    x = kv_like_rows(n=37, length=384)
    q = quantize_rows(x, 3, 64, symmetric=symmetric, scale_format=fmt)
    held = sum(p.nbytes for p in q.planes) + q.scale.nbytes + (0 if q.zero is None else q.zero.nbytes)
    held += 0 if q.shared is None else q.shared.nbytes
    assert q.nbytes == held == 37 * row_nbytes(384, 3, 64, symmetric, fmt)
    assert q.metadata_nbytes == held - sum(p.nbytes for p in q.planes)


def test_byte_formula_per_format():
    codes = 384 * 2 // 8  # 384 values at 2 bits
    # 6 groups of 64: FP16/BF16 2 bytes per scale and per zero-point
    assert row_nbytes(384, 2, 64, False, "fp16") == row_nbytes(384, 2, 64, False, "bf16") == codes + 6 * 4
    # int8: 1 byte per scale and per zero-point, plus FP16 top, zero offset and zero step per row
    assert row_nbytes(384, 2, 64, False, "int8") == codes + 6 * 2 + 3 * 2
    assert row_nbytes(384, 2, 32, True, "int8") == codes + 12 + 2
    # two groups: the shared constants cost more than 8-bit codes save
    assert row_nbytes(128, 2, 64, False, "int8") > row_nbytes(128, 2, 64, False, "fp16")


def test_int8_codes_and_dtypes():
    q = quantize_rows(kv_like_rows(), 2, 32, scale_format="int8")
    assert q.scale.dtype == q.zero.dtype == torch.uint8 and q.shared.dtype == torch.float16
    assert q.shared.shape == (300, 3)
    b = quantize_rows(kv_like_rows(), 2, 32, scale_format="bf16")
    assert b.scale.dtype == b.zero.dtype == torch.bfloat16 and b.shared is None


def test_int8_costs_little_error():
    """The log-grid scale (4.4 % steps) and the zero-point's gap loosen the step a little, not more."""
    x = kv_like_rows(n=2000)
    mse = {f: float((quantize_rows(x, 2, 32, scale_format=f).dequantize() - x).pow(2).mean()) for f in FORMATS}
    assert mse["fp16"] < mse["int8"] < 1.15 * mse["fp16"]
    assert mse["bf16"] < 1.05 * mse["fp16"]


def test_int8_small_groups_keep_their_own_resolution():
    """Symmetric: a group whose range is 1000x below the row's widest still gets a scale within one
    log-grid step (2**(1/16)) of its own need, not the widest group's resolution."""
    x = kv_like_rows(n=50)
    x[:, 224:] = x[:, 224:] * 1e-3
    q = quantize_rows(x, 4, 32, symmetric=True, scale_format="int8")
    small = q.scale_values().float()[:, -1]
    need = x[:, 224:].abs().amax(-1) / 7
    assert bool((small >= need).all()) and bool((small <= need * 2 ** (1 / 16) * 1.001).all())


def test_int8_zero_gap_is_bounded_by_the_row_spread_of_minima():
    """Asymmetric: the zero-point sits at most one zero step (the spread of the row's group minima / 255,
    plus FP16 rounding) below the group minimum, so a step is at most (range + that gap) / qmax, times one
    log-grid step.
    A narrow group in a row of wide ones pays this (documented in smartkv/scale_format.py)."""
    x = kv_like_rows(n=50)
    x[:, 224:] = x[:, 224:] * 1e-3
    q = quantize_rows(x, 4, 32, scale_format="int8")
    lo, hi = x.view(50, 8, 32).amin(-1), x.view(50, 8, 32).amax(-1)
    dz = q.shared[:, 2].float().unsqueeze(-1)
    zero, step = q.zero_values().float(), q.scale_values().float()
    gap = dz + lo.abs() * 2.0**-10  # one zero step and one FP16 rounding
    assert bool((zero <= lo).all()) and bool((zero >= lo - gap).all())
    assert bool((step <= (hi - lo + gap) / 15 * 2 ** (1 / 16) * 1.001).all())


def test_bf16_holds_values_beyond_fp16():
    x = torch.randn(8, 64) * 1e6
    q = quantize_rows(x, 8, 32, scale_format="bf16")
    assert float(((q.dequantize() - x).abs() / x.abs().amax()).max()) < 0.01


def test_constant_rows_are_exact():
    x = torch.full((4, 128), 0.5)
    x[1] = -3.0
    for fmt in FORMATS:
        assert torch.equal(quantize_rows(x, 2, 32, scale_format=fmt).dequantize(), x)


def test_int8_converts_to_fp16_exactly(kernel):
    x = kv_like_rows(n=64)
    q = quantize_rows(x, 3, 32, scale_format="int8")
    f = q.as_fp16()
    assert f.scale.dtype == torch.float16 and f.shared is None and f.planes is q.planes
    assert torch.equal(f.dequantize(), q.dequantize())
    index = torch.randperm(100)[:64].to(torch.int32)
    out = q.dequantize_into(torch.zeros(100, 256), index)  # the C++ kernel on the FP16 copy
    ref = torch.zeros(100, 256).index_copy_(0, index.long(), q.dequantize())
    assert torch.equal(out, ref)


def test_rows_keep_their_shared_constants():
    q = quantize_rows(kv_like_rows(n=20), 2, 32, scale_format="int8")
    pick = torch.tensor([3, 7, 1])
    assert torch.equal(q.select(pick).dequantize(), q.dequantize()[pick])
    both = q.select(pick).cat_rows(q.select(torch.tensor([0])))
    assert torch.equal(both.dequantize(), q.dequantize()[torch.tensor([3, 7, 1, 0])])
    with pytest.raises(ValueError, match="scale format"):
        q.cat_rows(quantize_rows(kv_like_rows(n=2), 2, 32))
    with pytest.raises(ValueError, match="FP16 metadata"):
        q.cat_length(q)


def test_unknown_format_named():
    with pytest.raises(ValueError, match="'fp8'.*allowed"):
        quantize_rows(torch.randn(2, 32), 2, 32, scale_format="fp8")
    model = tiny_model("llama", seed=0, hidden_size=64, intermediate_size=128, head_dim=32, num_attention_heads=2,
                       num_key_value_heads=2)
    with pytest.raises(ConfigError, match=r"scale_format='fp8'.*'fp16', 'bf16', 'int8'"):
        build_cache("smartkv", model.config, budget=0.3, scale_format="fp8")


def test_cache_spends_the_saving_on_bits():
    """Same budget, cheaper metadata: the store prices each width with it, so more values get more bits,
    and what the cache holds (counted tensor by tensor) still meets the budget."""
    model = tiny_model("llama", seed=0, hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4,
                       num_key_value_heads=4)
    use_smartkv_attention(model)
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(0))
    mean_bits = {}
    for fmt in ("fp16", "int8"):
        cache = build_cache("smartkv", model.config, budget=0.25, bits=(2, 3, 4, 8), group_size=32, scale_format=fmt)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                           min_new_tokens=4, do_sample=False, pad_token_id=0)
        layer = cache.layers[0]
        assert layer.store.costs == [row_nbytes(layer.unit_len, b, 32, False, fmt) + 4 for b in (2, 3, 4, 8)]
        rows = list(layer.store.rows.values())
        assert layer.memory_breakdown()["scales"] == sum(r.metadata_nbytes for r in rows)
        assert all(r.scale_format == fmt for r in rows)
        assert cache.memory_report()["budget_met"]
        hist = {}
        for lay in cache.layers:
            for b, n in lay.store.values_per_width().items():
                hist[b] = hist.get(b, 0) + n
        mean_bits[fmt] = sum(b * n for b, n in hist.items()) / sum(hist.values())
    assert mean_bits["int8"] > mean_bits["fp16"]
