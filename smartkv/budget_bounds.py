"""Does every SmartKV row hold what its budget allows, and no less than it could use?

A budget is a cap on everything the cache keeps (tracker included), so a row's `kv_ratio`
must not exceed its `budget`; a row far below it leaves bytes unspent. The study's target
is `kv_ratio` in [budget − slack, budget] for every SmartKV row (slack: the stats param
`memory_tolerance`). Rows with an error (a budget below the floor) hold no scored cache and
are counted apart.
"""

from __future__ import annotations

import math

import pandas as pd


def budget_bounds(rows: pd.DataFrame, slack: float) -> dict:
    """{"slack", "all_within", "runs": {run: {n, n_error, budget_min, budget_max, gap_min,
    gap_max, n_over, n_under}}} over the rows whose `method` is smartkv; gap = kv_ratio − budget."""
    if not math.isfinite(slack) or slack < 0:
        raise ValueError(f"slack={slack!r}: a finite fraction >= 0")
    out: dict = {}
    sk = rows[rows["method"] == "smartkv"] if len(rows) else rows
    for run, g in sk.groupby("run", sort=False):
        failed = g["error"].fillna("").astype(str) != "" if "error" in g else pd.Series(False, index=g.index)
        ok = g[~failed & g["budget"].notna() & g["kv_ratio"].notna()]
        gap = ok["kv_ratio"] - ok["budget"]
        out[run] = {"n": int(len(ok)), "n_error": int(failed.sum()),
                    "budget_min": float(ok["budget"].min()) if len(ok) else math.nan,
                    "budget_max": float(ok["budget"].max()) if len(ok) else math.nan,
                    "gap_min": float(gap.min()) if len(ok) else math.nan,
                    "gap_max": float(gap.max()) if len(ok) else math.nan,
                    # a float32 ratio of integers may sit a rounding step above an exact cap
                    "n_over": int((gap > 1e-9).sum()), "n_under": int((gap < -slack).sum())}
    within = all(r["n_over"] == 0 and r["n_under"] == 0 for r in out.values())
    return {"slack": float(slack), "all_within": bool(out) and within, "runs": out}
