"""A matched section's figure: one panel per comparison, SmartKV beside the method whose bytes it holds.

Reads a section's metrics (metrics/<section>.json, `smartkv.matched_tests.metrics`): accuracy per
run and cell (task x prompt length) with Wilson intervals and measured bytes, and the pooled tests.
Each panel is one primary comparison (a slide shows one at readable size): the baseline and
SmartKV side by side at each prompt length, FP16 as the reference line, each bar's measured
bytes under it, and the pooled Δ with its cluster-bootstrap CI and Holm p in the title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from smartkv.plots import FAMILY_COLOR, _save, _styled


def pairs(m: dict) -> list[dict]:
    """The pooled accuracy comparisons of the section, in its order (matched runs, then ablations)."""
    return [c for c in m.get("comparisons", []) if c.get("measure") == "score" and c.get("task") == "all"]


def _p(p) -> str:
    return "n/a" if p is None else ("< 0.001" if p < 0.001 else f"= {p:.3f}")


def _draw(ax, m: dict, c: dict, legend: bool = True) -> None:
    """One comparison on `ax`: per cell, the baseline's and SmartKV's accuracy (Wilson 95%) and bytes."""
    acc = m["accuracy"]
    cells = [x for x in acc.get(c["target"], {}) if x in acc.get(c["baseline"], {})]
    x = np.arange(len(cells))
    width = 0.38
    for k, (run, color) in enumerate(((c["baseline"], FAMILY_COLOR["baseline"]), (c["target"], FAMILY_COLOR["smartkv"]))):
        ys = np.array([acc[run][cell]["accuracy"] for cell in cells])
        lo = ys - np.array([acc[run][cell]["ci95"][0] for cell in cells])
        hi = np.array([acc[run][cell]["ci95"][1] for cell in cells]) - ys
        xs = x + (k - 0.5) * width
        ax.bar(xs, ys, width * 0.95, color=color, label=run, yerr=[lo, hi], capsize=3, ecolor="#333333")
        for xi, cell in zip(xs, cells):
            ax.text(xi, 0.03, f"{acc[run][cell]['kv_ratio']:.3f}×", ha="center", va="bottom", fontsize=8,
                    color="white", rotation=90)
    fp16 = acc.get("fp16", {})
    for xi, cell in zip(x, cells):
        if cell in fp16:
            ax.hlines(fp16[cell]["accuracy"], xi - width, xi + width, colors="#000000", linestyles=":", linewidth=1.2,
                      label="FP16" if xi == x[0] else None)
    n = [acc[c["baseline"]][cell]["n"] for cell in cells]
    ax.set_xticks(x, [f"{cell}\nn = {k}" for cell, k in zip(cells, n)])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("Accuracy, Wilson 95%")
    if legend:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    ax.set_title(f"{c['target']} vs {c['baseline']}: Δ {c['mean_diff']:+.3f} [{c['ci_lo']:+.3f}, {c['ci_hi']:+.3f}]\n"
                 f"{c['n_pairs']} prompts in {c.get('n_clusters') or c['n_pairs']} passages, Holm p {_p(c.get('p_holm'))}",
                 fontsize=10)


@_styled
def comparison_figure(m: dict, c: dict) -> Figure:
    """One comparison, sized for a slide."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    _draw(fig.add_subplot(), m, c)
    fig.suptitle("bar labels: measured KV bytes (fraction of FP16); dotted: FP16", fontsize=9, color="#444444")
    return fig


@_styled
def section_figure(m: dict) -> Figure:
    """Every pooled comparison of the section, one panel each."""
    cs = pairs(m)
    cols = min(len(cs), 3)
    rows = -(-len(cs) // cols)
    fig = Figure(figsize=(4.8 * cols, 4.0 * rows), layout="constrained")
    for i, c in enumerate(cs):
        _draw(fig.add_subplot(rows, cols, i + 1), m, c)
    fig.suptitle(f"{m.get('model')}: each SmartKV run beside the method whose bytes it holds (bar labels: measured "
                 "KV bytes, fraction of FP16; dotted: FP16)", fontsize=10)
    return fig


def section_plot(m: dict | None, stem: str | Path) -> list[Path]:
    """`<stem>.png/.pdf`: every pooled comparison; a note figure for a section without any."""
    if not m or not pairs(m):
        fig = Figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, "no pooled comparison in this section", ha="center", va="center")
        return _save(fig, stem)
    return _save(section_figure(m), stem)
