"""The error-analysis figure: failure rate by needle depth and by task, and needle bits by outcome.

Conventions of `smartkv.plots`: a `Figure` without pyplot, Okabe-Ito colours, PNG + PDF
written atomically (no creation date). Whiskers are exact (Clopper-Pearson) 95% intervals,
inside [0, 1] by construction; every panel states its n.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from smartkv.plots import OKABE_ITO, _save, _styled

ZERO_HEIGHT = 0.01  # a rate of 0 is drawn as a sliver, so "no failures" is not an empty slot


def _rate_panel(ax, strata: pd.DataFrame, factor: str, runs: list[str], xlabel: str) -> None:
    sub = strata[strata["factor"] == factor]
    levels = list(dict.fromkeys(sub.sort_values("level", key=lambda s: pd.to_numeric(s, errors="coerce")
                                                 .fillna(0))["level"]))
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        g = sub[sub["run"] == run].set_index("level").reindex(levels)
        x = np.arange(len(levels)) + (i - (len(runs) - 1) / 2) * width
        rate = g["rate"].to_numpy(dtype=float)
        n = int(np.nansum(g["n"].to_numpy(dtype=float)))
        ax.bar(x, np.where(rate == 0, ZERO_HEIGHT, rate), width, color=OKABE_ITO[i % len(OKABE_ITO)],
               label=f"{run} (n = {n})")
        err = np.vstack([rate - g["ci_lo"].to_numpy(dtype=float), g["ci_hi"].to_numpy(dtype=float) - rate])
        ax.errorbar(x, rate, np.nan_to_num(err), fmt="none", color="black", capsize=2, lw=0.8)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.02)


@_styled
def errors_figure(strata: pd.DataFrame, bits: pd.DataFrame, runs: list[str], out_stem: str | Path) -> list[Path]:
    """Three panels: failure rate vs depth, failure rate vs task (bars = rate, whiskers =
    exact 95% CI), and the needle's bits minus the haystack's in successes and failures."""
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax_d, ax_t, ax_b = fig.subplots(1, 3)
    if strata.empty:
        for ax in (ax_d, ax_t):
            ax.text(0.5, 0.5, "no scored prompts", ha="center", va="center", transform=ax.transAxes)
    else:
        _rate_panel(ax_d, strata, "depth", runs, "needle depth")
        _rate_panel(ax_t, strata, "task", runs, "task")
        ax_d.set_ylabel("failure rate (bars; whiskers: exact 95% CI)")
        ax_d.legend(loc="upper left", frameon=False, fontsize=8)
    ax_d.set_title("Failures by needle depth")
    ax_t.set_title("Failures by task")
    shown = bits[bits["run"].isin(runs)] if len(bits) else bits
    if shown.empty:
        ax_b.text(0.5, 0.5, "no needle bits recorded", ha="center", va="center", transform=ax_b.transAxes)
    else:
        for i, (outcome, color) in enumerate((("success", OKABE_ITO[2]), ("failure", OKABE_ITO[3]))):
            g = shown[shown["outcome"] == outcome].set_index("run").reindex(runs)
            x = np.arange(len(runs)) + (i - 0.5) * 0.38
            gap = g["gap"].to_numpy(dtype=float)
            ax_b.bar(x, np.nan_to_num(gap), 0.38, color=color,
                     label=f"{outcome} (n = {int(np.nansum(g['n'].to_numpy(dtype=float)))})")
        ax_b.axhline(0, color="black", lw=0.8)
        ax_b.set_xticks(range(len(runs)), runs, rotation=20, ha="right")
        ax_b.set_ylabel("needle bits − haystack bits (mean)")
        ax_b.legend(frameon=False, fontsize=8)
    ax_b.set_title("Bits on the needle vs the haystack")
    return _save(fig, out_stem)
