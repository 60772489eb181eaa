"""`memory_breakdown()`: every layer's parts add up to its `nbytes()`, on a tiny random model."""

import pytest
import torch

from smartkv.cache.base import MEMORY_PARTS
from smartkv.evaluate import breakdown_columns
from smartkv.methods import build_cache
from smartkv.runner import memory_of

PROMPT_LEN, NEW = 160, 20

METHODS = [
    ("fp16", {}, {"fp16"}),
    ("uniform", {"bits": 4}, {"codes", "scales"}),
    ("kivi", {"bits": 2, "residual_length": 64}, {"codes", "scales", "window"}),
    # sinks, window, key smoothing, tracker and several widths: every part of the mixed layer
    ("smartkv", {"budget": 0.3, "sink_tokens": 4, "window": 8, "key_smoothing": True},
     {"codes", "scales", "index", "sinks", "window", "key_stats", "tracker"}),
    ("smartkv", {"budget": 0.1, "bits": (0, 2, 4)}, {"codes", "scales", "index", "tracker"}),  # evicts
    # 8-bit scales and zero-points with FP16 constants shared per unit, all under "scales"
    ("smartkv", {"budget": 0.3, "scale_format": "int8", "group_size": 16}, {"codes", "scales", "index", "tracker"}),
]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def _generate(model, cache):
    ids = torch.randint(3, 250, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=NEW,
                   min_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name,params,nonzero", METHODS, ids=[f"{n}-{p}" for n, p, _ in METHODS])
def test_parts_add_up_to_nbytes(model, name, params, nonzero):
    cache = build_cache(name, model.config, **params)
    _generate(model, cache)
    for layer in cache.layers:
        parts = layer.memory_breakdown()
        assert set(parts) <= set(MEMORY_PARTS)
        assert all(isinstance(v, int) and v >= 0 for v in parts.values())
        assert sum(parts.values()) == layer.nbytes() > 0
    rep = cache.memory_report()
    assert sum(rep["breakdown"].values()) == rep["kv_bytes"]
    held = {p for p, v in rep["breakdown"].items() if v > 0}
    assert nonzero <= held, f"{name}: expected {nonzero} among the parts held, got {held}"
    if name != "fp16":
        assert "fp16" not in held
    if "tracker" in held:  # the tracker part is the tracker's bytes the layers keep
        assert rep["breakdown"]["tracker"] == rep["tracker_bytes"]
    # the results' columns: one per part, adding up to kv_bytes as well
    cols = breakdown_columns(memory_of(cache)["breakdown"])
    assert set(cols) == {f"kv_{p}_bytes" for p in MEMORY_PARTS}
    assert sum(cols.values()) == rep["kv_bytes"]


def test_codes_follow_the_bit_width(model):
    # Same tokens at 2 and 4 bits: the codes double, the scales (one pair per group) stay.
    two, four = build_cache("uniform", model.config, bits=2), build_cache("uniform", model.config, bits=4)
    _generate(model, two), _generate(model, four)
    b2, b4 = two.memory_report()["breakdown"], four.memory_report()["breakdown"]
    assert b4["codes"] == 2 * b2["codes"]
    assert b4["scales"] == b2["scales"] > 0


@pytest.mark.parametrize("name,params,group", [
    ("uniform", {"bits": 4}, 32),
    # group_size 64 > head_dim 32: groups are one head's 32 values (no group straddles two heads)
    ("smartkv", {"budget": 0.3, "sink_tokens": 4, "window": 8}, 32),  # several widths, FP16 sinks and window
    ("smartkv", {"budget": 0.3, "bits": (2, 4), "group_size": 16}, 16),
], ids=["uniform-4", "smartkv-b0.3", "smartkv-g16"])
def test_bytes_match_the_closed_form(model, name, params, group):
    """Each part from the geometry and the token counts alone, not from the tensors' sizes: per group of
    `group` values one FP16 scale and one FP16 zero-point (4 bytes), `bits / 8` bytes per value of codes,
    a 4-byte int32 index per stored unit where a layer holds several widths, 2 bytes per FP16 value."""
    cache = build_cache(name, model.config, **params)
    _generate(model, cache)
    values = 2 * model.config.num_key_value_heads * model.config.head_dim  # K and V of one token in one layer
    seq_len = PROMPT_LEN + NEW - 1
    quantized = fp16_tokens = codes = 0
    for layer in cache.layers:
        fp16 = layer.sink_k.shape[-2] + layer.win_k.shape[-2]
        assert layer.seq_len == seq_len and layer.n_quant == seq_len - fp16
        quantized, fp16_tokens = quantized + layer.n_quant, fp16_tokens + fp16
        codes += sum(n * b for b, n in layer.bits_histogram().items() if b != 16) // 8
    parts = cache.memory_report()["breakdown"]
    assert parts["scales"] == quantized * (values // group) * (2 + 2)
    assert parts["codes"] == codes
    several = name == "smartkv"  # one unit per token and layer (granularity "layer"): one index entry each
    assert parts.get("index", 0) == (4 * quantized if several else 0)
    assert parts.get("sinks", 0) + parts.get("window", 0) == fp16_tokens * values * 2
    if name == "uniform":  # no window, no sinks: every token at 4 bits
        assert quantized == len(cache.layers) * seq_len and codes == quantized * values * 4 // 8
    else:
        assert fp16_tokens > 0 and len({b for layer in cache.layers for b in layer.bits_histogram()}) >= 3


def test_layer_without_itemization_reports_other():
    from smartkv.cache.base import KVLayer

    class Opaque(KVLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return key_states, value_states

        def nbytes(self):
            return 123

    assert Opaque().memory_breakdown() == {"other": 123}
