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


def cell_key(task: str, length: int) -> str:
    """How matched_budgets.json names a cell of the task grid: "niah@1024"."""
    return f"{task}@{int(length)}"


def parse_cell(key: str) -> tuple[str, int]:
    task, _, length = key.rpartition("@")
    return task, int(length)


def measure(baselines: pd.DataFrame, labels: list[str]) -> dict:
    """{split: {label: {kv_ratio, kv_ratio_min, kv_ratio_max, n_prompts[, by_cell]}}} over measured rows.

    `kv_ratio` is the mean over the accuracy prompts, the memory `metrics/main.json` reports.
    With more than one cell of the grid (task x prompt length, perplexity's rows included),
    `by_cell` holds the mean in each ({"niah@1024": r, "perplexity@1024": r, ...}): a
    baseline's share of FP16 bytes depends on the tokens it holds (KIVI's full-precision
    residual is a larger share of a short prompt; a perplexity row holds its 512 scored
    tokens too), so SmartKV is matched cell by cell."""
    ok = baselines[(baselines["error"] == "") & baselines["kv_ratio"].notna()]
    accuracy = ok[ok["metric"] != "perplexity"] if "metric" in ok and (ok["metric"] != "perplexity").any() else ok
    out: dict = {}
    for split, rows in ok.groupby("split", sort=True):
        out[split] = {}
        acc = accuracy[accuracy["split"] == split]
        for label in labels:
            mine = rows[rows["run"] == label]
            r = acc.loc[acc["run"] == label, "kv_ratio"]
            if r.empty:
                log.warning("match: baseline %s has no measured rows on the %s seeds", label, split)
                continue
            out[split][label] = {"kv_ratio": round(float(r.mean()), DIGITS),
                                 "kv_ratio_min": round(float(r.min()), DIGITS),
                                 "kv_ratio_max": round(float(r.max()), DIGITS), "n_prompts": int(len(r))}
            if {"task", "context_length"} <= set(mine) and len(mine.groupby(["task", "context_length"])) > 1:
                by = mine.groupby(["task", "context_length"])["kv_ratio"].mean()
                out[split][label]["by_cell"] = {cell_key(t, n): round(float(v), DIGITS) for (t, n), v in by.items()}
    return out


def budgets(measured: dict, split: str) -> dict[str, float | dict[tuple[str, int], float]]:
    """label -> SmartKV budget on `split` (or {(task, prompt length): budget} where `measure`
    found several cells); a baseline above FP16's bytes, in any cell, cannot be matched."""
    out: dict = {}
    for label, m in measured.get(split, {}).items():
        by = {parse_cell(k): v for k, v in m["by_cell"].items()} if m.get("by_cell") else None
        ratios = list(by.values()) if by else [m["kv_ratio"]]
        bad = [r for r in ratios if math.isnan(r) or not 0.0 < r <= 1.0]
        if bad:
            log.warning("match: %s holds %.3f of FP16's bytes; a SmartKV budget must lie in (0, 1], skipped",
                        label, bad[0])
            continue
        out[label] = by if by else m["kv_ratio"]
    return out
