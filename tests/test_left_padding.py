"""Left padding: sinks are each row's first real tokens, pads are no context, and a padded row
reads what it reads alone (smartkv/cache/padding.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from smartkv.attention import use_smartkv_attention
from smartkv.cache.base import BudgetWarning
from smartkv.cache.padding import left_pads, permute_columns, sink_first_order
from smartkv.methods import build_cache
from smartkv.models import tiny_model

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
LONG, PADS, NEW = 200, 60, 12
EVICTING = dict(budget=0.3, bits=(0, 2, 3, 4, 8))  # the study's bit set: pads go to the 0-bit tier


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    m = tiny_model(request.param, seed=0, **SHAPE)
    use_smartkv_attention(m)
    return m


def batch():
    """Row 0: LONG random tokens; row 1: the last LONG - PADS of another draw, left-padded with PADS pads."""
    ids = torch.randint(3, 250, (2, LONG), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :PADS], mask[1, :PADS] = 0, 0
    return ids, mask


def run(model, cache, ids, mask, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, **kw)


def test_sink_first_order_and_pad_detection():
    order = sink_first_order(torch.tensor([0, 3]), sinks=2, t=7)
    assert order.tolist() == [[0, 1, 2, 3, 4, 5, 6], [3, 4, 0, 1, 2, 5, 6]]
    # a row with fewer real tokens than sinks keeps them all first, then its pads
    assert sink_first_order(torch.tensor([6]), sinks=2, t=7).tolist() == [[6, 0, 1, 2, 3, 4, 5]]
    x = torch.arange(14.0).view(2, 7)
    assert permute_columns(x, order)[1].tolist() == [10.0, 11.0, 7.0, 8.0, 9.0, 12.0, 13.0]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    mask = causal.expand(2, 1, 7, 7).clone()
    mask[1, :, :, :3] = False
    pads, why = left_pads(mask, 7)
    assert pads.tolist() == [0, 3] and why == ""
    assert left_pads(causal.expand(2, 1, 7, 7), 7) == (None, "")  # nothing padded
    right = causal.expand(2, 1, 7, 7).clone()
    right[1, :, :, 5:] = False
    pads, why = left_pads(right, 7)
    assert pads is None and "prefix" in why


@pytest.mark.parametrize("bits,budget", [(EVICTING["bits"], 0.3), ((2, 3, 4, 8), 0.4)],
                         ids=["0-bit tier", "no 0-bit tier"])
def test_sinks_are_the_first_real_tokens_and_pads_cost_nothing(model, bits, budget):
    """With a 0-bit tier the pads are evicted there; without one (the library's default bits; its 2-bit
    floor is 0.32 of FP16 on this tiny geometry, hence the budget) the store drops them all the same: no
    codes, no scale, no index, no context, no warning."""
    ids, mask = batch()
    cfg = dict(EVICTING, bits=bits, budget=budget)
    cache = build_cache("smartkv", model.config, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)  # neither bit set holds a pad, so neither warns
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW,
                       do_sample=False, pad_token_id=0)
    alone = build_cache("smartkv", model.config, **cfg)
    run(model, alone, ids[1:, PADS:], mask[1:, PADS:])
    assert cache.pads.tolist() == [0, PADS]
    for layer, single in zip(cache.layers, alone.layers):
        s = layer.spec.sink_tokens
        # row 1's sinks are its first real tokens, as they are when the prompt runs alone
        torch.testing.assert_close(layer.sink_k[1], single.sink_k[0], atol=2e-3, rtol=0)
        assert layer.order[1, :s].tolist() == list(range(PADS, PADS + s))
        bits = layer.bits_map()  # in the model's positions
        assert float(bits[1, :, :PADS].abs().max()) == 0.0  # every pad evicted: no codes, no scale, no index
        assert bool((bits[1, :, PADS : PADS + s] == 16).all())
        # FP16 reference bytes count the real tokens only
        real = 2 * LONG + 2 * (NEW - 1) - PADS
        assert layer.fp16_nbytes() == 2 * 2 * layer.heads * layer.head_dim * real
    rep = cache.memory_report()
    assert rep["budget_met"] and rep["ratio"] <= budget
    if 0 not in bits:  # dropped, not evicted: the store counts them, and no width holds one
        held = sum(layer.store.values_per_width().get(b, 0) for b in bits) // layer.unit_len
        assert layer.store.dropped == PADS * layer.units_per_token and held + layer.store.dropped == layer.store.n_units


def test_a_single_width_holds_its_pads_and_says_so(model):
    """A store of one width has no index to leave a unit out of: SmartKV with one width holds the pads
    at it, counted as context, and warns once. (Uniform INTk never reorders: it has no sinks, and its
    pads stay where they are, masked, at its width.)"""
    ids, mask = batch()
    cache = build_cache("smartkv", model.config, budget=0.6, bits=(4,))
    with pytest.warns(BudgetWarning, match="stores one width"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    layer = cache.layers[0]
    assert layer.order is not None and layer.evicted_pads == 0 and layer.store.dropped == 0
    assert layer.fp16_nbytes() == 2 * 2 * layer.batch * layer.heads * layer.head_dim * layer.seq_len


@pytest.mark.parametrize("packed", ["kernel", "sdpa"])
def test_dropped_pads_read_alike_on_both_paths(model, monkeypatch, packed):
    """Without a 0-bit tier the dropped pads are masked like evicted ones, on the packed kernel and on SDPA:
    the two paths give the same tokens and close logits."""
    ids, mask = batch()
    outs = {}
    for path in ("kernel", "sdpa"):
        with monkeypatch.context() as m:
            if path == "sdpa":
                m.setenv("SMARTKV_NO_KERNEL", "1")
            outs[path] = run(model, build_cache("smartkv", model.config, budget=0.4), ids, mask)
    a, b = outs["kernel"], outs["sdpa"]
    assert torch.equal(a.sequences, b.sequences)
    for step, (x, y) in enumerate(zip(a.logits, b.logits)):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3, msg=f"decode step {step}")


def test_key_smoothing_ranges_leave_pads_out(model):
    ids, mask = batch()
    ids[1, :PADS] = 249  # pads whose keys would stretch the ranges if they were counted
    cache = build_cache("smartkv", model.config, **EVICTING)
    run(model, cache, ids, mask)
    alone = build_cache("smartkv", model.config, **EVICTING)
    run(model, alone, ids[1:, PADS:], mask[1:, PADS:])
    for layer, single in zip(cache.layers, alone.layers):
        assert layer.k_scale is not None
        torch.testing.assert_close(layer.k_scale[1].float(), single.k_scale[0].float(), atol=2e-3, rtol=0)
        torch.testing.assert_close(layer.k_shift[1].float(), single.k_shift[0].float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("method,params", [("uniform", {"bits": 8}), ("uniform", {"bits": 3})])
@pytest.mark.parametrize("packed", ["kernel", "sdpa"])
def test_padded_row_reads_what_it_reads_alone(model, monkeypatch, method, params, packed):
    # Per-row quantization makes a padded row's cache its unpadded cache, so its logits match the
    # prompt run alone at every step, on the packed-code kernel path and on SDPA: the reordered mask
    # hides the pads and nothing else. (SmartKV's rows share one byte budget, and its window and reserve
    # follow that budget, so a row's allocation depends on its neighbours and this identity is not
    # expected there; the sink test checks its reorder.)
    if packed == "sdpa":
        monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    ids, mask = batch()
    out = run(model, build_cache(method, model.config, **params), ids, mask)
    alone = run(model, build_cache(method, model.config, **params), ids[1:, PADS:], mask[1:, PADS:])
    assert torch.equal(out.sequences[1, LONG:], alone.sequences[0, LONG - PADS:])
    for step, (a, b) in enumerate(zip(out.logits, alone.logits)):
        torch.testing.assert_close(a[1], b[0], atol=1e-4, rtol=1e-4, msg=f"decode step {step}")


@pytest.mark.parametrize("cfg", [EVICTING, dict(budget=0.4, bits=(2, 3, 4, 8))], ids=["0-bit tier", "no 0-bit tier"])
def test_beam_search_keeps_the_pads_with_their_rows(model, cfg):
    ids, mask = batch()
    cache = build_cache("smartkv", model.config, **cfg)
    out = run(model, cache, ids, mask, num_beams=2)
    assert out.sequences.shape == (2, LONG + NEW)
    layer = cache.layers[0]
    assert layer.batch == 4 and layer.evicted_pads == 2 * PADS  # two beams of each row
    if 0 not in cfg["bits"]:  # the beams' copies of the store drop the same pads
        assert layer.store.dropped == 2 * PADS * layer.units_per_token
    assert cache.memory_report()["budget_met"]


def test_right_padding_is_said_not_reordered(model):
    ids, mask = batch()
    mask = torch.ones_like(ids)
    mask[1, -PADS:] = 0
    cache = build_cache("smartkv", model.config, **EVICTING)
    with pytest.warns(BudgetWarning, match="only left padding is handled"):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.pads is None


def test_cropping_into_a_padded_prompt_is_refused(model):
    ids, mask = batch()
    cache = build_cache("smartkv", model.config, **EVICTING)
    run(model, cache, ids, mask)
    cache.crop(-2)  # tokens after the prompt: fine
    with pytest.raises(ValueError, match="left-padded prompt"):
        cache.crop(-NEW)
