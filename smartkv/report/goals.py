"""The study's targets, each judged from the pipeline's outputs: met or not, with its numbers.

"SmartKV ≥ X at X's bytes" is met when the paired accuracy difference (SmartKV − X) has a
point estimate ≥ 0 and a 95% CI whose lower bound is above −margin (the stats param
`noninferiority_margin`, 5 points by default): at least as good, and a loss of more than
the margin ruled out. A significant win is not needed, and a significant loss can never
pass. Each comparison is judged where it was measured: the main grid pooled, and each cell
of the matched-comparison stages (4k needles, RULER multikey, the second model) on its own,
so a cell that falls short is named even when the pooled row passes.
"""

from __future__ import annotations

import math

import pandas as pd

from smartkv.matched_tests import ORACLE_FAMILY
from smartkv.stats.tables import _p

FP16 = "fp16"
RANDOM = "random-alloc"  # the ablation that allocates at random under the same budget


def judge(mean_diff: float, ci_lo: float, margin: float) -> bool:
    return bool(math.isfinite(mean_diff) and math.isfinite(ci_lo) and mean_diff >= 0 and ci_lo > -margin)


def _row(where: str, r: dict, margin: float) -> dict:
    return {"where": where, "target": r["target"], "baseline": r["baseline"], "n": int(r["n_pairs"]),
            "target_kv": r.get("target_kv_ratio", math.nan), "baseline_kv": r.get("baseline_kv_ratio", math.nan),
            "target_mean": r["target_mean"], "baseline_mean": r["baseline_mean"], "mean_diff": r["mean_diff"],
            "ci_lo": r["ci_lo"], "ci_hi": r["ci_hi"], "p_holm": r.get("p_holm", math.nan),
            "met": judge(r["mean_diff"], r["ci_lo"], margin)}


def goal_rows(tests: pd.DataFrame | None, ablation_tests: pd.DataFrame | None, metrics: dict,
              margin: float) -> list[dict]:
    """Every accuracy comparison of SmartKV against a baseline or peer at its bytes, and the
    attention-guided run against random allocation, each judged by `judge`."""
    rows = []
    if tests is not None and len(tests) and "measure" in tests:
        # FP16 is the reference the budgets are fractions of, not a target at equal bytes
        main = tests[(tests["task"] == "all") & (tests["measure"] == "score") & (tests["baseline"] != FP16)]
        rows += [_row("main grid, pooled", r, margin) for r in main.to_dict("records")]
    for stage in ("passages", "extra_cells", "second_model"):
        m = metrics.get(stage) or {}
        for r in m.get("comparisons", []):
            # the oracle ranking is a ceiling that says why a needle was lost, not a target to meet
            if r.get("measure") == "score" and ORACLE_FAMILY not in str(r.get("family", "")):
                cell = "pooled" if r["task"] == "all" else r["task"]
                rows.append(_row(f"`{stage}` ({m.get('model')}), {cell}", r, margin))
    if ablation_tests is not None and len(ablation_tests):
        a = ablation_tests[(ablation_tests["task"] == "all") & (ablation_tests["measure"] == "score")
                           & (ablation_tests["baseline"] == RANDOM)]
        rows += [_row("ablations, pooled (same budget)", r, margin) for r in a.to_dict("records")]
    return rows


def goals_section(tests: pd.DataFrame | None, ablation_tests: pd.DataFrame | None, metrics: dict,
                  margin: float) -> list[str]:
    rows = goal_rows(tests, ablation_tests, metrics, margin)
    lines = [f"Each SmartKV run against the baseline or peer it is matched to: **met** when the accuracy "
             f"difference is ≥ 0 and its 95% CI excludes a loss of more than {margin * 100:.0f} points (cluster "
             "bootstrap, as in the significance tables). A significant win is not required; a cell is "
             "judged on its own, so a pooled pass does not hide a cell that falls short.", ""]
    if not rows:
        lines += ["_no matched comparisons were run_", ""]
    else:
        met = sum(r["met"] for r in rows)
        lines += [f"{met} of {len(rows)} met.", "",
                  "| where | SmartKV vs baseline | KV × FP16 s / b | accuracy s / b | Δ [95% CI] | n | Holm p | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['where']} | `{r['target']}` vs `{r['baseline']}` | {r['target_kv']:.3f} / "
                         f"{r['baseline_kv']:.3f} | {r['target_mean']:.3f} / {r['baseline_mean']:.3f} | "
                         f"{r['mean_diff']:+.3f} [{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}] | {r['n']} | "
                         f"{_p(r['p_holm'])} | {'**met**' if r['met'] else 'not met'} |")
        lines.append("")
    b = metrics.get("budgets")
    if b:
        over = [(s, run, v) for s, st in b["stages"].items() for run, v in st["runs"].items()
                if v["n_over"] or v["n_under"]]
        n = sum(v["n"] for st in b["stages"].values() for v in st["runs"].values())
        gaps = [v for st in b["stages"].values() for v in st["runs"].values() if v["n"]]
        if b["all_within"]:
            lines.append(f"Budgets: all {n} SmartKV rows (every stage, ablations included, tracker counted) hold "
                         f"a `kv_ratio` within [budget − {b['slack']:.2f}, budget]; kv_ratio − budget ranges over "
                         f"[{min(v['gap_min'] for v in gaps):+.4f}, {max(v['gap_max'] for v in gaps):+.4f}] "
                         "(`metrics/budgets.json`). **met**")
        else:
            lines.append(f"Budgets: **not met**: outside [budget − {b['slack']:.2f}, budget] in " + ", ".join(
                f"`{s}`/`{run}` ({v['n_over']} over, {v['n_under']} under, of {v['n']})" for s, run, v in over)
                + " (`metrics/budgets.json`).")
        lines.append("")
    return lines
