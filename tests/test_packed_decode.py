"""The cache's decode path on packed codes agrees with de-quantize + SDPA, and really is taken.

Two caches of the same method decode the same tokens one at a time (teacher-forced, so both
see identical inputs): one with `packed_decode` on (placeholders + the C++ kernel, the tracker
fed the kernel's weights), one with it off (the de-quantize + SDPA reference and the tracker's
own q.k). Logits of every step, the importance state and the allocation must agree. Tiny random
models of several families (grouped-query heads), a left-padded batch, and a cache that evicts.
"""

import dataclasses

import pytest
import torch

from smartkv import packed_attention
from smartkv.attention import use_smartkv_attention
from smartkv.cache import mixed, mixed_reads
from smartkv.methods import build_cache
from smartkv.models import tiny_model

from random_prompts import decode_logits as _decode, left_padded

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
STEPS = 20  # past one re-allocation (every 16 decoded tokens)


def _model(arch: str):
    model = tiny_model(arch, seed=0, **SHAPE)
    use_smartkv_attention(model)
    return model


def _batch(lengths, steps, seed=0):
    """Left-padded random prompts (pad id 0) and the tokens fed at each decode step."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_padded(lengths, g)
    return ids, mask, torch.randint(3, 250, (len(lengths), steps), generator=g)


def _pair(model, method, params, ids, mask, fed, monkeypatch):
    """(logits, cache) with packed decode on, then off; counts the kernel calls of the first run."""
    calls = []
    real = packed_attention.packed_decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed_reads, "packed_decode_attention", counted)
    wired = build_cache(method, model.config, **params)
    wired_logits = _decode(model, wired, ids, mask, fed)
    monkeypatch.setattr(mixed_reads, "packed_decode_attention", real)
    reference = build_cache(method, model.config, **params)
    for layer in reference.layers:
        layer.spec = dataclasses.replace(layer.spec, packed_decode=False)
    ref_logits = _decode(model, reference, ids, mask, fed)
    return wired, wired_logits, reference, ref_logits, len(calls)


def _assert_same_state(wired, reference):
    for lw, lr in zip(wired.layers, reference.layers):
        assert torch.equal(lw.store.levels(), lr.store.levels())  # same allocation, unit by unit
        assert lw.nbytes() == lr.nbytes()
    if reference.tracker is None:
        assert wired.tracker is None
        return
    for idx, ref in reference.tracker.layers.items():
        got = wired.tracker.layers[idx]
        assert got.queries == ref.queries and got.n_tokens == ref.n_tokens
        for name, t in ref.stats().items():
            assert torch.allclose(got.stats()[name].float(), t.float(), rtol=1e-3, atol=1e-5), (idx, name)


CASES = {
    # arch, method, params, prompt lengths (left-padded when several)
    "llama-smartkv-batch2-padded": ("llama", "smartkv", {"budget": 0.3}, (150, 110)),
    "mistral-smartkv-head-granularity": ("mistral", "smartkv", {"budget": 0.3, "granularity": "head"}, (160,)),
    "qwen2-smartkv-evicting-batch2": ("qwen2", "smartkv", {"budget": 0.2, "bits": (0, 2, 4, 8),
                                                            "signal": "normalized"}, (170, 120)),
    "llama-uniform4": ("llama", "uniform", {"bits": 4}, (140, 100)),
    # 8-bit scales and zero-points: the kernel reads a transient FP16 copy of them
    "llama-smartkv-int8-scales": ("llama", "smartkv", {"budget": 0.3, "scale_format": "int8", "group_size": 16},
                                  (150, 110)),
    # sliding-window layers (window 16 < history) de-quantize for SDPA; the full-attention layer takes the kernel
    "gemma3-smartkv-sliding-layers": ("gemma3", "smartkv", {"budget": 0.3}, (150, 130)),
}


def _full_attention_layers(config) -> int:
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return sum(1 for t in types if t == "full_attention")


@pytest.mark.parametrize("case", list(CASES))
def test_packed_decode_matches_reference(kernel, case, monkeypatch):
    arch, method, params, lengths = CASES[case]
    model = _model(arch)
    ids, mask, fed = _batch(lengths, STEPS)
    wired, got, reference, want, calls = _pair(model, method, params, ids, mask, fed, monkeypatch)
    assert calls == STEPS * _full_attention_layers(model.config)  # every decode step of those layers took the kernel
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    _assert_same_state(wired, reference)
    if "evicting" in case:
        assert any(0 in layer.store.values_per_width() and layer.store.values_per_width()[0] > 0
                   for layer in wired.layers), "the case meant to evict evicted nothing"


def test_decode_step_materialises_no_full_size_history(kernel, monkeypatch):
    """A wired decode step never calls `_assemble` (de-quantize into [B, H, T, D]) and its
    keys and values are stride-0 placeholders without storage of their own."""
    model = _model("llama")
    ids, mask, fed = _batch((130, 90), 3)
    cache = build_cache("smartkv", model.config, budget=0.3)
    seen = []
    real_update = mixed.MixedPrecisionLayer.update
    assembled = []
    real_assemble = mixed.MixedPrecisionLayer._assemble

    def update(self, k, v, *a, **kw):
        keys, values = real_update(self, k, v, *a, **kw)
        seen.append((k.shape[-2], keys, values))
        return keys, values

    def assemble(self):
        assembled.append(self.seq_len)
        return real_assemble(self)

    monkeypatch.setattr(mixed.MixedPrecisionLayer, "update", update)
    monkeypatch.setattr(mixed.MixedPrecisionLayer, "_assemble", assemble)
    _decode(model, cache, ids, mask, fed)
    n_layers = len(cache.layers)
    assert len(assembled) == n_layers  # the prefill only
    decode = [(keys, values) for q, keys, values in seen if q == 1]
    assert len(decode) == 3 * n_layers
    for keys, values in decode:
        b, h, t, d = keys.shape
        assert t > ids.shape[1] and keys.stride() == (0, 0, 0, 0) and values.stride() == (0, 0, 0, 0)
        assert keys.untyped_storage().nbytes() == keys.element_size()  # one scalar, not B*H*T*D values


def test_multi_token_chunks_and_other_attention_keep_the_reference_path(kernel, monkeypatch):
    """Teacher-forced chunks of several tokens de-quantize as before; a model not routed through
    SmartKV's attention never gets placeholders."""
    model = _model("llama")
    ids, mask, fed = _batch((120,), 6)
    calls = []
    monkeypatch.setattr(mixed_reads, "packed_decode_attention", lambda *a, **k: calls.append(1))
    cache = build_cache("smartkv", model.config, budget=0.3)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        mask = torch.cat([mask, torch.ones_like(fed)], dim=1)
        model(input_ids=fed, attention_mask=mask, past_key_values=cache)  # a 6-token chunk
    assert calls == [] and all(layer.history is None for layer in cache.layers)

    plain = tiny_model("llama", seed=0, **SHAPE)  # sdpa, not SmartKV's function
    plain.set_attn_implementation("sdpa")
    cache = build_cache("uniform", plain.config, bits=4)
    ids, mask, fed = _batch((120,), 3)
    _decode(plain, cache, ids, mask, fed)
    assert calls == [] and not cache.attention_routed and all(layer.history is None for layer in cache.layers)


def test_bf16_scales_take_the_reference_path(monkeypatch):
    """BF16 metadata need not fit FP16, so no kernel reads it: decode de-quantizes, and still decodes."""
    model = _model("llama")
    ids, mask, fed = _batch((130,), 4)
    calls = []
    monkeypatch.setattr(mixed_reads, "packed_decode_attention", lambda *a, **k: calls.append(1))
    cache = build_cache("smartkv", model.config, budget=0.3, scale_format="bf16")
    logits = _decode(model, cache, ids, mask, fed)
    assert calls == [] and bool(torch.isfinite(logits).all())
    assert all(rows.scale.dtype == torch.bfloat16 for layer in cache.layers for rows in layer.store.rows.values())


def test_config_switch():
    from smartkv.methods.registry import ConfigError

    model = _model("llama")
    off = build_cache("smartkv", model.config, budget=0.3, packed_decode=False)
    assert not off.layers[0].attends_packed
    with pytest.raises(ConfigError, match="packed_decode"):
        build_cache("smartkv", model.config, budget=0.3, packed_decode="yes")
