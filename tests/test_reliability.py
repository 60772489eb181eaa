"""Reliability matrix (issue 11): every registered method inside everyday `model.generate` calls.

Methods x cases x tiny models of three architectures. For each cell: no exception escapes
`generate`, and a method with a budget either meets it or flags it (`budget_met: False`
with a note), and flags it only where it must (a context shorter than `budget_holds_from`,
or generation ended before the first decode step). Apart from the matrix: budget 1.0 is
no compression (no importance state, FP16 bytes exactly, `DynamicCache`'s tokens), and beam
search with every token in FP16 reproduces transformers' `DynamicCache` beams.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from transformers import DynamicCache

from smartkv.attention import use_smartkv_attention
from smartkv.cache.base import BudgetWarning
from smartkv.methods import build_cache, method_names
from smartkv.methods.hf_quantized import backend_available
from smartkv.models import tiny_model

from random_prompts import left_padded

ARCHS = ("llama", "mistral", "qwen2")
SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)

# One setting per registered method (each method's everyday use); `fp16` and `hf_dynamic` are the references.
PARAMS = {
    "fp16": {},
    "hf_dynamic": {},
    "hf_quanto": {"nbits": 4, "residual_length": 32},
    "hf_hqq": {"nbits": 4, "residual_length": 32},
    "kivi": {"bits": 2, "residual_length": 32},
    "smartkv": {"budget": 0.3},
    "uniform": {"bits": 4},
}

# case -> prompt length(s), new tokens, dtype, generate kwargs
CASES = {
    "short_prompt": dict(lengths=(13,), new=8),
    "long_prompt": dict(lengths=(300,), new=8),
    "batch3_left_padded": dict(lengths=(120, 90, 60), new=8),
    "bf16": dict(lengths=(120,), new=8, dtype=torch.bfloat16),
    "fp16_model": dict(lengths=(120,), new=8, dtype=torch.float16),
    "greedy": dict(lengths=(120,), new=8),
    "sampling": dict(lengths=(120,), new=8, kw=dict(do_sample=True, temperature=0.7, top_p=0.9)),
    "beam_search": dict(lengths=(120,), new=8, kw=dict(num_beams=3)),
    "assisted": dict(lengths=(120,), new=12, assisted=True),
    "past_fp16_window": dict(lengths=(60,), new=72),
    "eos_first_token": dict(lengths=(120,), new=8, eos_first=True),
}


def test_matrix_covers_every_registered_method():
    assert set(PARAMS) == set(method_names())


@functools.lru_cache(maxsize=None)
def _model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, layers: int | None = None):
    extra = {} if layers is None else {"num_hidden_layers": layers}
    m = tiny_model(arch, seed=seed, **SHAPE, **extra).to(dtype)
    use_smartkv_attention(m)
    return m


def _inputs(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts, left-padded to the longest (pad id 0)."""
    return left_padded(lengths, torch.Generator().manual_seed(seed))


def _generate(model, cache, ids, mask, new, eos_first=False, assisted=False, **kw):
    kw.setdefault("do_sample", False)
    if eos_first:  # every token ends generation: the model stops at its first new token
        kw["eos_token_id"] = list(range(model.config.vocab_size))
    else:
        kw["min_new_tokens"] = new
    if assisted:
        kw["assistant_model"] = _model(model.config.model_type, model.dtype, seed=1, layers=1)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def _cell_marks(method: str, case: str):
    if method in ("hf_quanto", "hf_hqq") and case == "assisted":
        # strict: an XPASS fails the run, so a transformers release that fixes crop drops this mark, not a reader
        return [pytest.mark.xfail(raises=IndexError, strict=True, reason=(
            "transformers 5.23 (pyproject pins >=5.23,<5.24; 5.23.0 checked): QuantizedCache inherits "
            "DynamicLayer.crop, which indexes its emptied 1-D residual when assisted decoding rejects drafts"))]
    return []


MATRIX = [pytest.param(arch, method, case, marks=_cell_marks(method, case), id=f"{arch}-{method}-{case}")
          for arch in ARCHS for method in PARAMS for case in CASES]


@pytest.mark.parametrize("arch,method,case", MATRIX)
def test_generate_matrix(arch, method, case):
    if method in ("hf_quanto", "hf_hqq") and not backend_available(method[3:]):
        pytest.skip(f"{method}'s backend is not installed (pip install 'smartkv[peers]')")
    c = CASES[case]
    model = _model(arch, c.get("dtype", torch.float32))
    ids, mask = _inputs(c["lengths"])
    cache = build_cache(method, model.config, **PARAMS[method])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BudgetWarning)
        out = _generate(model, cache, ids, mask, c["new"], c.get("eos_first", False), c.get("assisted", False),
                        **c.get("kw", {}))
    assert out.shape[0] == ids.shape[0] and 1 <= out.shape[1] <= c["new"]
    if c.get("eos_first"):
        assert out.shape[1] == 1
    if not hasattr(cache, "memory_report"):  # transformers' own caches: no budget to check
        return
    rep = cache.memory_report()
    assert rep["seq_len"] == ids.shape[1] + out.shape[1] - 1
    budget = PARAMS[method].get("budget")
    short_warnings = [w for w in caught if issubclass(w.category, BudgetWarning)]
    if budget is None:
        assert rep["budget_met"] and not short_warnings
        return
    decoded = out.shape[1] > 1 or c.get("assisted", False)
    if rep["budget_met"]:
        assert rep["kv_bytes"] <= budget * rep["fp16_kv_bytes"]
    else:  # flagged, and only where the budget cannot hold
        assert rep["budget_note"]
        assert rep["budget_holds_from"] is None or rep["seq_len"] < rep["budget_holds_from"] or not decoded
    if decoded and rep["budget_holds_from"] is not None and rep["seq_len"] >= rep["budget_holds_from"]:
        assert rep["budget_met"], rep["budget_note"]
    if not rep["budget_met"] and decoded:
        assert len(short_warnings) == 1  # said once per cache, not once per layer and step


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", ["long_prompt", "batch3_left_padded", "assisted", "past_fp16_window", "short_prompt"])
def test_budget_one_is_no_compression(arch, case):
    """Budget 1.0 means no compression: no importance state, every token in FP16, the bytes
    exactly FP16's, and the output that of transformers' `DynamicCache` and of `fp16`."""
    c = CASES[case]
    model = _model(arch)
    ids, mask = _inputs(c["lengths"], seed=1)
    ref = _generate(model, DynamicCache(config=model.config), ids, mask, c["new"], assisted=c.get("assisted", False))
    fp16 = _generate(model, build_cache("fp16", model.config), ids, mask, c["new"], assisted=c.get("assisted", False))
    cache = build_cache("smartkv", model.config, budget=1.0)
    same = _generate(model, cache, ids, mask, c["new"], assisted=c.get("assisted", False))
    assert torch.equal(ref, same) and torch.equal(fp16, same)
    rep = cache.memory_report()
    assert cache.tracker is None and rep["tracker_bytes"] == 0
    assert {b for b, n in rep["bits_histogram"].items() if n} == {16}  # widths listed, none held but 16
    assert rep["kv_bytes"] == rep["fp16_kv_bytes"] and rep["ratio"] == 1.0
    assert rep["budget_met"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,params", [("fp16", {}), ("smartkv", {"budget": 1.0})])
def test_beams_in_fp16_match_dynamic_cache(arch, method, params):
    model = _model(arch)
    ids, mask = _inputs((40, 25), seed=2)
    kw = dict(num_beams=4, num_return_sequences=2, output_scores=True, return_dict_in_generate=True,
              do_sample=False, max_new_tokens=10, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **kw)
    ours = model.generate(ids, attention_mask=mask, past_key_values=build_cache(method, model.config, **params), **kw)
    assert torch.equal(ref.sequences, ours.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-2, rtol=1e-2)


def _held(layer):
    """What the layer returns to attention, without adding a token: assembled K and V."""
    return layer._assemble() if hasattr(layer, "_assemble") else (layer.keys, layer.values)


@pytest.mark.parametrize("method,params", [("smartkv", {"budget": 0.3}), ("uniform", {"bits": 4}), ("fp16", {})])
def test_reorder_and_crop_move_per_token_state_with_the_tokens(method, params):
    model = _model("llama")
    ids, mask = _inputs((150, 150), seed=3)
    cache = build_cache(method, model.config, **params)
    _generate(model, cache, ids, mask, 40)
    layer = cache.layers[1]
    k, v = _held(layer)
    bits = layer.bits_map() if hasattr(layer, "bits_map") else None
    signal = cache.config.signal if cache.tracker is not None else None
    imp = getattr(cache.tracker.layer(1), signal).clone() if signal else None
    cache.reorder_cache(torch.tensor([1, 1]))  # both beams continue row 1
    k2, v2 = _held(layer)
    # Rows share one budget: two copies of the wider row may not fit, and then units are demoted
    # at once (never raised). Where every width stayed, the values are the very same.
    kept = bits is None or torch.equal(layer.bits_map()[0], bits[1])
    if kept:
        assert torch.equal(k2[0], k[1]) and torch.equal(v2[1], v[1])
    else:
        assert bool((layer.bits_map()[:, :, : bits.shape[2]] <= bits[1:2]).all())
        assert cache.memory_report()["budget_met"]
    if imp is not None:
        assert torch.equal(getattr(cache.tracker.layer(1), signal)[0], imp[1])
    n = layer.get_seq_length()
    cache.crop(-30)  # deeper than the FP16 window: quantized units go too
    k3, v3 = _held(layer)
    assert layer.get_seq_length() == n - 30 and k3.shape[-2] == n - 30
    assert torch.equal(k3, k2[:, :, : n - 30]) and torch.equal(v3, v2[:, :, : n - 30])
    if imp is not None:
        assert getattr(cache.tracker.layer(1), signal).shape[-1] <= n - 30
    rep = cache.memory_report()
    assert rep["budget_met"]
    assert rep["kv_bytes"] == sum(layer.nbytes() for layer in cache.layers)
