"""Where the default model's attention goes: per-layer and per-KV-head statistics.

The statistics come from the `ImportanceTracker` SmartKV's cache uses (via
`smartkv.analysis.recorder`), in three phases:
- `prefill`: the attention every prompt query paid (the H2O-style accumulated signal);
- `window`: the last `obs_window` prompt queries only (SnapKV's observation window, where
  the question sits);
- `decode`: the first greedy decode steps, which read the cache the way generation does.

Per (phase, layer, KV head) over the cached tokens: `mean` and `var` of the attention a token
receives per query that can see it (the tracker's `normalized` signal, ZipCache's), the
entropy of the received-mass distribution (nats, and over log T), the share of that mass
on the top 1% and 10% of tokens, on the attention sinks (first tokens), on the needle and
on the question. Grouped-query heads add up into their KV head, as in the tracker.
"""

from __future__ import annotations

import math

import torch

from smartkv.importance import ImportanceTracker

STATS = ("mean", "var", "entropy", "entropy_norm", "top1_share", "top10_share", "sink_share",
         "needle_share", "question_share")


def _share_top(p: torch.Tensor, frac: float) -> float:
    k = max(1, int(math.ceil(frac * p.numel())))
    return float(torch.topk(p, k).values.sum())


def head_stats(mass: torch.Tensor, per_query: torch.Tensor, *, sinks: int, needle: tuple[int, int] | None,
               question: tuple[int, int] | None) -> dict:
    """Statistics of one head: `mass` [T] received attention, `per_query` [T] mass per query that saw the token."""
    total = float(mass.sum())
    p = mass.double() / total if total > 0 else torch.full_like(mass, 1.0 / max(1, mass.numel()), dtype=torch.float64)
    nz = p[p > 0]
    ent = float(-(nz * nz.log()).sum())
    t = p.numel()

    def span(s):
        return float(p[s[0]:s[1]].sum()) if s is not None else math.nan

    return {
        "mean": float(per_query.mean()),
        "var": float(per_query.var(unbiased=False)),
        "entropy": ent,
        "entropy_norm": ent / math.log(t) if t > 1 else math.nan,
        "top1_share": _share_top(p, 0.01),
        "top10_share": _share_top(p, 0.10),
        "sink_share": float(p[:sinks].sum()),
        "needle_share": span(needle),
        "question_share": span(question),
    }


def tracker_rows(tracker: ImportanceTracker, phase: str, *, n_layers: int, sinks: int, groups: int,
                 needle=None, question=None, n_tokens: int | None = None) -> list[dict]:
    """One row per (layer, KV head) of `tracker`; `groups` query heads share a KV head.

    `n_tokens` limits the statistics to the first tokens (the prompt), e.g. for decode-phase
    mass that also falls on the tokens decoding added.
    """
    rows = []
    for layer in range(n_layers):
        li = tracker.layers.get(layer)
        if li is None:
            continue
        cum = li.cumulative[0]
        count = li.count[0].clamp(min=1.0)
        if n_tokens is not None:
            cum, count = cum[:, :n_tokens], count[:n_tokens]
        for head in range(cum.shape[0]):
            per_query = cum[head] / (count * groups)
            # decode steps take the tracker's one-query fast path, which keeps no entropy: NaN, not 0
            q_ent = li.entropy if li.entropy_rows else math.nan
            rows.append({"phase": phase, "layer": layer, "head": head, "query_entropy": q_ent,
                         **head_stats(cum[head], per_query, sinks=sinks, needle=needle, question=question)})
    return rows


def layer_distribution(tracker: ImportanceTracker, n_layers: int, n_tokens: int | None = None) -> torch.Tensor:
    """[layers, T] share of each layer's received attention per token (heads summed), rows sum to 1."""
    out = []
    for layer in range(n_layers):
        m = tracker.layers[layer].cumulative[0].sum(0)
        if n_tokens is not None:
            m = m[:n_tokens]
        out.append(m / m.sum().clamp_min(1e-30))
    return torch.stack(out)


def char_span_to_tokens(offsets: list[tuple[int, int]], span: tuple[int, int] | list[int]) -> tuple[int, int] | None:
    """Token range [start, end) of the tokens overlapping the char span [a, b) (offsets from the tokenizer)."""
    a, b = span
    idx = [i for i, (s, e) in enumerate(offsets) if e > a and s < b and e > s]
    return (idx[0], idx[-1] + 1) if idx else None


def summarize(rows: list[dict] | "object") -> dict:
    """Mean of every statistic per phase: overall, per layer, per (layer, head); JSON-ready (NaN -> None)."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    cols = [c for c in ("query_entropy",) + STATS if c in df.columns]

    def clean(d: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else float(v)) for k, v in d.items()}

    out = {}
    for phase, g in df.groupby("phase", sort=False):
        per_layer = g.groupby("layer")[cols].mean()
        per_head = g.groupby(["layer", "head"])[cols].mean()
        out[phase] = {
            "n_prompts": int(g["sample_id"].nunique()) if "sample_id" in g else None,
            "overall": clean(g[cols].mean().to_dict()),
            "layers": {f"L{layer:02d}": {**clean(r.to_dict()),
                                         "heads": {f"H{h}": clean(per_head.loc[(layer, h)].to_dict())
                                                   for h in sorted(g.loc[g["layer"] == layer, "head"].unique())}}
                       for layer, r in per_layer.iterrows()},
        }
    return out
