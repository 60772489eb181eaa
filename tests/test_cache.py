"""Every registered SmartKV method inside `model.generate`, on tiny models of several architectures."""

import pytest
import torch

from smartkv.attention import use_smartkv_attention
from smartkv.cache.base import BudgetWarning
from smartkv.methods import ConfigError, build_cache
from smartkv.models import tiny_model
from smartkv.runner import RunSpec, decode, fork, prefill, tracked_stats

ARCHS = ("llama", "mistral", "qwen2")
SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
PROMPT_LEN, NEW = 200, 24

METHODS = [
    ("fp16", {}),
    ("uniform", {"bits": 8}),
    ("uniform", {"bits": 4}),
    ("uniform", {"bits": 3}),
    ("uniform", {"bits": 2}),
    ("kivi", {"bits": 2, "residual_length": 64}),
    ("kivi", {"bits": 4}),
    ("smartkv", {"budget": 0.35}),
    ("smartkv", {"budget": 0.3, "allocation": "dp"}),
    ("smartkv", {"budget": 0.3, "allocation": "layer_aware"}),
    ("smartkv", {"budget": 0.3, "allocation": "random"}),
    ("smartkv", {"budget": 0.3, "allocation": "fixed"}),
    ("smartkv", {"budget": 0.3, "bits": (2, 3, 4, 8), "granularity": "head", "kv_split": True, "key_weight": 2.0}),
    ("smartkv", {"budget": 0.3, "signal": "normalized", "realloc_freq": 0}),
    ("smartkv", {"budget": 0.1, "bits": (0, 2, 4)}),  # below the 2-bit floor: the 0-bit tier evicts
]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    m = tiny_model(request.param, seed=0, **SHAPE)
    use_smartkv_attention(m)
    return m


def prompt(batch=1, length=PROMPT_LEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


def generate(model, cache, ids, mask=None, new=NEW, **kw):
    kw.setdefault("do_sample", False)
    out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                         past_key_values=cache, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def expected_ratio(name, params, report, layer):
    """What the memory formula says for this method, from the token counts the layer reports."""
    if name == "fp16":
        return 1.0
    if name == "uniform":
        return (params["bits"] + 32 / 32) / 16  # b bits + fp16 scale and zero per 32 values
    if name == "kivi":
        hist = report["bits_histogram"]
        quant, full = hist.get(params["bits"], 0), hist[16]
        return (quant * (params["bits"] + 1) / 16 + full) / (quant + full)
    return None


@pytest.mark.parametrize("name,params", METHODS, ids=[f"{n}-{p}" for n, p in METHODS])
def test_method_generates_within_memory(model, name, params):
    cache = build_cache(name, model.config, **params)
    out = generate(model, cache, prompt())
    assert out.shape == (1, NEW)
    rep = cache.memory_report()
    assert rep["seq_len"] == PROMPT_LEN + NEW - 1
    assert rep["fp16_kv_bytes"] == 2 * 2 * model.config.num_hidden_layers * 2 * 32 * rep["seq_len"]
    ratio = rep["kv_bytes"] / rep["fp16_kv_bytes"]
    expect = expected_ratio(name, params, rep, cache.layers[0])
    if expect is not None:
        assert ratio == pytest.approx(expect, rel=0.01)
    else:
        assert params["budget"] - 0.02 <= ratio <= params["budget"]
        assert set(rep["bits_histogram"]) <= {0, 2, 3, 4, 8, 16}
        quantized = sum(n for b, n in rep["bits_histogram"].items() if b < 16)
        assert quantized > 0.8 * sum(rep["bits_histogram"].values())  # compression really happened


def test_held_bytes_are_the_tensors_held(model):
    cache = build_cache("smartkv", model.config, budget=0.3)
    generate(model, cache, prompt())
    for layer in cache.layers:
        tensors = [layer.sink_k, layer.sink_v, layer.win_k, layer.win_v]
        for rows in layer.store.rows.values():
            tensors += list(rows.planes) + [rows.scale, rows.zero]
        tensors += [i for i in layer.store.index.values() if i is not None]
        tensors += [layer.k_scale, layer.k_shift]  # per-channel key centre and scale (key smoothing)
        tensors += list(cache.tracker.layers[layer.layer_idx].stats().values())  # importance: one FP16 signal
        assert layer.nbytes() == sum(t.nbytes for t in tensors)
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)  # no view keeps a larger base
        assert all(p.dtype == torch.uint8 for rows in layer.store.rows.values() for p in rows.planes)


def test_budget_one_reproduces_fp16(model):
    ids = prompt(seed=3)
    ref = generate(model, build_cache("fp16", model.config), ids)
    same = generate(model, build_cache("smartkv", model.config, budget=1.0), ids)
    assert torch.equal(ref, same)
    # and with sampling, under the same seed
    torch.manual_seed(7)
    ref = generate(model, build_cache("fp16", model.config), ids, do_sample=True, top_k=20)
    torch.manual_seed(7)
    same = generate(model, build_cache("smartkv", model.config, budget=1.0), ids, do_sample=True, top_k=20)
    assert torch.equal(ref, same)


def test_low_budget_changes_the_cache(model):
    ids = prompt(seed=4)
    full = build_cache("fp16", model.config)
    low = build_cache("smartkv", model.config, budget=0.24, bits=(2, 3, 4, 8),  # no 0-bit tier: every token quantized
                      key_rotation=False)  # rotation: see test_rotation.py
    generate(model, full, ids)
    generate(model, low, ids)
    n = PROMPT_LEN - 1  # the prompt's keys are the same input for both; generated tokens may differ
    k_full = full.layers[0].keys.float()[:, :, :n]
    k_low = low.layers[0]._assemble()[0][:, :, :n]
    err = (k_full - k_low).abs()
    # quantized (not merely copied) and yet every value within half a 2-bit step of a +-max range
    assert float(err.max()) > 0
    assert float(err.max()) <= 2 * float(k_full.abs().max()) / 3 / 2 + 1e-3


def test_batch_with_left_padding(model):
    ids = prompt(batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :60] = 0  # second row is 60 tokens shorter
    ids[1, :60] = 0
    cache = build_cache("smartkv", model.config, budget=0.3, bits=(2, 3, 4, 8))
    out = generate(model, cache, ids, mask)  # without a 0-bit tier the pads are dropped: no context, no bytes
    assert out.shape == (2, NEW)
    rep = cache.memory_report()
    assert 0.28 <= rep["ratio"] <= 0.3  # of the real tokens' FP16 bytes (tests/test_left_padding.py)
    assert rep["fp16_kv_bytes"] == sum(layer.fp16_nbytes() for layer in cache.layers)
    assert cache.layers[0].evicted_pads == 60
    layer = cache.layers[0]
    imp = cache.tracker.layer(0).score(cache.config.signal)
    pads = layer.pad_at[1].nonzero().squeeze(1)  # where row 1 holds its pads after the sink-first reorder
    assert pads.tolist() == list(range(4, 64))
    assert float(imp[1, :, pads].abs().sum()) == 0.0  # padded keys receive no attention
    assert float(imp[0, :, :60].sum()) > 0
    # padded tokens are no context, so no width holds them; the row's sinks are its first real tokens
    bits = layer.bits_map()  # in the model's positions
    assert float(bits[1, :, :60].abs().max()) == 0.0
    assert float(bits[1, :, 64:].min()) >= 2.0  # every real token is held
    assert bool((bits[1, :, 60:64] == 16).all())


def test_precision_only_goes_down(model):
    ids = prompt(seed=6)
    cache = build_cache("smartkv", model.config, budget=0.3, realloc_freq=2, window=8)
    seen = []
    generate(model, cache, ids, new=1)
    for _ in range(12):
        model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True)
        seen.append(cache.layers[1].bits_map()[..., 0].clone())
    for before, after in zip(seen, seen[1:]):
        n = before.shape[-1]
        was_quantized = before < 16
        assert bool((after[..., :n][was_quantized] <= before[was_quantized]).all())


def test_tracker_mass_adds_up(model):
    cache = build_cache("smartkv", model.config, budget=0.5, signal="normalized", granularity="head")
    ids = prompt(length=64, seed=8)
    generate(model, cache, ids, new=4)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    layer = cache.tracker.layer(0)
    # every query's attention sums to one, per query head; the heads of a KV group add up
    total = layer.cumulative.sum(dim=-1)  # [B, H_kv]
    n_queries = 64 + 4 - 1
    assert torch.allclose(total, torch.full_like(total, float(n_queries * groups)), rtol=1e-4)
    assert float(layer.count[0, 0]) == n_queries  # the first token is seen by every query
    assert float(layer.count[0, -1]) == 1


def test_other_caches_are_not_tracked(model):
    cache = build_cache("fp16", model.config)
    generate(model, cache, prompt(length=40), new=2)
    assert cache.tracker is None
    random_cache = build_cache("smartkv", model.config, budget=0.5, allocation="random")
    assert random_cache.tracker is None  # no attention signal read: no tracking cost


def test_fork_path_matches_direct_fp16(model):
    ids = prompt(seed=9)
    direct = generate(model, build_cache("fp16", model.config), ids, new=10)
    pre = prefill(model, ids, torch.ones_like(ids))
    cache, _ = fork(pre, RunSpec("fp16", "fp16"), model)
    forked, _ = decode(model, pre, cache, 10, min_new_tokens=10)
    assert torch.equal(direct, forked)


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_prefill_tracking_only_what_runs_read_gives_the_same_signal(model, decay):
    """A prefill that tracks only `ema` and `window` scores the prompt's last rows only (the
    study's shared prefill for the SmartKV runs); the signals must match tracking every row."""
    ids = prompt(length=600, seed=12)  # longer than the horizon, so rows are really skipped
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding too
    full = prefill(model, ids, mask, decay, obs_window=16)
    keep = tracked_stats([RunSpec("s", "smartkv", {"budget": 0.3, "signal": "ema"}),
                          RunSpec("w", "smartkv", {"budget": 0.3, "signal": "window"})])
    assert keep == ("ema", "window")
    short = prefill(model, ids, mask, decay, obs_window=16, keep=keep)
    assert short.cache.tracker.horizon < ids.shape[1] - 1
    for idx, layer in full.cache.tracker.layers.items():
        cut = short.cache.tracker.layers[idx]
        assert cut.cumulative is None and cut.count is None
        for name in keep:
            torch.testing.assert_close(getattr(cut, name), getattr(layer, name), rtol=1e-5, atol=1e-9)
        assert cut.entropy == pytest.approx(layer.entropy, rel=1e-5)
    # a run that reads `cumulative` gets every row
    assert tracked_stats([RunSpec("c", "smartkv", {"budget": 0.3, "signal": "normalized"})]) == ("cumulative",
                                                                                                  "count")
    assert tracked_stats([RunSpec("u", "uniform", {"bits": 4})]) == ()


def test_budget_below_floor_is_refused_before_work_and_flagged_inside_generate(model):
    NO_EVICTION = (2, 3, 4, 8)  # the 2-bit floor: with a 0-bit tier 0.05 is within reach
    from smartkv.allocate import BudgetError
    from smartkv.cache.base import BudgetWarning
    from smartkv.methods.budget_check import check_budget_reachable

    # What the user can fix is refused before any work (the CLI and the pipeline call this) ...
    with pytest.raises(BudgetError, match=r"budget 0.05 cannot be met with 201 tokens: the floor there is 0\.\d+"):
        check_budget_reachable("smartkv", {"budget": 0.05, "bits": NO_EVICTION}, model.config, PROMPT_LEN + 1)
    check_budget_reachable("smartkv", {"budget": 0.3, "bits": NO_EVICTION}, model.config, PROMPT_LEN + 1)  # reachable: no error
    # ... while inside generate the cache holds its floor, warns once and flags it.
    cache = build_cache("smartkv", model.config, budget=0.05, bits=NO_EVICTION)
    with pytest.warns(BudgetWarning, match="budget 0.05 cannot be met") as caught:
        generate(model, cache, prompt(), new=4)
    assert len([w for w in caught if w.category is BudgetWarning]) == 1
    rep = cache.memory_report()
    assert rep["budget_met"] is False and rep["budget_holds_from"] is None and rep["budget_note"]
    layer = cache.layers[0]
    assert layer.nbytes() == layer.floor_bytes(layer.seq_len)


def test_floor_ratio_is_the_bytes_at_the_lowest_width(model):
    # everything at 2 bits (window 0, sinks in FP16): the bytes held are exactly the floor
    cache = build_cache("smartkv", model.config, budget=0.3, bits=(2,), window=0)
    generate(model, cache, prompt(), new=2)  # the first decode step allocates
    layer = cache.layers[0]
    assert layer.nbytes() / layer.fp16_nbytes() == pytest.approx(layer.floor_ratio(), rel=1e-9)
    assert layer.floor_ratio(10 * layer.seq_len) < layer.floor_ratio()  # sinks weigh less in longer contexts


def test_fp16_window_is_capped_at_its_share_of_the_budget(model):
    # 200 tokens at budget 0.3 are worth 60 FP16 tokens: a 32-token window would take half of it
    capped = build_cache("smartkv", model.config, budget=0.3, window=32, window_share=0.1)
    full = build_cache("smartkv", model.config, budget=0.3, window=32, window_share=1.0)
    ids = prompt(seed=11)
    generate(model, capped, ids, new=2)  # the first decode step allocates
    generate(model, full, ids, new=2)
    n = capped.layers[0].seq_len
    w_capped, w_full = capped.layers[0].win_k.shape[-2], full.layers[0].win_k.shape[-2]
    assert 0 < w_capped <= int(0.1 * 0.3 * n) < w_full
    # the bytes the window gives up go to the quantized tokens
    mean_quant_bits = lambda c: float(c.layers[0].bits_map()[0, :, 4:n - w_full].mean())
    assert mean_quant_bits(capped) > mean_quant_bits(full)
    for c in (capped, full):
        assert c.memory_report()["ratio"] <= 0.3


def test_layer_aware_budgets_respect_every_layer_floor(model):
    # A budget a little above the floor: tilting the whole budget by entropy (skew 0.5) would put
    # some layer under its floor; sharing only the spare above the floors keeps every layer valid.
    probe = build_cache("smartkv", model.config, budget=0.3)
    generate(model, probe, prompt(), new=2)
    floor = max(layer.floor_ratio() for layer in probe.layers)
    budget = round(floor + 0.03, 3)
    assert budget * (1 - 0.5) < floor
    cache = build_cache("smartkv", model.config, budget=budget, allocation="layer_aware", layer_skew=0.5)
    generate(model, cache, prompt())
    fractions = [cache.layer_fraction(i) for i in range(len(cache.layers))]
    assert sum(fractions) / len(fractions) == pytest.approx(budget, abs=1e-9)
    for layer, frac in zip(cache.layers, fractions):
        assert frac >= layer.floor_ratio(PROMPT_LEN - 1)
        assert layer.nbytes() <= frac * layer.fp16_nbytes() + 1
    assert cache.memory_report()["ratio"] <= budget


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    m = tiny_model("llama", seed=1, **SHAPE).to(dtype)
    use_smartkv_attention(m)
    # KIVI keeps its newest residual_length values in FP16: a short residual shows compression at 160 tokens
    for name, params in (("smartkv", {"budget": 0.3}), ("kivi", {"bits": 2, "residual_length": 32}),
                         ("uniform", {"bits": 4})):
        cache = build_cache(name, m.config, **params)
        out = generate(m, cache, prompt(length=160), new=8)
        assert out.shape == (1, 8)
        layer = cache.layers[0]
        assert layer.store_dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
        assert cache.memory_report()["ratio"] < 0.5


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("nope", {}, "unknown method 'nope'"),
        ("smartkv", {"budget": 0.0}, "budget=0.0"),
        ("smartkv", {"budget": 1.5}, "budget=1.5"),
        ("smartkv", {"bits": (2, 16)}, "bits=16"),
        ("smartkv", {"allocation": "best"}, "allocation='best'"),
        ("uniform", {"bits": 5}, "bits=5"),
        ("kivi", {"bits": 3}, "bits=3"),
        ("smartkv", {"budgett": 0.3}, "no parameter"),
    ],
)
def test_bad_configs_are_named(name, params, message):
    from transformers import LlamaConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_cache(name, LlamaConfig(num_hidden_layers=2), **params)


def test_a_multi_token_chunk_after_the_prompt_allocates(model):
    # teacher-forced scoring and assisted decoding feed several tokens at once after the prompt
    cache = build_cache("smartkv", model.config, budget=0.3, realloc_freq=4)
    ids = prompt(seed=11)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    model(input_ids=torch.randint(3, 250, (1, 6)), past_key_values=cache, use_cache=True)
    rep = cache.memory_report()
    assert 0.28 <= rep["ratio"] <= 0.3
    assert rep["reallocations"] == 1
    for _ in range(2):  # 8 more decoded tokens in chunks of 4: two more re-allocations at realloc_freq=4
        model(input_ids=torch.randint(3, 250, (1, 4)), past_key_values=cache, use_cache=True)
    assert cache.memory_report()["reallocations"] == 3


@pytest.mark.parametrize("name, params", [("smartkv", {"budget": 0.3}), ("smartkv", {"budget": 0.15, "bits": (0, 2, 3, 4, 8)}),
                                          ("uniform", {"bits": 4}), ("kivi", {"bits": 2, "residual_length": 32})])
def test_memory_holds_after_every_decode_step(model, name, params):
    """Not only at the end: after each decode step the bytes held are the tensors held, and SmartKV's
    ratio stays inside its budget (re-allocation every realloc_freq steps included)."""
    cache = build_cache(name, model.config, **params)
    ids = prompt()
    out = model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
    nxt = ids[:, -1:]
    for step in range(40):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        rep = cache.memory_report()
        assert rep["seq_len"] == PROMPT_LEN + step
        assert rep["fp16_kv_bytes"] == 2 * 2 * model.config.num_hidden_layers * 2 * 32 * rep["seq_len"], step
        assert rep["kv_bytes"] == sum(rep["breakdown"].values()), step
        if "budget" in params:
            assert rep["kv_bytes"] <= params["budget"] * rep["fp16_kv_bytes"], (step, rep["ratio"])


def test_budget_one_is_an_unmodified_dynamic_cache(model):
    """The reference is transformers' own DynamicCache (float32) through the same attention function,
    not our FP16 layer: budget 1.0 gives its tokens, and its logits up to FP16 storage's rounding
    (~3e-5 here; an 8-bit tier would be ~1e-3); it keeps no tracker and quantizes nothing."""
    from transformers import DynamicCache

    ids = prompt(seed=5)
    runs = {}
    for label, cache in (("dynamic", DynamicCache()), ("fp16", build_cache("fp16", model.config)),
                         ("smartkv", build_cache("smartkv", model.config, budget=1.0))):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=12,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        runs[label] = (out.sequences, torch.stack(out.logits), cache)
    assert torch.equal(runs["dynamic"][0], runs["smartkv"][0])
    torch.testing.assert_close(runs["smartkv"][1], runs["dynamic"][1], rtol=0, atol=2e-4)
    torch.testing.assert_close(runs["smartkv"][1], runs["fp16"][1], rtol=0, atol=1e-6)  # the same FP16 values
    rep = runs["smartkv"][2].memory_report()
    assert rep["tracker_bytes"] == 0 and rep["ratio"] == 1.0 and {b for b, n in rep["bits_histogram"].items() if n} == {16}
