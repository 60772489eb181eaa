"""Publication figures: Pareto front, needle heatmaps, allocation map, ablation and latency bars.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global
backend switch, no figure registry that leaks memory across a long stage, and style is
applied with `rc_context` so importing this module changes nothing. Each function writes
`<stem>.png` (200 dpi) and `<stem>.pdf` atomically and returns both paths.
Colours are the Okabe-Ito palette (distinguishable under the common colour-vision
deficiencies); heatmaps use viridis (perceptually uniform, prints in greyscale).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from smartkv.io import atomic_path, atomic_write_text
from smartkv.plot_labels import clipped_errors, place_labels
from smartkv.stats import PERPLEXITY_TASK, overall

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
FAMILY_COLOR = {"baseline": "#0072B2", "peer": "#CC79A7", "smartkv": "#D55E00", "ablation": "#009E73"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
HATCHES = ["", "//", "..", "xx", "\\\\"]

_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,  # embed TrueType so journals' PDF checks and text search work
    "savefig.dpi": 200,
}


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def _save(fig: Figure, out_stem: str | Path) -> list[Path]:
    with matplotlib.rc_context(_RC):  # rc read at save time (pdf.fonttype) holds for every caller
        return _save_styled(fig, out_stem)


def _save_styled(fig: Figure, out_stem: str | Path) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{out_stem}.{ext}")
        with atomic_path(path) as tmp:
            # No creation date in the PDF: a figure's bytes (and DVC's hash) depend on its content only.
            fig.savefig(tmp, format=ext, dpi=200, bbox_inches="tight",
                        metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(path)
    return paths


def _family_color(family) -> str:
    return FAMILY_COLOR.get(family, "#555555")


def sample_counts(frame: pd.DataFrame) -> tuple[str, int | None]:
    """"n = ..." for a caption: prompts (x seeds) per run over the accuracy tasks, from a
    per-sample frame or a summary; a range where runs differ. Also the number of seeds."""
    acc = frame[frame["task"] != PERPLEXITY_TASK]
    if "sample_id" in acc.columns:
        per_run = acc.groupby("run")["score"].count()
        seeds = acc["seed"].nunique() if "seed" in acc.columns else None
    else:
        per_run = acc.groupby("run")["n_rows"].sum() if "n_rows" in acc.columns else pd.Series(dtype=float)
        seeds = int(acc["n_seeds"].max()) if "n_seeds" in acc.columns and len(acc) else None
    if per_run.empty:
        return "n unknown", seeds
    lo, hi = int(per_run.min()), int(per_run.max())
    return (f"n = {lo} prompts per run" if lo == hi else f"n = {lo}–{hi} prompts per run"), seeds


@_styled
def pareto_figure(summary_or_df: pd.DataFrame) -> tuple[Figure, list]:
    """The Pareto figure and its point labels (returned so that tests can check their boxes)."""
    ov = overall(summary_or_df).sort_values("kv_ratio")
    n_text, seeds = sample_counts(summary_or_df)
    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    # Legend order follows the table: baselines, peers, SmartKV, ablations.
    rank = ov["family"].map({"baseline": 0, "peer": 1, "smartkv": 2, "ablation": 3}).fillna(4)
    methods = list(dict.fromkeys(ov.assign(rank=rank).sort_values(["rank", "kv_ratio"])["method"]))
    for i, method in enumerate(methods):
        m = ov[ov["method"] == method]
        family = m["family"].iloc[0]
        curve = family in ("smartkv", "ablation") and len(m) > 1
        ax.errorbar(
            m["kv_ratio"],
            m["score_mean"],
            # ±1 std, cut at the [0, 1] a score lives in
            yerr=clipped_errors(m["score_mean"], m["score_std"], m["score_std"]),
            color=_family_color(family),
            marker=MARKERS[i % len(MARKERS)],
            markersize=7,
            linestyle="-" if curve else "none",
            linewidth=1.8,
            capsize=3,
            label=f"{method} ({family})",
        )
    ax.set_xlabel("Measured KV-cache memory (fraction of FP16 bytes)")
    ax.set_ylabel("Accuracy (mean over tasks)")
    ax.set_xlim(0, max(1.05, float(ov["kv_ratio"].max()) + 0.05))
    ax.set_ylim(-0.02, 1.08)
    # Outside the axes: a legend inside would hide points or their labels.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    seeds_text = f"{seeds} seeds" if seeds else "seeds"
    ax.set_title(f"Accuracy vs KV memory ({n_text})\n"
                 f"error bars: ±1 std of the mean over {seeds_text}, clipped to [0, 1]", fontsize=10)
    labels = place_labels(ax, ov["kv_ratio"].to_numpy(), ov["score_mean"].to_numpy(), list(ov["run"]))
    return fig, labels


def pareto(summary_or_df: pd.DataFrame, out_stem: str | Path) -> list[Path]:
    """Accuracy (mean over tasks, std over seeds) vs measured KV memory (fraction of FP16).

    SmartKV and ablation variants of one method are joined across budgets as a curve;
    baselines are single points. Up and to the left is better.
    """
    return _save(pareto_figure(summary_or_df)[0], out_stem)


def needle_grid(df: pd.DataFrame, run: str, task: str) -> pd.DataFrame:
    """Mean score of one run on one needle task: rows are depths, columns context lengths."""
    cell = df[(df["run"] == run) & (df["task"] == task) & df["depth"].notna()]
    if cell.empty:
        return pd.DataFrame()
    return cell.pivot_table(index="depth", columns="context_length", values="score", aggfunc="mean").sort_index()


@_styled
def needle_heatmaps(df: pd.DataFrame, runs: Sequence[str], out_stem: str | Path) -> list[Path]:
    """Needle grids: mean score per (context length, needle depth); a row of panels per needle
    task (each task on its own: their scores must not be pooled), a column per run."""
    d = df[df["run"].isin(runs) & df["depth"].notna()]
    runs = [r for r in runs if r in set(d["run"])]
    if not runs:
        raise ValueError("needle_heatmaps: none of the runs has rows with a needle depth")
    tasks = list(dict.fromkeys(sorted(d["task"])))
    nrows, ncols = len(tasks), len(runs)
    fig = Figure(figsize=(3.0 * ncols + 0.8, 2.6 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    depth_pct = 100.0 if d["depth"].max() <= 1.0 else 1.0  # depths stored as fractions or %
    im = None
    for row, task in enumerate(tasks):
        for col, run in enumerate(runs):
            ax = axes[row, col]
            grid = needle_grid(d, run, task)
            ax.grid(False)
            if grid.empty:
                ax.set_title(f"{run} · {task}", fontsize=9)
                ax.set_axis_off()
                continue
            cells = d[(d["run"] == run) & (d["task"] == task)].groupby(["depth", "context_length"])["score"].count()
            n_cell = f"{cells.min()}" if cells.min() == cells.max() else f"{cells.min()}–{cells.max()}"
            ax.set_title(f"{run} · {task} (n = {n_cell} per cell)", fontsize=9)
            im = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                           interpolation="nearest")
            ax.set_xticks(range(grid.shape[1]), [f"{c // 1000}k" if c >= 1000 and c % 1000 == 0
                                                 else str(c) for c in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [f"{v * depth_pct:.0f}%" for v in grid.index])
            if row == nrows - 1:
                ax.set_xlabel("Context length (tokens)")
            if col == 0:
                ax.set_ylabel("Needle depth")
            if grid.size <= 100:  # numbers are readable only on small grids
                for (i, j), v in np.ndenumerate(grid.to_numpy()):
                    if not np.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=axes, shrink=0.9, label="Mean score (0–1)")
    return _save(fig, out_stem)


_LABEL_IN = 0.14  # inches of width a rotated 8-pt tick label needs


def _token_label(t: str) -> str:
    # Tokenizer space markers and control characters make unreadable tick labels.
    t = t.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n").replace("\n", "\\n")
    t = t.strip() or "␣"
    return t if len(t) <= 12 else t[:11] + "…"


@_styled
def allocation_map(
    bits: np.ndarray,
    tokens_text: Sequence[str],
    needle_span: tuple[int, int] | None,
    out_stem: str | Path,
    max_labels: int = 80,
) -> list[Path]:
    """Bits given to each cached token (x) in each layer (y); 16 = full precision, 0 = evicted.

    `needle_span` is a half-open token range [start, end) outlined on the map.
    """
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"bits must be [layers, tokens], got shape {bits.shape}")
    n_layers, n_tokens = bits.shape
    levels = np.unique(bits)
    # Quantized widths get ordered viridis colours; eviction gets neutral grey.
    palette = matplotlib.colormaps["viridis"](np.linspace(0.05, 0.95, max(1, int((levels > 0).sum()))))
    colors = (["#d9d9d9"] if levels[0] == 0 else []) + [tuple(c) for c in palette]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
    idx = np.searchsorted(levels, bits)

    # Token labels at 8 pt, rotated: each needs ~0.14 in of width. Label every `step`-th token
    # so that the figure stays under 30 in wide (a smaller font would be unreadable in print).
    step = max(1, math.ceil(n_tokens / max_labels), math.ceil(n_tokens / ((30 - 1.5) / _LABEL_IN)))
    n_labels = math.ceil(n_tokens / step)
    fig = Figure(figsize=(float(max(6.5, n_labels * _LABEL_IN + 1.5)), 3.8), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(idx, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
                   origin="lower")
    ax.grid(False)
    ticks = list(range(0, n_tokens, step))
    ax.set_xticks(ticks, [_token_label(tokens_text[i]) for i in ticks] if tokens_text else ticks,
                  rotation=90, fontsize=8)
    ax.set_xlabel("Prompt token" + (f" (one in {step} labelled)" if step > 1 else ""))
    ax.set_ylabel("Layer")
    if needle_span is not None:
        s, e = needle_span
        ax.add_patch(Rectangle((s - 0.5, -0.5), e - s, n_layers, fill=False, edgecolor="#D55E00",
                               linewidth=2.0, label="needle"))
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.12), frameon=False, ncols=1)
    cb = fig.colorbar(im, ax=ax, ticks=range(len(levels)), pad=0.01)
    names = {0: "0 (evicted)", 16: "16 (FP16)"}
    cb.ax.set_yticklabels([names.get(int(b), f"{b:g}-bit") for b in levels])
    cb.set_label("Bits per value")
    ax.set_title(f"SmartKV precision allocation (n = 1 prompt: {n_tokens} tokens × {n_layers} layers)")
    return _save(fig, out_stem)


def mark_zero_bars(ax, xs, heights, colors, width) -> list:
    """A zero-height bar is invisible: draw a stub at 0 in its colour (returned for tests)."""
    stubs = []
    for x, h, c in zip(xs, heights, colors):
        if np.isfinite(h) and abs(h) < 1e-12:
            stubs += ax.plot([x - width / 2, x + width / 2], [0, 0], color=c, linewidth=3.5,
                             solid_capstyle="butt", zorder=3, clip_on=False)
    return stubs


@_styled
def ablation_bars_figure(summary: pd.DataFrame, runs: Sequence[str]) -> Figure:
    s = summary[summary["run"].isin(runs) & (summary["task"] != PERPLEXITY_TASK)]
    runs = [r for r in runs if r in set(s["run"])]
    if not runs:
        raise ValueError("ablation_bars: none of the runs is in the summary")
    tasks = list(dict.fromkeys(s["task"]))
    groups = {t: s[s["task"] == t].set_index("run") for t in tasks}
    if len(tasks) > 1:
        groups["mean over tasks"] = overall(s).set_index("run")
    n_text, seeds = sample_counts(s)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * (1 + 0.3 * len(runs))), 4.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    x = np.arange(len(groups))
    crowded = len(runs) * len(groups) > 10
    for i, run in enumerate(runs):
        mean = np.array([g.loc[run, "score_mean"] if run in g.index else np.nan for g in groups.values()], dtype=float)
        std = np.array([g.loc[run, "score_std"] if run in g.index else np.nan for g in groups.values()], dtype=float)
        color = OKABE_ITO[i % len(OKABE_ITO)]
        xs = x + (i - (len(runs) - 1) / 2) * width
        bars = ax.bar(xs, mean, width * 0.95, yerr=clipped_errors(np.nan_to_num(mean), std, std), capsize=3,
                      color=color, hatch=HATCHES[(i // len(OKABE_ITO)) % len(HATCHES)],
                      edgecolor="white", linewidth=0.5, label=run, error_kw={"elinewidth": 1})
        mark_zero_bars(ax, xs, mean, [color] * len(xs), width * 0.95)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in mean], fontsize=8, padding=2,
                     rotation=90 if crowded else 0)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel("Score (mean ± std over seeds)")
    ax.set_ylim(0, 1.15)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=min(4, len(runs)), frameon=False)
    seeds_text = f"{seeds} seeds" if seeds else "seeds"
    ax.set_title(f"Ablations ({n_text})\nbars: mean score; error bars: ±1 std over {seeds_text}, clipped to [0, 1]",
                 fontsize=10)
    return fig


def ablation_bars(summary: pd.DataFrame, runs: Sequence[str], out_stem: str | Path) -> list[Path]:
    """Grouped bars: score per task (plus the mean over tasks) for each run, std over seeds."""
    return _save(ablation_bars_figure(summary, runs), out_stem)


@_styled
def latency_bars_figure(summary: pd.DataFrame) -> Figure:
    fp = summary[summary["method"] == "fp16"]
    if fp.empty:
        raise ValueError("latency_bars needs an fp16 run in the summary to normalise against")
    ref = fp.groupby("task")["tokens_per_s"].mean()
    s = summary[summary["task"].isin(ref.index)].copy()
    s["rel"] = s["tokens_per_s"] / s["task"].map(ref)
    rel = s.groupby("run", sort=False).agg(rel=("rel", "mean"), family=("family", "first"))
    n_text, _ = sample_counts(s)
    fig = Figure(figsize=(max(5.5, 0.55 * len(rel) + 1.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = [_family_color(f) for f in rel["family"]]
    bars = ax.bar(range(len(rel)), rel["rel"], color=colors)
    mark_zero_bars(ax, range(len(rel)), rel["rel"].to_numpy(), colors, 0.8)
    ax.bar_label(bars, labels=[f"{v:.2f}×" for v in rel["rel"]], fontsize=8, padding=2,
                 rotation=90 if len(rel) > 10 else 0)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.35 * max(1.0, float(np.nanmax(rel["rel"].to_numpy(), initial=1.0))))
    ax.set_xticks(range(len(rel)), list(rel.index), rotation=45, ha="right")
    ax.set_ylabel("Decode tokens/s relative to FP16 (×)")
    ax.grid(axis="x", visible=False)
    handles = [Rectangle((0, 0), 1, 1, color=_family_color(f)) for f in dict.fromkeys(rel["family"])]
    families = list(dict.fromkeys(rel["family"]))
    ax.legend(handles, families, frameon=False, loc="upper right", ncols=len(families))
    ax.set_title(f"Decode throughput (higher is faster; {n_text})\n"
                 "bars: mean over tasks of tokens/s ÷ FP16's (no spread: see the profile stage)", fontsize=10)
    return fig


def latency_bars(summary: pd.DataFrame, out_stem: str | Path) -> list[Path]:
    """Decode throughput of each run relative to FP16 on the same tasks (ratios, same run)."""
    return _save(latency_bars_figure(summary), out_stem)


def write_plot_data(df: pd.DataFrame, path: str | Path) -> Path:
    """CSV read by `dvc plots` (written atomically, no index column)."""
    return atomic_write_text(path, df.to_csv(index=False))
