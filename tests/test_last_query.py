"""`attend_last_query`: the prompt's last query folds into the prefill's statistics, and only there."""

import pytest
import torch

from smartkv.attention import use_smartkv_attention
from smartkv.last_query import attend_last_query
from smartkv.models import tiny_model
from smartkv.runner import RunSpec, decode, fork, oracle_tracker, prefill

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
T = 120


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def model(request):
    m = tiny_model(request.param, seed=0, **SHAPE)
    use_smartkv_attention(m)
    return m


def inputs(pad: int = 0):
    """Two prompts of T ids; the second left-padded by `pad` (mask 0), as `encode` pads a batch."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def layer_stats(tracker, n_layers):
    return [{k: v.clone() for k, v in tracker.layers[i].stats().items()} for i in range(n_layers)]


@pytest.mark.parametrize("pad", [0, 17])
def test_statistics_are_an_fp16_generation_cut_after_one_step(model, pad):
    ids, mask = inputs(pad)
    n = model.config.num_hidden_layers
    ours = attend_last_query(model, prefill(model, ids, mask))
    # the reference: the plain prefill extended by one FP16 decode step (the probe's lookahead-1)
    ref = oracle_tracker(model, prefill(model, ids, mask), 1)
    for li in range(n):
        got, want = ours.cache.tracker.layers[li], ref.layers[li]
        assert got.n_tokens == T - 1 and want.n_tokens == T
        assert got.queries == want.queries == T  # the T - 1 prompt queries, then the last
        assert set(got.stats()) == set(want.stats()) == {"cumulative", "ema", "window", "count"}
        for name, t in got.stats().items():
            torch.testing.assert_close(t, want.stats()[name][..., : T - 1], rtol=1e-5, atol=1e-6, msg=name)


def test_the_last_query_adds_its_attention_to_the_kept_tokens(model):
    """Independent of the oracle: `cumulative` grows by the last query's attention, which sums to
    at most one per query head (what it paid to itself is cropped away), and `count` by one."""
    ids, mask = inputs(0)
    before = layer_stats(prefill(model, ids, mask).cache.tracker, model.config.num_hidden_layers)
    after = layer_stats(attend_last_query(model, prefill(model, ids, mask)).cache.tracker,
                        model.config.num_hidden_layers)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for b, a in zip(before, after):
        added = a["cumulative"] - b["cumulative"]  # [B, Hkv, T-1]
        assert added.min() >= -1e-6
        per_head = added.sum(-1)
        assert (per_head <= group + 1e-4).all() and (per_head > 0.5).all()
        torch.testing.assert_close(a["count"], b["count"] + 1)
        assert not torch.allclose(a["ema"], b["ema"])  # the EMA moved toward the new query


def test_keys_and_values_stay_the_prompt_minus_its_last_token(model):
    ids, mask = inputs(5)
    plain, ours = prefill(model, ids, mask), attend_last_query(model, prefill(model, ids, mask))
    assert ours.cache.get_seq_length() == T - 1
    for p, o in zip(plain.cache.layers, ours.cache.layers):
        assert torch.equal(p.keys, o.keys) and torch.equal(p.values, o.values)


def test_fp16_answers_do_not_change(model):
    """The forks still hold the prompt minus its last token and generate feeds it: an FP16 fork's
    greedy tokens are those of the plain prefill's."""
    ids, mask = inputs(9)
    runs = []
    for pre in (prefill(model, ids, mask), attend_last_query(model, prefill(model, ids, mask))):
        cache, _ = fork(pre, RunSpec("fp16", "fp16"), model)
        runs.append(decode(model, pre, cache, 8)[0])
    assert torch.equal(runs[0], runs[1])


def test_a_smartkv_fork_reads_the_extended_statistics(model):
    """The fork's tracker copy starts from the statistics with the last query in them."""
    ids, mask = inputs(0)
    pre = attend_last_query(model, prefill(model, ids, mask))
    cache, _ = fork(pre, RunSpec("smartkv", "smartkv", {"budget": 0.35, "signal": "cumulative"}), model)
    got = cache.tracker.layers[0].cumulative.float()
    want = pre.cache.tracker.layers[0].cumulative
    if got.shape[1] == 1:  # the cache keeps one statistic per layer (granularity "layer"): heads summed
        want = want.sum(1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the cache keeps FP16


def test_a_prefill_without_statistics_is_left_alone(model):
    ids, mask = inputs(0)
    pre = prefill(model, ids, mask, track=False)
    seconds = pre.seconds
    assert attend_last_query(model, pre) is pre
    assert pre.cache.get_seq_length() == T - 1 and pre.seconds == seconds


def test_a_prefill_already_extended_is_refused(model):
    ids, mask = inputs(0)
    pre = attend_last_query(model, prefill(model, ids, mask))
    pre.input_ids = pre.input_ids[:, :-1]  # now the cache holds the whole (shorter) prompt
    pre.attention_mask = pre.attention_mask[:, :-1]
    with pytest.raises(ValueError, match=r"expects a prefill of the prompt minus its last token \(118 tokens\); "
                                         r"the cache holds 119"):
        attend_last_query(model, pre)
