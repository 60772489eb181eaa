"""Decode attention on packed codes agrees with de-quantize + SDPA, on several head geometries.

Histories are laid out by hand here (sinks, quantized units at mixed widths in shuffled row
order, window), as `smartkv.cache.mixed` lays them out, so that these tests do not depend
on the cache's policy code. A failed kernel build fails these tests; they skip only when
SMARTKV_NO_KERNEL=1 is set on purpose.
"""

import pytest
import torch

from smartkv.importance import ImportanceTracker
from smartkv.packed_attention import (
    PackedHistory,
    dequantized_history,
    kernel_can_take,
    packed_decode_attention,
    reference_decode_attention,
    tracker_mass,
)
from smartkv.quantize import quantize_rows


def make_history(b, hkv, d, s, n, w, *, head_major=False, kv_split=False, bit_set=(2, 3, 4, 8), group=32,
                 symmetric=False, smoothing=True, dtype=torch.float16, seed=0, shuffle=True, scale_format="fp16"):
    gen = torch.Generator().manual_seed(seed)
    t = s + n + w
    k = torch.randn(b, hkv, t, d, generator=gen)
    k += torch.randn(1, hkv, 1, d, generator=gen) * 4  # outlier channels, as real keys have
    v = torch.randn(b, hkv, t, d, generator=gen)
    kq, vq = k[:, :, s : s + n], v[:, :, s : s + n]
    shift = scale = None
    if smoothing:
        hi, lo = kq.amax(dim=-2, keepdim=True), kq.amin(dim=-2, keepdim=True)
        shift, scale = ((hi + lo) / 2).to(dtype), ((hi - lo) / 2).clamp_min(1e-4).to(dtype)
        kq = (kq - shift.float()) / scale.float()
    stacked = torch.stack([kq, vq])  # [2, B, H, n, D]
    flat = stacked.permute(3, 1, 2, 0, 4) if head_major else stacked.permute(3, 1, 0, 2, 4)
    unit_len = d * (1 if kv_split else 2) * (1 if head_major else hkv)
    units = flat.reshape(-1, unit_len)
    n_units = units.shape[0]
    levels = []
    if n_units == 0:
        pass
    elif len(bit_set) == 1:
        levels.append((quantize_rows(units, bit_set[0], group, symmetric, scale_format), None))
    else:
        which = torch.randint(0, len(bit_set), (n_units,), generator=gen)
        for lvl, bits in enumerate(bit_set):
            ids = torch.nonzero(which == lvl).flatten()
            if shuffle:  # rows need not be in unit order
                ids = ids[torch.randperm(ids.numel(), generator=gen)]
            levels.append((quantize_rows(units[ids], bits, group, symmetric, scale_format), ids.to(torch.int32)))
    return PackedHistory(
        sink_k=k[:, :, :s].to(dtype), sink_v=v[:, :, :s].to(dtype), levels=levels, n_quant=n, unit_len=unit_len,
        head_major=head_major, win_k=k[:, :, s + n :].to(dtype), win_v=v[:, :, s + n :].to(dtype),
        k_shift=shift, k_scale=scale,
    )


def agree(query, history, scaling, allowed=None):
    out, probs = packed_decode_attention(query, history, scaling, allowed)
    ref_out, ref_probs = reference_decode_attention(query, history, scaling, allowed)
    assert out.shape == ref_out.shape and out.dtype == query.dtype and probs.shape == ref_probs.shape
    out_err = float((out.float() - ref_out.float()).abs().max())
    prob_err = float((probs - ref_probs).abs().max())
    assert out_err <= 2e-5 * max(1.0, float(ref_out.abs().max())), out_err
    assert prob_err <= 2e-6, prob_err
    return out_err, prob_err


# (query heads, KV heads, head_dim): SmolLM2-135M, Llama-3-8B, plain MHA, Qwen2-0.5B, MQA
GEOMETRIES = [(9, 3, 64), (32, 8, 128), (4, 4, 32), (14, 2, 64), (8, 1, 16)]


@pytest.mark.parametrize("hq,hkv,d", GEOMETRIES)
@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("kv_split", [False, True])
def test_matches_reference_across_geometries(kernel, hq, hkv, d, head_major, kv_split):
    history = make_history(1, hkv, d, 4, 150, 7, head_major=head_major, kv_split=kv_split, group=min(32, d),
                           seed=hq * 100 + d)
    query = torch.randn(1, hq, 1, d, generator=torch.Generator().manual_seed(hq))
    agree(query, history, d**-0.5)


# symmetric 1-bit rows are refused by quantize_rows, so (1, 5) runs asymmetric only
WIDTH_SETS = [(bs, sym) for bs in [(4,), (2,), (1, 5), (2, 3, 4, 8), (6, 7)] for sym in (False, True)
              if not (sym and 1 in bs)]


@pytest.mark.parametrize("bit_set,symmetric", WIDTH_SETS)
@pytest.mark.parametrize("smoothing", [False, True])
def test_matches_reference_for_widths_and_metadata(kernel, bit_set, symmetric, smoothing):
    history = make_history(1, 3, 64, 4, 97, 5, bit_set=bit_set, symmetric=symmetric, smoothing=smoothing, group=16,
                           seed=sum(bit_set))
    query = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(1)) * 3
    agree(query, history, 0.125)


@pytest.mark.parametrize("scale_format", ["int8", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_formats(kernel, scale_format, symmetric):
    """int8 metadata: the kernel reads its exact FP16 copy; bf16: the reference path serves it."""
    history = make_history(1, 3, 64, 4, 120, 6, symmetric=symmetric, group=32, seed=7, scale_format=scale_format)
    assert all(rows.scale_format == scale_format for rows, _ in history.levels)
    query = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(4)) * 2
    assert kernel_can_take(query, history) == (scale_format == "int8")
    agree(query, history, 0.125)
    # the answer uses the metadata as stored: int8 differs from the FP16 history of the same values
    fp16 = make_history(1, 3, 64, 4, 120, 6, symmetric=symmetric, group=32, seed=7)
    assert not torch.equal(dequantized_history(history)[0], dequantized_history(fp16)[0])


def test_batch_with_left_padding_mask(kernel):
    history = make_history(2, 2, 64, 4, 80, 9, seed=3)
    query = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(2))
    allowed = torch.ones(2, history.length, dtype=torch.bool)
    allowed[1, :30] = False  # row 1 is left-padded: its sinks and first quantized tokens are padding
    _, probs = packed_decode_attention(query, history, 0.125, allowed)
    assert float(probs[1, :, :30].abs().max()) == 0.0
    agree(query, history, 0.125, allowed)
    nothing = torch.zeros_like(allowed)
    out, probs = packed_decode_attention(query, history, 0.125, nothing)
    assert float(out.abs().max()) == 0.0 and float(probs.abs().max()) == 0.0


@pytest.mark.parametrize("head_major", [False, True])
def test_evicted_units_get_no_attention(kernel, head_major):
    from smartkv.packed_attention import evicted_positions

    history = make_history(2, 2, 32, 3, 60, 4, head_major=head_major, seed=12)
    rows, index = history.levels[1]
    keep = torch.arange(rows.n_rows) % 3 != 0  # evict every third unit of one level (0 bits: no row at all)
    history.levels[1] = (rows.select(keep), index[keep].contiguous())
    with pytest.raises(RuntimeError, match="at no level"):  # without `evicts` a missing unit is a corrupt layout
        packed_decode_attention(torch.randn(2, 4, 1, 32), history, 0.2)
    history.evicts = True
    gone = evicted_positions(history)
    assert gone is not None and int(gone.sum()) > 0
    query = torch.randn(2, 4, 1, 32, generator=torch.Generator().manual_seed(12))
    _, probs = packed_decode_attention(query, history, 0.2)
    assert float(probs.masked_select(gone.repeat_interleave(2, dim=1)).abs().max()) == 0.0
    agree(query, history, 0.2)


def test_edges_no_sinks_no_window_and_no_quantized_tokens(kernel):
    agree(torch.randn(1, 4, 1, 32), make_history(1, 2, 32, 0, 40, 0, seed=4), 0.2)
    empty = make_history(1, 2, 32, 3, 0, 6, smoothing=False, seed=5)
    assert empty.levels == []
    agree(torch.randn(1, 4, 1, 32), empty, 0.2)


def test_bfloat16_query_and_history(kernel):
    history = make_history(1, 3, 64, 4, 64, 8, dtype=torch.bfloat16, seed=6)
    query = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    out, probs = packed_decode_attention(query, history, 0.125)
    ref_out, ref_probs = reference_decode_attention(query, history, 0.125)
    assert out.dtype == torch.bfloat16
    # the reference rounds the re-centred keys to bf16 before q.k; the kernel keeps float32
    assert float((out.float() - ref_out.float()).abs().max()) < 3e-2
    assert float((probs - ref_probs).abs().max()) < 2e-2


def test_weights_are_what_the_tracker_would_add(kernel):
    history = make_history(1, 3, 64, 4, 120, 10, seed=7)
    query = torch.randn(1, 9, 1, 64)
    _, probs = packed_decode_attention(query, history, 0.125)
    k, _ = dequantized_history(history)
    tracker = ImportanceTracker(0.9)
    tracker.layer(0)._grow(1, 3, history.length, "cpu")
    tracker.observe(0, query, k, None, 0.125)  # the second q.k the kernel makes unnecessary
    assert torch.allclose(tracker_mass(probs, 3), tracker.layers[0].cumulative, atol=1e-6)


def test_corrupt_layouts_are_refused(kernel):
    history = make_history(1, 2, 32, 2, 20, 2, seed=8)
    rows, index = history.levels[0]
    history.levels[0] = (rows, index.flip(0).clone())
    history.levels[0][1][0] = history.levels[1][1][0]  # one unit at two levels
    with pytest.raises(RuntimeError, match="stored twice|at no level"):
        packed_decode_attention(torch.randn(1, 4, 1, 32), history, 0.2)


def test_bad_shapes_raise_value_errors():
    history = make_history(1, 2, 32, 2, 20, 2, seed=9)
    with pytest.raises(ValueError, match="one decode query"):
        packed_decode_attention(torch.randn(1, 4, 2, 32), history, 0.2)
    with pytest.raises(ValueError, match="does not fit"):
        packed_decode_attention(torch.randn(1, 3, 1, 32), history, 0.2)
    with pytest.raises(ValueError, match="allowed"):
        packed_decode_attention(torch.randn(1, 4, 1, 32), history, 0.2, torch.ones(1, 5, dtype=torch.bool))


def test_pytorch_path_when_disabled(monkeypatch):
    monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    history = make_history(1, 2, 32, 2, 30, 3, seed=10)
    query = torch.randn(1, 4, 1, 32)
    out, probs = packed_decode_attention(query, history, 0.2)
    k, v = dequantized_history(history)
    want = torch.nn.functional.scaled_dot_product_attention(query, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             scale=0.2)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4))


def test_threads_split_heads_without_changing_results(kernel):
    history = make_history(2, 3, 64, 4, 90, 6, seed=11)
    query = torch.randn(2, 9, 1, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed_decode_attention(query, history, 0.125)
        torch.set_num_threads(2)
        two = packed_decode_attention(query, history, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("head_major", [False, True])
def test_long_histories_cut_into_pieces_agree_at_any_thread_count(kernel, head_major):
    # more than one 256-row piece per level and head, so that the partial sums of several pieces meet
    history = make_history(1, 3, 64, 4, 1500, 9, head_major=head_major, group=32, seed=5)
    query = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(packed_decode_attention(query, history, 0.125))
    finally:
        torch.set_num_threads(before)
    for out, probs in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(probs, runs[0][1])
    agree(query, history, 0.125)
