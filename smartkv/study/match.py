"""Matched memory: each baseline's KV bytes measured on the task set, as SmartKV budgets.

A comparison at matched memory needs both sides to hold the same bytes. The match stage
measures every chosen baseline's `kv_ratio` (KV bytes over FP16's for the same tokens,
every byte the cache holds counted) on each split's prompts; the smartkv stage then runs
SmartKV with exactly that budget (`smartkv@int3`). A budget is a cap: SmartKV's own
measured ratio can fall below it, never above, and both are reported.
"""

from __future__ import annotations

import logging
import math

import pandas as pd

log = logging.getLogger(__name__)
# Ratios are exact byte counts divided; rounding to 6 digits keeps the budgets (and so the
# smartkv stage's params) identical across machines whose float sums differ in the last bit.
DIGITS = 6


def measure(baselines: pd.DataFrame, labels: list[str]) -> dict:
    """{split: {label: {kv_ratio, kv_ratio_min, kv_ratio_max, n_prompts[, by_length]}}} over measured rows.

    `kv_ratio` is the mean over the accuracy prompts (perplexity's teacher-forced rows hold
    more tokens and are compared apart), the memory `metrics/main.json` reports. With prompts
    of several lengths, `by_length` holds the mean at each length ({"1024": r, ...}): a
    baseline's share of FP16 bytes depends on the length (KIVI's residual, sinks), so SmartKV
    is matched length by length."""
    ok = baselines[(baselines["error"] == "") & baselines["kv_ratio"].notna()]
    if "metric" in ok and (ok["metric"] != "perplexity").any():
        ok = ok[ok["metric"] != "perplexity"]
    out: dict = {}
    for split, rows in ok.groupby("split", sort=True):
        out[split] = {}
        for label in labels:
            r = rows.loc[rows["run"] == label, "kv_ratio"]
            if r.empty:
                log.warning("match: baseline %s has no measured rows on the %s seeds", label, split)
                continue
            out[split][label] = {"kv_ratio": round(float(r.mean()), DIGITS),
                                 "kv_ratio_min": round(float(r.min()), DIGITS),
                                 "kv_ratio_max": round(float(r.max()), DIGITS), "n_prompts": int(len(r))}
            if "context_length" in rows and rows["context_length"].nunique() > 1:
                by = rows.loc[rows["run"] == label].groupby("context_length")["kv_ratio"].mean()
                out[split][label]["by_length"] = {str(int(k)): round(float(v), DIGITS) for k, v in by.items()}
    return out


def budgets(measured: dict, split: str) -> dict[str, float | dict[int, float]]:
    """label -> SmartKV budget on `split` (or {prompt length: budget} where `measure` found
    several lengths); a baseline above FP16's bytes, at any length, cannot be matched."""
    out: dict = {}
    for label, m in measured.get(split, {}).items():
        by = {int(k): v for k, v in m["by_length"].items()} if m.get("by_length") else None
        ratios = list(by.values()) if by else [m["kv_ratio"]]
        bad = [r for r in ratios if math.isnan(r) or not 0.0 < r <= 1.0]
        if bad:
            log.warning("match: %s holds %.3f of FP16's bytes; a SmartKV budget must lie in (0, 1], skipped",
                        label, bad[0])
            continue
        out[label] = by if by else m["kv_ratio"]
    return out
