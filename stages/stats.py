"""Stage `stats`: summaries over seeds, paired tests at matched memory, metrics and a markdown table.

Reads data/{baselines,peers,smartkv,ablations}.parquet (and data/{second_model,extra_cells}.parquet
for the cell check and the budget bounds only). Writes
- data/summary.parquet (run x task: mean ± std over seeds), data/tests.parquet (paired tests of
  each baseline against its matched SmartKV run, per measure, pooled and per task);
- metrics/main.json (per run: mean of per-task means, pooled mean, KV memory), metrics/tasks.json
  (per run x task), metrics/significance.json, metrics/ablations.json, metrics/power.json (exact
  McNemar power), metrics/cells.json (each matched comparison cell by cell: does one cell of
  the grid carry it?), metrics/budgets.json (every SmartKV row's kv_ratio against its budget:
  within [budget − memory_tolerance, budget]?): deterministic, identical on a re-run;
- metrics/main_table.md: the per-task table, the matched comparisons and the power line.
"""

from __future__ import annotations

import logging
import math

import pandas as pd

from smartkv.study.params import stats_settings, study_split
from smartkv.study.labels import HEADLINE
from stages.common import DATA, METRICS, TASKS_FILE, read_results, read_section, stage_main

log = logging.getLogger("stages.stats")
TIMING_KEYS = ("tokens_per_s", "tokens_per_s_median")
MATCHED = "baselines vs matched SmartKV"
MATCHED_STAGES = ("second_model", "extra_cells", "passages")  # their rows, data/<stage>.parquet, join the cell check
ABLATIONS = "ablations vs headline"


def _test_kwargs(settings: dict, measure: str) -> dict:
    return {"measure": measure, "seed": settings["bootstrap_seed"], "alpha": settings["alpha"],
            "margin": settings["noninferiority_margin"] if measure == "score" else None}


def _family(name: str, measure: str, per_task: bool = False) -> str:
    return f"{name} [{measure}{', per task' if per_task else ''}]"


def matched_tests(df: pd.DataFrame, overall: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """Each baseline against its matched SmartKV run (see smartkv.stats.matching), on every
    measure the results carry; Holm within each (family, measure), per-task rows apart."""
    from smartkv.stats import apply_holm, match_baselines, measures_in, paired_tests

    fam = overall.set_index("run")
    matches = match_baselines(fam["kv_ratio"], fam["family"], settings["memory_tolerance"])
    frames = []
    for measure in measures_in(df):
        for m in matches.to_dict("records"):
            sub = df[df["run"].isin([m["target"], m["baseline"]])]
            if not (sub.groupby("run")[measure].count() > 0).all() or sub["run"].nunique() < 2:
                continue  # one side has no value for this measure (e.g. a peer without perplexity)
            t = paired_tests(sub, m["target"], [m["baseline"]], per_task=True, **_test_kwargs(settings, measure))
            t["family"] = [_family(MATCHED, measure, task != "all") for task in t["task"]]
            frames.append(t.assign(**{k: m[k] for k in ("match", "match_reason", "memory_gap")}))
    if not frames:
        return pd.DataFrame()
    return apply_holm(pd.concat(frames, ignore_index=True), settings["alpha"])


def cell_checks(df: pd.DataFrame, tests: pd.DataFrame) -> dict:
    """Each pooled 0/1 matched comparison one level up, cell by cell (task x length x depth;
    smartkv/cell_check.py): whether the win is spread over the grid or carried by one cell."""
    from smartkv.cell_check import CELL, cell_check

    # perplexity rows carry no score, and cell_check pairs scored prompts only
    pooled = tests[(tests["measure"] == "score") & (tests["task"] == "all")] if not tests.empty else tests
    return {"cells": list(CELL),
            "comparisons": [cell_check(df, r.target, r.baseline) for r in pooled.itertuples()],
            "matched_stages": matched_stage_cells()}


def smartkv_budget_bounds(main_raw: pd.DataFrame, abl_raw: pd.DataFrame, slack: float) -> dict:
    """metrics/budgets.json: every SmartKV row against its budget, per stage (smartkv/budget_bounds.py)."""
    from smartkv.budget_bounds import budget_bounds

    stages = {"smartkv": main_raw, "ablations": abl_raw}
    for stage in MATCHED_STAGES:
        stages[stage] = read_section(stage)[0]
    out = {stage: budget_bounds(df, slack) for stage, df in stages.items()}
    return {"slack": float(slack), "all_within": all(v["all_within"] for v in out.values()), "stages": out}


# The first revision whose forks rank from the prompt's last query (docs/internals.md, "The missing query").
LAST_QUERY_REVISION = "1f99189"
SMARTKV_PARTS = ("smartkv", "ablations", "extra_cells/smartkv", "second_model/smartkv", "passages/smartkv")


def has_last_query(revision: str) -> bool:
    """Whether rows of `revision` rank from the prompt's last query: it descends from LAST_QUERY_REVISION
    (a repository without that commit, such as a new study's, has only code after it)."""
    import subprocess

    def git(*args: str) -> int:
        return subprocess.run(["git", *args], capture_output=True).returncode

    if git("cat-file", "-e", f"{LAST_QUERY_REVISION}^{{commit}}") != 0:
        return True
    rev = revision.removesuffix("-dirty")
    return git("merge-base", "--is-ancestor", LAST_QUERY_REVISION, rev) == 0


def rows_provenance(params: dict) -> dict:
    """metrics/provenance.json: per results part, which revisions, machines and torch builds made
    its rows (and in which cells), so a table that mixes them says so."""
    from stages.common import PARTS, part_files
    from smartkv.io import read_parquet_with_meta

    cols = ("revision", "machine", "torch")
    out = {}
    for part in PARTS:
        groups: dict[tuple, dict] = {}
        for path in part_files(part, params):
            if not path.is_file() and "/" in part:  # a section's cell that has not landed yet (section_tests names it)
                continue
            df, _ = read_parquet_with_meta(path)
            for col in cols:
                if col not in df:
                    df[col] = "not recorded"
            for key, g in df.groupby(list(cols), sort=True):
                e = groups.setdefault(tuple(key), {"rows": 0, "cells": []})
                e["rows"] += int(len(g))
                e["cells"].append(path.stem)
        out[part] = [{**dict(zip(cols, k)), **v} for k, v in sorted(groups.items())]
        if part in SMARTKV_PARTS:  # which of its cells rank from the prompt's last query
            for e in out[part]:
                e["last_query"] = has_last_query(str(e["revision"]))
    mixed = lambda c: sorted({e[c] for v in out.values() for e in v})  # noqa: E731
    return {"parts": out, "revisions": mixed("revision"), "machines": mixed("machine")}


def matched_stage_cells() -> dict:
    """The same check on the matched-comparison stages' rows (`smartkv@<b>` against `b`)."""
    from smartkv.cell_check import cell_check
    from smartkv.study.labels import matched_baseline

    out = {}
    for stage in MATCHED_STAGES:
        df = read_section(stage)[0]  # the cells that have landed (section_tests says which have not)
        runs = set(df["run"])
        out[stage] = [cell_check(df, r, matched_baseline(r)) for r in sorted(runs) if matched_baseline(r) in runs]
    return out


def ablation_tests(df: pd.DataFrame, runs: list[str], settings: dict) -> pd.DataFrame:
    """Each ablation against the headline run, per measure both carry; Holm per measure."""
    from smartkv.stats import apply_holm, measures_in, paired_tests

    frames = []
    for measure in measures_in(df):
        has = set(df.loc[df[measure].notna(), "run"])
        tested = [r for r in runs if r in has]
        if HEADLINE in has and tested:
            frames.append(paired_tests(df, HEADLINE, tested, family=_family(ABLATIONS, measure),
                                       **_test_kwargs(settings, measure)))
    return apply_holm(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), settings["alpha"])


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return obj


def overall_json(ov: pd.DataFrame) -> dict:
    from smartkv.stats import _leaves

    return {r["run"]: _leaves({"score_mean": r["score_mean"], "score_std": r["score_std"],
                               "score_pooled": r["score_pooled"], "kv_ratio": r["kv_ratio"]})
            for _, r in ov.iterrows()}


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json, atomic_write_parquet, atomic_write_text, provenance, read_parquet_with_meta
    from smartkv.stats.clusters import attach_passage_clusters
    from smartkv.stats import length_strata, main_table, markdown_table, metrics_json, overall, power_report, summarize

    settings = stats_settings(params)
    split = study_split(params)
    # prompts that share a passage are one cluster: every test counts clusters (smartkv/stats/clusters.py)
    tasks, _ = read_parquet_with_meta(TASKS_FILE)
    main_raw = attach_passage_clusters(read_results("baselines", "peers", "smartkv", split=split), tasks)
    main_df = length_strata(main_raw)
    abl_raw = attach_passage_clusters(read_results("ablations", split=split), tasks)
    abl_df = length_strata(abl_raw)
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
    abl_tests = ablation_tests(abl_all, scored, settings)
    power = power_report(tests, settings["power_effect"], settings["alpha"], settings["power_target"])

    prov = provenance({"stats": settings})
    atomic_write_parquet(summary, DATA / "summary.parquet", prov)
    atomic_write_parquet(abl_summary, DATA / "ablation_summary.parquet", prov)
    atomic_write_parquet(tests if not tests.empty else pd.DataFrame({"target": []}), DATA / "tests.parquet", prov)
    atomic_write_parquet(abl_tests, DATA / "ablation_tests.parquet", prov)

    atomic_write_json(METRICS / "main.json", {"runs": overall_json(ov)})
    atomic_write_json(METRICS / "provenance.json", rows_provenance(params))
    atomic_write_json(METRICS / "power.json", power)
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
    atomic_write_text(METRICS / "main_table.md", main_table(summary, tests, power))
    atomic_write_json(METRICS / "cells.json", cell_checks(main_raw, tests))
    atomic_write_json(METRICS / "budgets.json", smartkv_budget_bounds(main_raw, abl_raw, settings["memory_tolerance"]))
    log.info("main table:\n%s", markdown_table(summary))


if __name__ == "__main__":
    main()
