"""The profile's two figures: decode time per token against context length, and peak memory per method.

Conventions of `smartkv.plots`: a `Figure` without pyplot, Okabe-Ito colours, PNG + PDF
written atomically (no creation date); each figure says what its marks are and their n.
Both read the flat rows of `smartkv.analysis.profile.plot_rows`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from smartkv.plots import MARKERS, OKABE_ITO, _save, _styled


def _runs(rows: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(rows["run"]))


@_styled
def latency_figure(rows: pd.DataFrame, out_stem: str | Path) -> list[Path]:
    """Median decode ms/token per run against context (log-2 axis); band: inter-quartile range,
    whiskers: min-max over the round-robin repeats."""
    fig = Figure(figsize=(6.8, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(_runs(rows)):
        g = rows[rows["run"] == run].sort_values("context")
        color, x = OKABE_ITO[i % len(OKABE_ITO)], g["context"].to_numpy(dtype=float)
        y = g["ms_per_token"].to_numpy(dtype=float)
        ax.fill_between(x, g["ms_q1"], g["ms_q3"], color=color, alpha=0.18, linewidth=0)
        ax.errorbar(x, y, np.vstack([y - g["ms_min"].to_numpy(float), g["ms_max"].to_numpy(float) - y]),
                    color=color, marker=MARKERS[i % len(MARKERS)], markersize=5, capsize=3, lw=1.4, label=run)
    ax.set_xscale("log", base=2)
    contexts = sorted(rows["context"].unique())
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("decode time per token (ms, lower is faster)")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    n = int(rows["n_repeats"].min())
    ax.set_title(f"Decode time per token vs context (one process, round-robin)\n"
                 f"line: median of n = {n} repeats; band: IQR; whiskers: min–max", fontsize=10)
    return _save(fig, out_stem)


@_styled
def memory_figure(rows: pd.DataFrame, out_stem: str | Path) -> list[Path]:
    """Per context (groups) and run (bars): peak bytes allocated over the fork and decode (solid)
    and the bytes the cache itself reports holding at the end (hatched, in front)."""
    runs, contexts = _runs(rows), sorted(rows["context"].unique())
    fig = Figure(figsize=(max(6.8, 1.2 * len(contexts) * len(runs) / 3 + 2), 4.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        g = rows[rows["run"] == run].set_index("context").reindex(contexts)
        x = np.arange(len(contexts)) + (i - (len(runs) - 1) / 2) * width
        color = OKABE_ITO[i % len(OKABE_ITO)]
        ax.bar(x, g["peak_allocated_mib"], width, color=color, alpha=0.55, label=f"{run}: peak allocated")
        ax.bar(x, g["cache_mib"], width * 0.6, color=color, hatch="//", edgecolor="black", linewidth=0.4,
               label=f"{run}: cache bytes")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("MiB")
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # never over a bar
    new = int(rows["new_tokens"].iloc[0]) if "new_tokens" in rows else None
    ax.set_title("Memory per method: peak allocated by torch over the cache's fork"
                 + (f" and {new} decode steps" if new else " and decode")
                 + "\n(wide bars, one measurement each) vs the cache's own bytes at the end (narrow hatched)",
                 fontsize=10)
    return _save(fig, out_stem)
