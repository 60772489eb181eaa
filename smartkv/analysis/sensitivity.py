"""The hypothesis test: is quantizing high-attention tokens more harmful than low-attention ones?

At equal bytes, per layer, a fraction k of the prompt's tokens goes to `low_bits` and the rest
to `high_bits`; the k tokens are the top-k by an attention score, the bottom-k, or a random k.
If attention marks the tokens whose error hurts (the premise of SmartKV, and of MiKV and
ZipCache), top-k at low precision must hurt more than bottom-k at the same bytes.

Scores, per layer and prompt token (summed over KV heads):
- `window`: attention of the last `obs_window` prompt queries, average-pooled over
  `pool_kernel` neighbours (SnapKV, Li et al. 2024; kvpress's SnapKVPress);
- `accumulated`: attention summed over every prompt query (H2O, Zhang et al. 2023).

The first `sink_tokens` tokens stay at full precision in every condition (as in the SmartKV
cache), so a condition never differs from another just by quantizing the attention sinks.

Effect on the answer, teacher-forced over the gold answer's tokens: KL(FP16 || quantized) of
the next-token distribution (mean over answer positions), the gold answer's log-likelihood,
and exact match (greedy argmax right at every answer position). The cache is quantized and
de-quantized in place (`smartkv.analysis.simulate`): a simulation, not the measured method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.analysis.recorder import Recording
from smartkv.analysis.simulate import simulate_quantize
from smartkv.cache.base import KVCache, clear_active_update
from smartkv.cache.fp16 import FP16Layer

SELECTIONS = ("top", "bottom", "random")
SCORES = ("window", "accumulated")


@dataclass(frozen=True)
class Condition:
    """One precision pattern: `uniform` bits everywhere, or k tokens per layer at low bits chosen by `selection`."""

    label: str
    rotate: bool
    selection: str | None = None  # top | bottom | random; None for a uniform or FP16 condition
    score: str | None = None  # window | accumulated; None for random / uniform
    fraction: float = 0.0
    uniform: int | None = None  # bits of a uniform condition; 16 = FP16 reference


def conditions(fractions: list[float], rotations: tuple[bool, ...] = (False, True), low: int = 2,
               high: int = 4) -> list[Condition]:
    """FP16, uniform `high` and `low` anchors, then top/bottom (per score) and random for each k."""
    out = [Condition("fp16", False, uniform=16)]
    for rot in rotations:
        r = "-rot" if rot else ""
        out += [Condition(f"int{high}{r}", rot, uniform=high), Condition(f"int{low}{r}", rot, uniform=low)]
        for k in fractions:
            tag = f"k{round(100 * k)}"
            for score in SCORES:
                for sel in ("top", "bottom"):
                    out.append(Condition(f"{sel}-{score}-{tag}{r}", rot, sel, score, k))
            out.append(Condition(f"random-{tag}{r}", rot, "random", None, k))
    return out


def _avg_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    if kernel <= 1:
        return x
    return torch.nn.functional.avg_pool1d(x[:, None], kernel, stride=1, padding=kernel // 2,
                                          count_include_pad=False)[:, 0]


def layer_scores(rec: Recording, score: str, pool_kernel: int = 5) -> torch.Tensor:
    """[layers, T] attention score of every cached prompt token, summed over KV heads."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; allowed: {SCORES}")
    tracker = rec.window_tracker if score == "window" else rec.tracker
    n = len(rec.cache.layers)
    s = torch.stack([tracker.layers[i].cumulative[0].sum(0) for i in range(n)])
    return _avg_pool(s, pool_kernel) if score == "window" else s


def low_mask(scores: torch.Tensor, fraction: float, selection: str, sinks: int, generator: torch.Generator) -> torch.Tensor:
    """bool [T]: the round(fraction * (T - sinks)) tokens after the sinks chosen by `selection`."""
    t = scores.shape[0]
    n = t - sinks
    k = int(round(fraction * n))
    mask = torch.zeros(t, dtype=torch.bool)
    if k <= 0 or n <= 0:
        return mask
    if selection == "random":
        pick = torch.randperm(n, generator=generator)[:k]
    elif selection in ("top", "bottom"):
        # stable sort: ties broken by position, the same way for top and bottom
        order = torch.sort(scores[sinks:].double(), descending=selection == "top", stable=True).indices
        pick = order[:k]
    else:
        raise ValueError(f"unknown selection {selection!r}; allowed: {SELECTIONS}")
    mask[sinks + pick] = True
    return mask


def bits_per_layer(cond: Condition, rec: Recording, *, low: int, high: int, sinks: int, pool_kernel: int,
                   seed: int, scores: dict | None = None) -> list[torch.Tensor]:
    """The bit width of every cached token in every layer under `cond` (0 = left at full precision)."""
    n, t = len(rec.cache.layers), rec.cache.layers[0].keys.shape[-2]
    if cond.uniform is not None:
        b = torch.full((t,), 0 if cond.uniform == 16 else cond.uniform, dtype=torch.long)
        b[:sinks] = 0
        return [b] * n
    gen = torch.Generator().manual_seed(seed)
    s = None if cond.selection == "random" else (scores or {}).get(cond.score)
    if s is None and cond.selection != "random":
        s = layer_scores(rec, cond.score, pool_kernel)
    out = []
    for layer in range(n):
        row = torch.zeros(t) if s is None else s[layer]
        mask = low_mask(row, cond.fraction, cond.selection, sinks, gen)
        b = torch.where(mask, low, high).long()
        b[:sinks] = 0
        out.append(b)
    return out


class QuantizedLevels:
    """Every cached token of every layer de-quantized at each width, computed once per prompt.

    Groups run along head_dim (per token), so a token's de-quantized values do not depend on
    which other tokens share its width: any precision pattern is a per-token pick among
    these levels, and 25 conditions cost 6 quantizations instead of 25.
    """

    def __init__(self, rec: Recording, widths: tuple[int, ...], group_size: int = 32):
        self.rec = rec
        self.keys: dict[tuple[bool, int], list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        for b in widths:
            for rot in (False, True):
                self.keys[(rot, b)] = [_all_at(layer.keys, b, group_size, rot) for layer in rec.cache.layers]
            self.values[b] = [_all_at(layer.values, b, group_size, False) for layer in rec.cache.layers]

    def pick(self, layer: int, bits: torch.Tensor, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer` with token t at `bits[t]` (0 = the FP16 original)."""
        src = self.rec.cache.layers[layer]
        k, v = src.keys.clone(), src.values.clone()
        for b in bits.unique().tolist():
            if b == 0:
                continue
            sel = bits == b
            k[:, :, sel] = self.keys[(rotate, b)][layer][:, :, sel]
            v[:, :, sel] = self.values[b][layer][:, :, sel]
        return k, v


def _all_at(x: torch.Tensor, bits: int, group_size: int, rotate: bool) -> torch.Tensor:
    return simulate_quantize(x, torch.full((x.shape[-2],), bits, dtype=torch.long), group_size, rotate=rotate)


@torch.no_grad()
def teacher_forced_logprobs(model, rec: Recording, layer_bits: list[torch.Tensor], answer_ids: torch.Tensor,
                            group_size: int = 32, rotate: bool = False, levels: QuantizedLevels | None = None) -> torch.Tensor:
    """Log-probabilities [n, vocab] at each answer position, reading a cache quantized per `layer_bits`.

    Feeds the prompt's last token and the answer minus its last token in one forward pass;
    position i predicts answer token i. Keys are rotated when `rotate`; values never are.
    `levels` (optional) supplies pre-computed de-quantized tokens; the result is the same.
    """
    if levels is None:
        levels = _DirectLevels(rec, group_size)
    return teacher_forced_batch(model, rec, [(layer_bits, rotate)], answer_ids, levels)[0]


class _DirectLevels:
    """`QuantizedLevels.pick` computed on demand (one pattern, no pre-computation)."""

    def __init__(self, rec: Recording, group_size: int):
        self.rec, self.group_size = rec, group_size

    def pick(self, layer: int, bits: torch.Tensor, rotate: bool):
        src = self.rec.cache.layers[layer]
        return (simulate_quantize(src.keys, bits, self.group_size, rotate=rotate),
                simulate_quantize(src.values, bits, self.group_size, rotate=False))


@torch.no_grad()
def teacher_forced_batch(model, rec: Recording, patterns: list[tuple[list[torch.Tensor], bool]],
                         answer_ids: torch.Tensor, levels) -> torch.Tensor:
    """`teacher_forced_logprobs` for several (layer_bits, rotate) patterns in one batched forward: [P, n, vocab].

    Batching reads the weights once for all patterns (a 6-token forward is bound by weight reads).
    """
    cache = KVCache([FP16Layer() for _ in rec.cache.layers], "simulated", None, None)
    for idx in range(len(rec.cache.layers)):
        picked = [levels.pick(idx, bits[idx], rot) for bits, rot in patterns]
        k = torch.cat([p[0] for p in picked]).to(model.dtype)
        v = torch.cat([p[1] for p in picked]).to(model.dtype)
        cache.update(k, v, idx)
    feed = torch.cat([rec.input_ids[:, -1:], answer_ids[None, :-1]], dim=1).expand(len(patterns), -1)
    logits = model(input_ids=feed, past_key_values=cache, use_cache=True).logits
    clear_active_update()
    return torch.log_softmax(logits.float(), dim=-1)


def answer_metrics(logp: torch.Tensor, ref: torch.Tensor, answer_ids: torch.Tensor) -> dict:
    """KL(ref || logp) mean over positions, gold log-likelihood (sum), exact match, first-position KL."""
    kl = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0.0)
    gold = logp.gather(1, answer_ids[:, None])[:, 0]
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "gold_logprob": float(gold.sum()),
        "exact": bool((logp.argmax(-1) == answer_ids).all()),
    }


def run_prompt(model, rec: Recording, answer_ids: torch.Tensor, conds: list[Condition], *, low: int = 2,
               high: int = 4, group_size: int = 32, sinks: int = 4, pool_kernel: int = 5, seed: int = 0, batch: int = 13) -> list[dict]:
    """Every condition on one recorded prompt; one row per condition (FP16 first: it is the reference)."""
    if not conds or conds[0].uniform != 16:
        raise ValueError("the first condition must be the FP16 reference (uniform=16)")
    scores = {s: layer_scores(rec, s, pool_kernel) for s in SCORES}
    widths = tuple(sorted({low, high} | {c.uniform for c in conds if c.uniform not in (None, 16)}))
    levels = QuantizedLevels(rec, widths, group_size)
    n_tokens = rec.cache.layers[0].keys.shape[-2]
    all_bits = [bits_per_layer(cond, rec, low=low, high=high, sinks=sinks, pool_kernel=pool_kernel,
                               # the random draw depends on the prompt seed and k only: -rot and plain see the same tokens
                               seed=seed * 1000 + int(round(1000 * cond.fraction)), scores=scores) for cond in conds]
    logps = []
    for c0 in range(0, len(conds), batch):
        pats = [(all_bits[i], conds[i].rotate) for i in range(c0, min(len(conds), c0 + batch))]
        logps.extend(teacher_forced_batch(model, rec, pats, answer_ids, levels).unbind(0))
    ref = logps[0]
    rows = []
    for cond, bits, logp in zip(conds, all_bits, logps):
        quant = int(sum(int((b > 0).sum()) for b in bits))
        mean_bits = float(sum(int(b.sum()) for b in bits) / quant) if quant else 16.0
        rows.append({"condition": cond.label, "selection": cond.selection or "uniform", "score": cond.score or "",
                     "fraction": cond.fraction, "rotate": cond.rotate, "uniform_bits": cond.uniform or 0,
                     "mean_quant_bits": mean_bits, "prompt_tokens": n_tokens + 1,
                     **answer_metrics(logp, ref, answer_ids)})
    return rows
