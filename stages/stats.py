"""Stage `stats`: summaries over seeds, paired tests at matched memory, metrics and a markdown table.

Reads data/{baselines,smartkv,ablations}.parquet. Writes
- data/summary.parquet (run x task: mean ± std over seeds), data/tests.parquet (paired tests);
- metrics/main.json (per run: accuracy over tasks, KV memory), metrics/tasks.json (per run x task),
  metrics/significance.json, metrics/ablations.json: deterministic, identical on a re-run;
- metrics/main_table.md.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from smartkv.study.params import ParamError, section, study_split
from smartkv.study.runs import HEADLINE
from stages.common import DATA, METRICS, read_results, stage_main

log = logging.getLogger("stages.stats")
TIMING_KEYS = ("tokens_per_s", "tokens_per_s_median")


def stats_settings(params: dict) -> dict:
    s = section(params, "stats")
    tol = s.get("memory_tolerance", 0.02)
    if not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ParamError(f"stats.memory_tolerance={tol!r} must lie in [0, 1)")
    seed = s.get("bootstrap_seed", 0)
    if not isinstance(seed, int):
        raise ParamError(f"stats.bootstrap_seed={seed!r} must be an integer")
    return {"memory_tolerance": float(tol), "bootstrap_seed": seed}


def matched_target(base_ratio: float, targets: pd.Series, tol: float) -> tuple[str, str]:
    """The SmartKV run to compare a baseline with: the one with the most memory not above the
    baseline's (+ tol), so SmartKV never gets more bytes; failing that, the nearest."""
    ok = targets[targets <= base_ratio + tol]
    if len(ok):
        return str(ok.idxmax()), "at_or_below_baseline_memory"
    return str((targets - base_ratio).abs().idxmin()), "nearest_above"


def matched_tests(df: pd.DataFrame, overall: pd.DataFrame, settings: dict) -> pd.DataFrame:
    from smartkv.stats import paired_tests

    fam = overall.set_index("run")
    targets = fam[(fam["family"] == "smartkv") & fam["kv_ratio"].notna()]["kv_ratio"]
    bases = fam[fam["family"].isin(["baseline", "peer"])]
    frames = []
    for base, row in bases.iterrows():
        if targets.empty or math.isnan(row["kv_ratio"]):
            continue
        target, how = matched_target(row["kv_ratio"], targets, settings["memory_tolerance"])
        t = paired_tests(df, target, [base], per_task=True, seed=settings["bootstrap_seed"])
        t["target_kv_ratio"], t["baseline_kv_ratio"], t["match"] = targets[target], row["kv_ratio"], how
        frames.append(t)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    # Holm over the pooled ("all") comparisons, the family of tests the report's claims rest on.
    from smartkv.stats import _holm

    out["p_t_holm"] = np.nan
    pooled = out["task"] == "all"
    out.loc[pooled, "p_t_holm"] = _holm(out.loc[pooled, "p_t"].to_numpy(dtype=float))
    return out


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return obj


def overall_json(ov: pd.DataFrame) -> dict:
    from smartkv.stats import _leaves

    return {r["run"]: _leaves({"score_mean": r["score_mean"], "score_std": r["score_std"],
                               "kv_ratio": r["kv_ratio"]}) for _, r in ov.iterrows()}


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json, atomic_write_parquet, atomic_write_text, provenance
    from smartkv.stats import markdown_table, metrics_json, overall, paired_tests, summarize

    settings = stats_settings(params)
    split = study_split(params)
    main_df = read_results("baselines", "smartkv", split=split)
    abl_df = read_results("ablations", split=split)
    summary = summarize(main_df)
    ov = overall(main_df)
    tests = matched_tests(main_df, ov, settings)

    head = main_df[main_df["run"] == HEADLINE]
    abl_all = pd.concat([head, abl_df], ignore_index=True)
    abl_summary = summarize(abl_all)
    abl_ov = overall(abl_all)
    # A run whose every row fell below its budget's floor has nothing to pair: it stays in the
    # summary (with its error rows counted) and is left out of the tests, with a warning.
    scored = [r for r in dict.fromkeys(abl_df["run"]) if abl_df.loc[abl_df["run"] == r, "score"].notna().any()]
    for r in dict.fromkeys(abl_df["run"]):
        if r not in scored:
            log.warning("ablation %s has no scored rows (all below the budget floor); not tested", r)
    abl_tests = paired_tests(abl_all, HEADLINE, scored, seed=settings["bootstrap_seed"])

    prov = provenance({"stats": settings})
    atomic_write_parquet(summary, DATA / "summary.parquet", prov)
    atomic_write_parquet(abl_summary, DATA / "ablation_summary.parquet", prov)
    atomic_write_parquet(tests if not tests.empty else pd.DataFrame({"target": []}), DATA / "tests.parquet", prov)
    atomic_write_parquet(abl_tests, DATA / "ablation_tests.parquet", prov)

    atomic_write_json(METRICS / "main.json", {"runs": overall_json(ov)})
    atomic_write_json(METRICS / "tasks.json", strip_timing(metrics_json(summary)))
    sig = strip_timing(metrics_json(summary.iloc[0:0], tests if not tests.empty else None))
    sig.pop("runs", None)
    atomic_write_json(METRICS / "significance.json", sig)
    abl = {"runs": overall_json(abl_ov)}
    oracle = [r for r in abl_df["run"].unique() if "oracle" in r]
    if oracle:  # regret of each allocation policy against the oracle's
        ref = abl_ov.set_index("run")["score_mean"]
        abl["regret_vs_" + oracle[0]] = {r: float(ref[oracle[0]] - ref[r]) for r in ref.index
                                         if r != oracle[0] and not math.isnan(ref[r] - ref[oracle[0]])}
    abl["tests"] = strip_timing(metrics_json(abl_summary.iloc[0:0], abl_tests)).get("tests", {})
    atomic_write_json(METRICS / "ablations.json", abl)
    atomic_write_text(METRICS / "main_table.md", markdown_table(summary))
    log.info("main table:\n%s", markdown_table(summary))


if __name__ == "__main__":
    main()
