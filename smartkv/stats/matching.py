"""Which SmartKV run each baseline is compared with, and why.

Memory is a run's measured `kv_ratio` (bytes held / FP16 bytes for the same tokens),
averaged over its accuracy prompts (perplexity rows excluded; see `summary.run_memory`).

1. Exact label: a run labelled `smartkv@<baseline>` (e.g. `smartkv@int3`) was run at that
   baseline's measured bytes; it is the baseline's partner whatever its measured memory.
2. Fallback: among the SmartKV runs, the one with the most memory not above the
   baseline's plus `tolerance`, so SmartKV never gets more bytes than that; failing that,
   the one nearest in memory (SmartKV then holds more bytes, and the reason says so).
"""

from __future__ import annotations


import pandas as pd

EXACT_PREFIX = "smartkv@"
MATCH_COLUMNS = ["baseline", "target", "baseline_kv_ratio_run", "target_kv_ratio_run", "memory_gap",
                 "match", "match_reason"]


def match_baselines(memory: pd.Series, family: pd.Series, tolerance: float = 0.02) -> pd.DataFrame:
    """One row per baseline/peer run with a measured memory: its SmartKV partner, both runs'
    memory, gap = target - baseline, `match` (exact_label / at_or_below / nearest_above)
    and a sentence `match_reason`. `memory` and `family` are indexed by run."""
    runs = pd.DataFrame({"kv": memory, "family": family}).dropna(subset=["kv"])
    targets = runs[runs["family"] == "smartkv"]["kv"]
    rows = []
    for base, kv in runs[runs["family"].isin(["baseline", "peer"])]["kv"].items():
        exact = EXACT_PREFIX + str(base)
        if exact in targets.index:
            target, how = exact, "exact_label"
            why = f"`{exact}` was run at `{base}`'s measured bytes"
        elif targets.empty:
            continue
        else:
            ok = targets[targets <= kv + tolerance]
            if len(ok):
                target, how = str(ok.idxmax()), "at_or_below"
                why = (f"most memory among the {len(targets)} SmartKV runs at or below `{base}`'s "
                       f"{kv:.3f} + tolerance {tolerance:g}")
            else:
                target, how = str((targets - kv).abs().idxmin()), "nearest_above"
                why = (f"no SmartKV run at or below `{base}`'s {kv:.3f} + {tolerance:g}: nearest "
                       f"in memory, with {targets[target] - kv:+.3f} more (favours SmartKV)")
        rows.append({"baseline": base, "target": target, "baseline_kv_ratio_run": kv,
                     "target_kv_ratio_run": float(targets[target]),
                     "memory_gap": float(targets[target] - kv), "match": how, "match_reason": why})
    return pd.DataFrame(rows, columns=MATCH_COLUMNS)

