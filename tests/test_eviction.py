"""The 0-bit tier: evicted tokens cost nothing, get no attention, and need SmartKV's attention."""

import pytest
import torch

from smartkv.attention import use_smartkv_attention
from smartkv.methods import ConfigError, build_cache
from smartkv.models import tiny_model

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", seed=0, **SHAPE)
    use_smartkv_attention(m)
    return m


def ids(length=300, seed=0):
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def run(model, cache, prompt, new=6):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                          max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("budget", [0.15, 0.1, 0.05])
def test_budgets_below_the_two_bit_floor_are_met_by_evicting(model, budget):
    cache = build_cache("smartkv", model.config, budget=budget, bits=(0, 2, 4), window=8)
    run(model, cache, ids())
    rep = cache.memory_report()
    assert budget - 0.02 <= rep["ratio"] <= budget
    assert rep["bits_histogram"].get(0, 0) > 0  # some tokens really were evicted
    assert rep["bits_histogram"].get(2, 0) > 0  # and some kept, quantized
    assert rep["budget_met"]
    # without the 0-bit tier the same budget is out of reach: the cache holds its floor and says so
    two_bit = build_cache("smartkv", model.config, budget=budget, bits=(2, 4), window=8)
    with pytest.warns(Warning):
        run(model, two_bit, ids())
    held = two_bit.memory_report()
    assert not held["budget_met"] and held["ratio"] > budget


def test_evicted_tokens_get_no_attention(model):
    cache = build_cache("smartkv", model.config, budget=0.1, bits=(0, 2, 4), window=8, signal="cumulative")
    prompt = ids(seed=1)
    run(model, cache, prompt, new=4)
    layer = cache.layers[0]
    before = cache.tracker.layers[0].cumulative.float().clone()
    model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)  # one more decode step
    after = cache.tracker.layers[0].cumulative.float()
    gained = after[..., : before.shape[-1]] - before
    drop = layer.drop[:, :1, : before.shape[-1]]  # one precision per token: every head alike; tracker sums heads
    assert bool((layer.drop == layer.drop[:, :1]).all())
    assert bool(drop.any())
    assert float(gained[drop].abs().max()) == 0.0  # masked out: no mass at all
    assert float(gained[~drop].sum()) > 0


def test_eviction_without_smartkv_attention_fails_loudly():
    m = tiny_model("llama", seed=0, **SHAPE)  # attention not routed through SmartKV
    cache = build_cache("smartkv", m.config, budget=0.1, bits=(0, 2, 4), window=8)
    with pytest.raises(RuntimeError, match="use_smartkv_attention"), pytest.warns(RuntimeWarning):
        run(m, cache, ids(), new=3)


def test_zero_bits_config_is_checked():
    cfg = dict(num_hidden_layers=2)
    with pytest.raises(ConfigError, match="kv_split=False"):
        build_cache("smartkv", type("C", (), cfg)(), budget=0.1, bits=(0, 2), kv_split=True)
    with pytest.raises(ConfigError, match="above 0"):
        build_cache("smartkv", type("C", (), cfg)(), budget=0.1, bits=(0,))


def test_beam_search_carries_evictions(model):
    cache = build_cache("smartkv", model.config, budget=0.1, bits=(0, 2, 4), window=8)
    out = model.generate(ids(seed=3), attention_mask=torch.ones(1, 300, dtype=torch.long), past_key_values=cache,
                         max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 305)
    rep = cache.memory_report()
    assert rep["bits_histogram"].get(0, 0) > 0 and rep["ratio"] <= 0.1
