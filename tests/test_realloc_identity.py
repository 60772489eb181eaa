"""The cheaper re-allocation path decides exactly what the old one did: same levels, same bytes,
same packed codes, same logits. The old bodies are kept verbatim in tests/realloc_reference.py."""

from contextlib import nullcontext

import pytest
import torch

from smartkv import allocate as alloc
from smartkv.attention import use_smartkv_attention
from smartkv.cache.packed_store import PackedStore, by_level
from smartkv.methods import build_cache
from smartkv.models import tiny_model

import realloc_reference as ref
from random_prompts import decode_logits as _decode, left_padded

BITS = (0, 2, 3, 4, 8)
# the headline configuration (params.yaml `smartkv:`), at a budget that makes re-allocations demote
HEADLINE = dict(bits=BITS, group_size=32, window=8, window_share=0.1, sink_tokens=4, allocation="greedy",
                signal="ema", key_smoothing=True, error_model="range", prior=0.5, decay=0.9, realloc_freq=16)


def _realistic_units(n: int, length: int, seed: int) -> torch.Tensor:
    """K/V-like rows: tokens of very different ranges, a few outlier channels with large offsets
    (as keys have), and rare outliers that widen one group's range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=g) * torch.rand(n, 1, generator=g).mul(3).add(0.2)
    x[:, ::16] += 8.0 * torch.randn(-(-length // 16), generator=g)
    x[torch.rand(n, length, generator=g) < 0.01] *= 20.0
    return x


def _same_store(a: PackedStore, b: PackedStore) -> None:
    assert a.n_units == b.n_units and sorted(a.rows) == sorted(b.rows)
    assert torch.equal(a.levels(), b.levels())
    assert a.nbytes == b.nbytes and a.held_bytes() == b.held_bytes()
    for lvl in a.rows:
        ra, rb = a.rows[lvl], b.rows[lvl]
        assert all(torch.equal(p, q) for p, q in zip(ra.planes, rb.planes))
        assert torch.equal(ra.scale, rb.scale)
        assert (ra.zero is None and rb.zero is None) or torch.equal(ra.zero, rb.zero)
        assert (a.index[lvl] is None) == (b.index[lvl] is None)
        if a.index[lvl] is not None:
            assert a.index[lvl].dtype == b.index[lvl].dtype == torch.int32
            assert torch.equal(a.index[lvl], b.index[lvl])


def test_by_level_is_what_the_masks_select():
    levels = torch.tensor([3, 0, 3, 1, 4, 4, 0, 3, 2])
    got = by_level(levels)
    assert [lvl for lvl, _ in got] == levels.unique().tolist()
    for lvl, at in got:
        assert torch.equal(at, (levels == lvl).nonzero().squeeze(1))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = 3000
    store = PackedStore(BITS, 384, 64, False)
    imp = torch.rand(n, generator=g, dtype=torch.float64) ** 4  # a few important units, many near zero
    imp[torch.rand(n, generator=g) < 0.2] = 0.0  # ties at zero importance
    caps = torch.randint(0, len(BITS), (n,), generator=g) if seed % 2 else torch.full((n,), len(BITS) - 1)
    errors = alloc.range_errors(torch.rand(n, generator=g, dtype=torch.float64) * 4, BITS)
    for share in (0.15, 0.25, 0.4, 0.9):
        available = int(n * store.costs[-1] * share)
        if available < n * store.costs[0]:
            continue
        for err in (errors, None):
            assert torch.equal(alloc.greedy(imp, store.costs, caps, available, BITS, err),
                               ref.greedy(imp, store.costs, caps, available, BITS, err))


@pytest.mark.parametrize("symmetric", [False, True])
def test_append_and_demote_match_the_reference(symmetric):
    bit_set = (0, 2, 3, 4, 8) if not symmetric else (2, 3, 4, 8)
    g = torch.Generator().manual_seed(1)
    new, old = PackedStore(bit_set, 96, 32, symmetric), PackedStore(bit_set, 96, 32, symmetric)
    for step in range(4):
        units = _realistic_units(400, 96, seed=step)
        levels = torch.randint(0, len(bit_set), (400,), generator=g)
        new.append(units, levels)
        ref.append(old, units, levels)
        _same_store(new, old)
        target = (new.levels() - torch.randint(0, 3, (new.n_units,), generator=g)).clamp_min(0)
        new.demote(target)
        ref.demote(old, target)
        _same_store(new, old)
    with pytest.raises(AssertionError, match="raised"):
        new.demote(torch.full((new.n_units,), len(bit_set) - 1))


CASES = {
    "headline-0.25": ("llama", {**HEADLINE, "budget": 0.25}, (300,)),
    "evicting-0.15-batch2": ("llama", {**HEADLINE, "budget": 0.15}, (300, 240)),
    "head-kv-split-0.3": ("qwen2", {**HEADLINE, "bits": (2, 3, 4, 8), "budget": 0.3, "granularity": "head",
                                     "kv_split": True}, (260,)),
    "bits-model-dp": ("mistral", {**HEADLINE, "budget": 0.3, "error_model": "bits", "allocation": "dp"}, (200,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_decides_what_the_reference_decided(case):
    """Two re-allocations (40 decode steps) on each path: identical logits, levels, bytes and codes."""
    arch, params, lengths = CASES[case]
    model = tiny_model(arch, seed=0, hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4,
                       num_key_value_heads=2)
    use_smartkv_attention(model)
    g = torch.Generator().manual_seed(0)
    ids, mask = left_padded(lengths, g)
    fed = torch.randint(3, 250, (len(lengths), 40), generator=g)
    fast = build_cache("smartkv", model.config, **params)
    fast_logits = _decode(model, fast, ids, mask, fed)
    with ref.reference_path():
        old = build_cache("smartkv", model.config, **params)
        old_logits = _decode(model, old, ids, mask, fed)
    assert torch.equal(fast_logits, old_logits)
    demoted = 0
    for lf, lo in zip(fast.layers, old.layers):
        assert lf.reallocations == lo.reallocations >= 3  # the first allocation and two re-allocations
        assert lf.nbytes() == lo.nbytes()
        _same_store(lf.store, lo.store)
        demoted += int((lf.store.levels() < len(params["bits"]) - 1).sum())
    assert demoted  # the budget bites: some units sit below the top width
    _same_tracker(fast.tracker, old.tracker)


def _same_tracker(a, b) -> None:
    assert sorted(a.layers) == sorted(b.layers)
    for idx, lb in b.layers.items():
        la = a.layers[idx]
        assert la.queries == lb.queries and la.n_tokens == lb.n_tokens
        for name, t in lb.stats().items():
            assert la.stats()[name].dtype == t.dtype and torch.equal(la.stats()[name], t), (idx, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tracker_statistics_match_the_reference(dtype):
    """Every statistic (EMA, window, cumulative, count) over a prompt then decode steps, bit for bit."""
    from smartkv.importance import ImportanceTracker

    g = torch.Generator().manual_seed(2)
    trackers = [ImportanceTracker(0.9, 8, dtype=dtype), ImportanceTracker(0.9, 8, dtype=dtype)]
    for i, tracker in enumerate(trackers):
        with ref.reference_path() if i else nullcontext():
            q, k = torch.randn(1, 4, 20, 16, generator=g.manual_seed(3)), torch.randn(1, 2, 20, 16, generator=g)
            tracker.observe(0, q, k, None, 0.25)
            for step in range(12):
                probs = torch.softmax(torch.randn(1, 4, 21 + step, generator=g), dim=-1)
                tracker.observe_weights(0, probs, 2, None)
    _same_tracker(*trackers)
    assert trackers[0].layers[0].n_tokens == 32


def test_reference_path_restores_the_current_bodies():
    before = (PackedStore.append, PackedStore.demote, alloc.greedy)
    from smartkv.importance import LayerImportance

    add = LayerImportance._add
    with ref.reference_path():
        assert PackedStore.append is ref.append and alloc.greedy is ref.greedy
    assert (PackedStore.append, PackedStore.demote, alloc.greedy) == before and LayerImportance._add is add


@pytest.mark.slow
def test_default_model_at_2k_tokens_decides_what_the_reference_decided():
    """The real model on a 2k-token needle prompt, headline config: the realistic tensors."""
    import yaml

    from smartkv.bench import bench_prompt
    from smartkv.models import load_model
    from smartkv.runner import decode, encode, fork, prefill, tracked_stats
    from smartkv.study.runs import headline_run

    with open("params.yaml") as f:
        head = headline_run(yaml.safe_load(f))
    model, tok = load_model("default")
    ids, mask = encode(tok, [bench_prompt(tok, 2048)])
    pre = prefill(model, ids, mask, keep=tracked_stats([head]))
    fast, _ = fork(pre, head, model)
    fast_new, _ = decode(model, pre, fast, 34, min_new_tokens=34)
    with ref.reference_path():
        old, _ = fork(pre, head, model)
        old_new, _ = decode(model, pre, old, 34, min_new_tokens=34)
    assert torch.equal(fast_new, old_new)
    for lf, lo in zip(fast.layers, old.layers):
        assert lf.reallocations == lo.reallocations == 3
        assert lf.nbytes() == lo.nbytes()
        _same_store(lf.store, lo.store)
