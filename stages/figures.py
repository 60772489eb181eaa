"""Stage `figures`: every figure as PNG and PDF under plots/, and CSV data for `dvc plots`.

- pareto: accuracy vs measured KV memory of every method (+ plots/pareto.csv);
- needle_heatmaps: needle score over context length x depth, one panel per chosen run;
- allocation_map: bits per token x layer for a short needle prompt, needle outlined, the
  prompt's tokens as labels (a fresh SmartKV run at the headline settings);
- ablations: ablation bars; regret: accuracy lost against the oracle allocation;
- niah_pareto: needle accuracy alone, Wilson 95% CIs, vs memory (+ plots/niah_pareto.csv);
- memory_breakdown: each run's bytes by part (codes, scales, index, sinks, window, key
  statistics, tracker) from the results' kv_<part>_bytes columns (+ plots/memory_breakdown.csv);
- perplexity_memory: perplexity vs memory on the perplexity texts (+ plots/perplexity_memory.csv);
(Throughput has its own stage, `latency`: its inputs are wall-clock timings.)
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from smartkv.study.params import ParamError, model_settings, placement, section, study_split
from smartkv.study.labels import HEADLINE
from smartkv.study.runs import ablation_runs, headline_run
from stages.common import DATA, PLOTS, read_results, stage_main

log = logging.getLogger("stages.figures")


def figure_settings(params: dict) -> dict:
    f = section(params, "figures")
    runs = f.get("heatmap_runs", ["fp16", "kivi-2", HEADLINE])
    if not isinstance(runs, list) or not runs:
        raise ParamError(f"figures.heatmap_runs={runs!r} must list at least one run label")
    ex = section(params, "allocation_example")
    length = ex.get("length", 200)
    if not isinstance(length, int) or length < 64:
        raise ParamError(f"allocation_example.length={length!r} must be an integer >= 64 tokens")
    depth = ex.get("depth", 0.5)
    if not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ParamError(f"allocation_example.depth={depth!r} must lie in [0, 1]")
    return {"heatmap_runs": runs, "length": length, "depth": float(depth), "seed": int(ex.get("seed", 0)),
            "max_new_tokens": int(ex.get("max_new_tokens", 8))}


def placeholder(stem, text: str):
    from matplotlib.figure import Figure

    from smartkv.plots import _save

    fig = Figure(figsize=(5, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return _save(fig, stem)


def regret_bars(abl: pd.DataFrame, oracle: str, stem):
    """Accuracy each allocation policy loses against the oracle allocation (higher = worse)."""
    from smartkv.plots import _save

    return _save(regret_figure(abl, oracle), stem)


def regret_figure(abl: pd.DataFrame, oracle: str):
    """The regret bars (a Figure); `abl` is `overall()` of the runs, with `n_rows` where known."""
    from matplotlib.figure import Figure

    from smartkv.plots import _styled, mark_zero_bars

    @_styled
    def draw():
        ref = abl.set_index("run")
        runs = [r for r in ref.index if r != oracle]
        regret = np.array([ref.loc[oracle, "score_mean"] - ref.loc[r, "score_mean"] for r in runs], dtype=float)
        fig = Figure(figsize=(max(5.5, 0.7 * len(runs) + 1.5), 3.8), layout="constrained")
        ax = fig.add_subplot()
        bars = ax.bar(range(len(runs)), regret, color="#D55E00")
        mark_zero_bars(ax, range(len(runs)), regret, ["#D55E00"] * len(runs), 0.8)
        ax.bar_label(bars, labels=[f"{v:+.3f}" for v in regret], fontsize=8, padding=2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right")
        ax.set_ylabel(f"Regret: {oracle} − run (accuracy)")
        n = ref["n_prompts"] if "n_prompts" in ref else None
        n_text = "" if n is None or n.isna().all() else (
            f"; n = {int(n.min())} prompts per run" if n.min() == n.max() else f"; n = {int(n.min())}–{int(n.max())} prompts per run")
        ax.set_title(f"Allocation regret against the oracle{n_text}\n"
                     "bars: difference of mean accuracy (mean over tasks), no interval: see the ablation tests",
                     fontsize=10)
        ax.grid(axis="x", visible=False)
        return fig

    return draw()


def allocation_example(params: dict, settings: dict):
    from smartkv.evaluate import allocation_snapshot
    from smartkv.models import load_model
    from smartkv.plots import allocation_map
    from smartkv.tasks import generate_task

    head = headline_run(params)
    model_name, dtype = model_settings(params)
    model, tok = load_model(model_name, dtype=dtype, **placement(params))
    sample = generate_task("niah", tok, n_per_cell=1, lengths=[settings["length"]], depths=[settings["depth"]],
                           seed=settings["seed"])[0]
    snap = allocation_snapshot(model, tok, sample, head, settings["max_new_tokens"], decay=head.config().decay)
    span = None if snap["needle"] is None else (snap["needle"][0], snap["needle"][1] + 1)
    log.info("allocation example: answer %s, predicted %r", sample.answers, snap["prediction"])
    return allocation_map(snap["bits"], snap["tokens"], span, PLOTS / "allocation_map", max_labels=settings["length"] + 8)


@stage_main
def main(params: dict) -> None:
    from smartkv.io import read_parquet_with_meta
    from smartkv.plots import ablation_bars, needle_heatmaps, pareto, write_plot_data
    from smartkv.plots_tradeoffs import (breakdown_table, memory_breakdown, niah_pareto, niah_table,
                                         perplexity_memory, perplexity_table)
    from smartkv.stats import overall

    settings = figure_settings(params)
    split = study_split(params)
    headline_run(params), ablation_runs(params)  # validate before any work
    main_df = read_results("baselines", "peers", "smartkv", split=split)
    abl_df = read_results("ablations", split=split)
    abl_summary, _ = read_parquet_with_meta(DATA / "ablation_summary.parquet")

    ov = overall(main_df)
    pareto(main_df, PLOTS / "pareto")
    write_plot_data(ov[["run", "method", "family", "budget", "kv_ratio", "score_mean", "score_std"]]
                    .sort_values(["family", "kv_ratio"]), PLOTS / "pareto.csv")

    if (main_df["task"] == "niah").any():
        niah_pareto(main_df, PLOTS / "niah_pareto")
        write_plot_data(niah_table(main_df)[["run", "method", "family", "kv_ratio", "accuracy", "ci_lo", "ci_hi", "k", "n"]],
                        PLOTS / "niah_pareto.csv")
    else:
        placeholder(PLOTS / "niah_pareto", "no niah task in this study")
        write_plot_data(pd.DataFrame(columns=["run", "kv_ratio", "accuracy"]), PLOTS / "niah_pareto.csv")
    memory_breakdown(main_df, PLOTS / "memory_breakdown")
    write_plot_data(breakdown_table(main_df), PLOTS / "memory_breakdown.csv")
    if "nll" in main_df.columns and main_df["nll"].notna().any():
        perplexity_memory(main_df, PLOTS / "perplexity_memory")
        write_plot_data(perplexity_table(main_df), PLOTS / "perplexity_memory.csv")
    else:
        placeholder(PLOTS / "perplexity_memory", "no perplexity task in this study")
        write_plot_data(pd.DataFrame(columns=["run", "kv_ratio", "ppl"]), PLOTS / "perplexity_memory.csv")

    runs = [r for r in settings["heatmap_runs"] if r in set(main_df["run"])]
    if runs and main_df["depth"].notna().any():
        needle_heatmaps(main_df, runs, PLOTS / "needle_heatmaps")
    else:
        placeholder(PLOTS / "needle_heatmaps", "no needle task (or none of figures.heatmap_runs) in this study")

    allocation_example(params, settings)

    abl_runs = [HEADLINE, *dict.fromkeys(abl_df["run"])]
    ablation_bars(abl_summary, abl_runs, PLOTS / "ablations")
    abl_rows = pd.concat([main_df[main_df["run"] == HEADLINE], abl_df], ignore_index=True)
    abl_ov = overall(abl_rows)
    scored = abl_rows[abl_rows["task"] != "perplexity"]
    abl_ov["n_prompts"] = abl_ov["run"].map(scored.groupby("run")["score"].count())
    oracle = [r for r in abl_runs if "oracle" in r]
    if oracle:
        regret_bars(abl_ov, oracle[0], PLOTS / "regret")
    else:
        placeholder(PLOTS / "regret", "no oracle ablation in this study")
    write_plot_data(abl_ov[["run", "score_mean", "score_std", "kv_ratio"]], PLOTS / "ablations.csv")
    log.info("figures written under %s", PLOTS)


if __name__ == "__main__":
    main()
