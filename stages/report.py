"""Stage `report`: REPORT.md from the current results (never edited by hand).

Reads the summaries and tests of `stats`, the metrics of `attention`, `sensitivity`,
`errors`, `latency`, `profile`, `second_model`, `extra_cells`, `sweeps` and the cell-by-cell check (`cells`) (a missing one is named in its section) and
the PNG figures."""

from __future__ import annotations

import logging

from smartkv.study import get
from smartkv.study.labels import HEADLINE
from smartkv.sweeps import cpu_model
from stages.common import DATA, METRICS, PLOTS, code_revision, stage_main

log = logging.getLogger("stages.report")
REPORT = "REPORT.md"
FIGURES = {
    "Independent prompts (needles in real text, one passage each): each SmartKV run beside the method whose "
    "bytes it holds, per prompt length": "passages",
    "Accuracy vs measured KV memory for every method (SmartKV's budgets joined as a curve)": "pareto",
    "Needle-in-a-haystack score over context length x needle depth": "needle_heatmaps",
    "SmartKV's precision allocation (bits per token and layer) on a short needle prompt; needle outlined":
        "allocation_map",
    "Ablations at the headline budget (score per task, std over seeds)": "ablations",
    "Allocation regret against the oracle (importance from the whole FP16 generation)": "regret",
    "Throughput of the teacher-forced answer forward relative to FP16 (wall clock on this machine)": "latency",
    "Decode time per token vs context length, every method in one process (median, IQR band, min-max whiskers)":
        "profile_latency",
    "Peak memory allocated over the fork and decode vs the cache's own bytes, per method and context":
        "profile_memory",
    "Attention of one needle prompt (dev seed) per layer": "attention_heatmap",
    "The hypothesis test: 2 bits on the top- vs bottom-attention tokens at equal bytes (KL and accuracy)":
        "sensitivity",
    "Error analysis: failure rate by depth and task (exact 95% CI), needle bits by outcome": "errors",
    "Sweeps on dev seeds: accuracy per value, and the answer log-likelihood's change against the current value":
        "sweeps",
}

def _per_cell(n) -> str:
    return f", {'/'.join(map(str, n))} per cell by length" if isinstance(n, list) else f", {n} per cell"


def setup(params: dict, n_samples: int) -> dict:
    tasks = get(params, "tasks", {}) or {}
    grid = "; ".join(f"{name}: lengths {v.get('lengths')}" + (f" x depths {v['depths']}" if v.get("depths") else "")
                     + _per_cell(v.get("n_per_cell", 1)) for name, v in tasks.items())
    lb = get(params, "longbench", {}) or {}
    return {
        "model": get(params, "model"),
        "dtype": get(params, "dtype"),
        "seeds": f"{get(params, 'split')}: {get(params, 'seeds')[get(params, 'split')]}",
        "tasks": grid + ("; LongBench: " + ", ".join(lb.get("tasks", [])) if lb.get("enabled") else ""),
        "samples per method": n_samples,
        "headline budget": get(params, "budget"),
        "Pareto budgets": get(params, "budgets"),
        "decay / realloc_freq": f"{get(params, 'decay')} / {get(params, 'realloc_freq')}",
        # the machine that renders this report; the model stages' outputs do not record theirs
        # (content-only hashes), so throughput lines below cite the stages, not this machine
        "report rendered on": cpu_model(),
    }

@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_text, provenance, read_parquet_with_meta
    from smartkv.report import render_report
    from smartkv.report.findings import METRIC_FILES, load_metrics

    summary, _ = read_parquet_with_meta(DATA / "summary.parquet")
    tests, _ = read_parquet_with_meta(DATA / "tests.parquet")
    abl_summary, _ = read_parquet_with_meta(DATA / "ablation_summary.parquet")
    abl_tests, _ = read_parquet_with_meta(DATA / "ablation_tests.parquet")
    n = int(summary[summary["run"] == HEADLINE]["n_samples"].sum()) if len(summary) else 0
    figures = {cap: str(PLOTS / f"{stem}.png") for cap, stem in FIGURES.items() if (PLOTS / f"{stem}.png").exists()}
    config = {k: get(params, k, None) for k in ("model", "dtype", "seeds", "split", "tasks", "longbench", "budget", "budgets",
                                                "decay", "realloc_freq", "smartkv", "baselines", "ablations", "stats")}
    prov = provenance(config, revision=True)
    prov["git_revision"] = code_revision(prov["git_revision"])
    # the slides' metrics, and the matched-comparison stages' and the sweeps' (which the slides do not show)
    metrics = load_metrics(METRICS, METRIC_FILES + ("second_model", "extra_cells", "passages", "passages_calibration", "sweeps",
                                                      "cells", "budgets", "provenance"))
    text = render_report(summary, tests, abl_summary, figures, setup(params, n), prov,
                         report_dir=".", metrics=metrics, ablation_tests=abl_tests, params=config)
    atomic_write_text(REPORT, text)
    log.info("wrote %s (%d lines)", REPORT, text.count("\n"))

if __name__ == "__main__":
    main()
