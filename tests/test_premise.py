"""SmartKV's premise: the tokens attention reads get the bits (issue 35).

The plumbing tests elsewhere pass with a broken ranking (least-attended tokens given the most
bits) or with no attention signal at all; these tests do not. Each one must fail under the
mutations `scripts/mutation_check.py` applies (reversed ranking, zeroed tracker):

- planted attention, tiny model: tokens whose tracker statistics are overwritten with high
  importance hold more bits after the first decode step than the other quantized tokens;
- the default model on 1k-token passkey prompts: the needle's tokens hold more bits than the
  haystack's median, and attention-ranked allocation beats `allocation: random` and a reversed
  ranking on the gold answer's teacher-forced log-likelihood and KL from FP16 (continuous
  measures: over six prompts a right/wrong bit per prompt has little power).

The tiny-model tests take about a second; the default-model ones (marked slow) share one module
fixture, about 40 s on two cores.
"""

import pytest
import torch

from smartkv.answer_scores import answer_measures, target_ids
from smartkv.evaluate import needle_bits, needle_token_span
from smartkv.models import load_model
from smartkv.runner import RunSpec, decode, encode, forced_logits, fork, prefill
from smartkv.tasks import generate_task

PROMPT_LEN = 256
# Two spans in the middle of the prompt: clear of the 4 sink tokens and of the FP16 window at the end.
PLANTED = torch.tensor(list(range(40, 60)) + list(range(150, 170)))
EVICTING = (0, 2, 3, 4, 8)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def _plant(pre, positions: torch.Tensor, high: float = 1.0, low: float = 1e-3) -> None:
    """Overwrite every per-head statistic of the prefill's tracker: `high` at `positions`, `low` elsewhere."""
    for li in pre.cache.tracker.layers.values():
        for name in ("cumulative", "ema", "window"):
            stat = getattr(li, name)
            planted = torch.full_like(stat, low)
            planted[..., positions] = high
            setattr(li, name, planted)


def _per_token_bits(cache, n: int) -> torch.Tensor:
    """[layers, n] mean bits of each of the first `n` tokens over heads and K/V."""
    return torch.stack([layer.bits_map()[0, :, :n].mean(dim=(0, 2)) for layer in cache.layers])


@pytest.mark.parametrize("params", [
    {"budget": 0.3},
    {"budget": 0.2, "bits": EVICTING},  # with a 0-bit width some tokens are evicted to pay for others (asserted)
    {"budget": 0.3, "signal": "window", "realloc_freq": 0},
], ids=["b0.3", "b0.2-evicting", "b0.3-window-signal"])
def test_planted_attention_gets_more_bits(model, params):
    ids = torch.randint(3, 250, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    pre = prefill(model, ids, torch.ones_like(ids))
    _plant(pre, PLANTED)
    cache, _ = fork(pre, RunSpec("smartkv", "smartkv", params), model)
    decode(model, pre, cache, 1)  # the first decode step allocates the prompt
    n = PROMPT_LEN - 1
    bits = _per_token_bits(cache, n)
    planted = torch.zeros(n, dtype=torch.bool)
    planted[PLANTED] = True
    quantized = (bits < 16).all(0)  # sinks and the FP16 window hold 16 bits whatever their importance
    assert bool(quantized[PLANTED].all()), "a planted token sits in the sinks or the FP16 window"
    assert int((quantized & ~planted).sum()) > 100
    for layer, row in enumerate(bits):
        inside, outside = row[planted & quantized], row[~planted & quantized]
        # by a clear margin: with no signal (or a reversed one) the planted tokens are ordinary tokens
        assert float(inside.mean()) >= float(outside.mean()) + 0.5, (layer, inside.mean(), outside.mean())
        # and none of them below the others' median: the planted tokens are the ones upgraded
        assert float(inside.min()) >= float(outside.median()), (layer, inside.min(), outside.median())
    if 0 in params.get("bits", ()):
        assert float(bits[:, ~planted & quantized].min()) == 0.0  # the case evicts: the budget is binding
    assert cache.memory_report()["budget_met"]


def test_moving_the_plant_moves_the_bits(model):
    """The same prompt with attention planted on two disjoint spans: the bits follow the plant, not the tokens."""
    ids = torch.randint(3, 250, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    spans = (torch.arange(40, 70), torch.arange(120, 150))
    bits = []
    for span in spans:
        pre = prefill(model, ids, torch.ones_like(ids))
        _plant(pre, span)
        cache, _ = fork(pre, RunSpec("smartkv", "smartkv", {"budget": 0.3}), model)
        decode(model, pre, cache, 1)
        bits.append(_per_token_bits(cache, PROMPT_LEN - 1).mean(0))
    a, b = spans
    assert float(bits[0][a].mean()) >= float(bits[1][a].mean()) + 0.5
    assert float(bits[1][b].mean()) >= float(bits[0][b].mean()) + 0.5


# --- the default model on passkey prompts -------------------------------------------------------------

# Dev seeds (the study's test seeds are 0-5), 1k tokens, the needle at three depths: six prompts.
PASSKEY = dict(n_per_cell=1, lengths=[1024], depths=[0.2, 0.5, 0.8])
SEEDS = (100, 101)
# The budget where the ranking decides: at 0.2 most tokens sit at the 2-bit floor and the few bytes left
# go where the ranking says (at 0.25, random allocation came within 0.05 of attention's answer
# log-likelihood, or beat it, on four of these six prompts).
BUDGET = 0.2
VARIANTS = ("attention", "random", "reversed")


def _mirror(score):
    """`score` with its ranking reversed over tokens (max + min - s): the least-attended token gets the
    highest importance, the scale and the heads' totals stay comparable."""
    def mirrored(*args, **kwargs):
        s = score(*args, **kwargs)
        return s.amax(-1, keepdim=True) + s.amin(-1, keepdim=True) - s
    return mirrored


def _fork_variant(model, pre, variant: str):
    params = {"budget": BUDGET, **({"allocation": "random"} if variant == "random" else {})}
    cache, _ = fork(pre, RunSpec(variant, "smartkv", params), model)
    if variant == "reversed":  # this cache's statistics only: no library code changes
        for li in cache.tracker.layers.values():
            li.score = _mirror(li.score)
    return cache


@pytest.fixture(scope="module")
def passkey_runs():
    """Per variant, one row per prompt: the gold answer's teacher-forced measures and the needle's bits."""
    torch.set_num_threads(1)  # two cores shared with other work: one thread does not spin waiting on the other
    model, tok = load_model("default")
    samples = [s for seed in SEEDS for s in generate_task("passkey", tok, seed=seed, **PASSKEY)]
    rows = {v: [] for v in VARIANTS}
    for sample in samples:
        ids, mask = encode(tok, [sample.prompt])
        pre = prefill(model, ids, mask, keep=("ema",))  # the one statistic the smartkv variants read
        # what the prompt's end (the question) paid each token: the heads' sum, averaged over layers
        ema = torch.stack([li.score("ema")[0].sum(0) for li in pre.cache.tracker.layers.values()]).mean(0)
        first, last = needle_token_span(tok, sample)
        needle = torch.zeros(ema.shape[0], dtype=torch.bool)
        needle[first : last + 1] = True
        read = {"needle_attention": float(ema[needle].mean()), "haystack_attention": float(ema[~needle].median())}
        target = torch.tensor([target_ids(tok, sample.prompt, " " + sample.answers[0])])
        ref_cache, _ = fork(pre, RunSpec("fp16", "fp16"), model)
        ref = torch.log_softmax(forced_logits(model, pre, ref_cache, target)[0], dim=-1)
        for variant in VARIANTS:
            cache = _fork_variant(model, pre, variant)
            logits, _ = forced_logits(model, pre, cache, target)
            assert cache.memory_report()["budget_met"]
            rows[variant].append({**answer_measures(logits, target[0], ref), **read,
                                  **needle_bits(tok, sample, cache, ids.shape[1])})
    return rows


@pytest.mark.slow
def test_needle_holds_more_bits_than_the_haystack(passkey_runs):
    """The question reads the passkey, so the allocation should put its bits there: on every prompt the
    needle's mean bits clear the haystack's median by 0.2 bits (measured: 0.35 to 0.6; a reversed ranking
    or random allocation: under 0.1)."""
    for i, row in enumerate(passkey_runs["attention"]):
        # the premise's condition: the question reads the needle (measured: 7 to 17 times the haystack median)
        assert row["needle_attention"] >= 3 * row["haystack_attention"], (i, row)
        assert row["needle_bits"] >= row["haystack_bits"] + 0.2, (i, row["needle_bits"], row["haystack_bits"])


@pytest.mark.slow
def test_attention_ranking_beats_random_and_reversed(passkey_runs):
    """Continuous measures, not 0/1 outcomes: the gold answer's mean log-likelihood (teacher-forced) and
    the KL from FP16's next-token distribution, averaged over the six prompts. Measured at budget 0.2:
    log-likelihood -0.24 (attention), -0.48 (random), -0.47 (reversed); KL 0.07, 0.25, 0.22."""
    mean = {v: {m: sum(r[m] for r in rows) / len(rows) for m in ("answer_logprob", "kl_fp16")}
            for v, rows in passkey_runs.items()}
    att = mean["attention"]
    for other in ("random", "reversed"):
        assert att["answer_logprob"] >= mean[other]["answer_logprob"] + 0.1, (other, mean)
        assert att["kl_fp16"] <= 0.6 * mean[other]["kl_fp16"], (other, mean)
        wins = sum(a["answer_logprob"] > o["answer_logprob"]
                   for a, o in zip(passkey_runs["attention"], passkey_runs[other]))
        assert wins >= 4, (other, wins)  # on most prompts, not on one outlier
