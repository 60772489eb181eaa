"""Figures of the analyses: the sensitivity test and the attention heatmap of a needle prompt.

Same conventions as `smartkv.plots`: `Figure` objects without pyplot, Okabe-Ito colours,
viridis for heatmaps, PNG + PDF written atomically; each figure states n and what its
bars and whiskers are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from smartkv.plots import OKABE_ITO, _save, _styled, _token_label
from smartkv.stats import bootstrap_ci

SELECTION_COLOR = {"top": OKABE_ITO[3], "bottom": OKABE_ITO[0], "random": "#888888"}


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (np.nan, np.nan)
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@_styled
def sensitivity_figure(df: pd.DataFrame, out_stem: str | Path, seed: int = 0) -> list[Path]:
    """KL from FP16 (top row) and accuracy (bottom row) of top/bottom/random-k at low bits, keys plain vs rotated."""
    n = df["sample_id"].nunique()
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharey="row")
    fracs = sorted(df.loc[df["fraction"] > 0, "fraction"].unique())
    groups = [(s, k) for s in ("window", "accumulated") for k in fracs]
    width = 0.26
    for col, rotate in enumerate((False, True)):
        sub = df[df["rotate"] == rotate]
        for gi, (score, k) in enumerate(groups):
            for si, sel in enumerate(("top", "bottom", "random")):
                m = (sub["fraction"] == k) & (sub["selection"] == sel)
                if sel != "random":
                    m &= sub["score"] == score
                g = sub[m]
                if g.empty:
                    continue
                x = gi + (si - 1) * width
                kl = g["kl"].to_numpy()
                lo, hi = bootstrap_ci(kl, seed=seed)
                axes[0, col].bar(x, kl.mean(), width, color=SELECTION_COLOR[sel], label=sel if gi == 0 else None)
                axes[0, col].errorbar(x, kl.mean(), [[kl.mean() - lo], [hi - kl.mean()]], color="black", capsize=2, lw=1)
                acc = g["exact"].mean()
                alo, ahi = _wilson(acc, len(g))
                axes[1, col].bar(x, acc, width, color=SELECTION_COLOR[sel])
                axes[1, col].errorbar(x, acc, [[acc - alo], [ahi - acc]], color="black", capsize=2, lw=1)
        for row, metric in enumerate(("kl", "exact")):
            for bits, ls in (("4", ":"), ("2", "--")):
                label = f"int{bits}" + ("-rot" if rotate else "")
                ref = sub.loc[sub["condition"] == label, metric]
                if len(ref):
                    axes[row, col].axhline(float(ref.mean()), color="black", ls=ls, lw=1,
                                           label=f"uniform INT{bits}" if col == 0 and row == 0 else None)
        fp = df.loc[df["condition"] == "fp16", "exact"].mean()
        axes[1, col].axhline(fp, color=OKABE_ITO[2], lw=1.2, label="FP16" if col == 0 else None)
        labels = [f"{'SnapKV window' if s == 'window' else 'accumulated'}\nk = {round(100 * k)}%" for s, k in groups]
        for row in (0, 1):
            axes[row, col].set_xticks(range(len(groups)), labels)
        axes[0, col].set_title("keys Hadamard-rotated" if rotate else "keys plain (per-token groups)")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("KL(FP16 ‖ quantized), nats\nmean over answer tokens")
    axes[1, 0].set_ylabel("Exact match (teacher-forced greedy)")
    axes[1, 0].set_ylim(0, 1.05)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper center", ncols=5, frameon=False,
               title="k tokens per layer at 2 bits, the rest at 4 (equal bytes)")
    h, lab = axes[1, 0].get_legend_handles_labels()
    if h:
        axes[1, 0].legend(h, lab, loc="lower left", frameon=False)
    fig.suptitle(f"Which tokens can take 2 bits? n = {n} passkey prompts; bars: means, whiskers: 95% CI "
                 "(KL: bootstrap; accuracy: Wilson)", fontsize=10, y=-0.02)
    return _save(fig, out_stem)


def heatmap_segments(t: int, needle_span: tuple[int, int] | None, head: int = 8, around: int = 4,
                     tail: int = 16) -> list[tuple[int, int]]:
    """Token ranges a reader looks at: the first tokens (sinks), the needle with `around` neighbours,
    the question at the end; overlapping ranges merge."""
    ranges = [(0, min(t, head))]
    if needle_span is not None:
        ranges.append((max(0, needle_span[0] - around), min(t, needle_span[1] + around)))
    ranges.append((max(0, t - tail), t))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


@_styled
def attention_heatmap(panels: dict[str, np.ndarray], tokens: Sequence[str], needle_span: tuple[int, int] | None,
                      out_stem: str | Path, title: str = "") -> list[Path]:
    """Attention received by prompt tokens (x) in each layer (y): one row of panels per query set.

    Each `[layers, T]` array's rows are distributions (sum to 1). Only the first tokens, the
    needle's neighbourhood and the question are drawn, every token labelled at 9 pt (the
    filler between them is cut, and said so); the needle's tokens are outlined. Log colours.
    """
    arrays = [np.asarray(a, dtype=float) for a in panels.values()]
    n_layers, t = arrays[0].shape
    segs = heatmap_segments(t, needle_span)
    widths = [b - a for a, b in segs]
    floor = 1e-5
    fig = Figure(figsize=(max(7.0, 0.19 * sum(widths) + 2.5), 3.3 * len(arrays) + 1.4), layout="constrained")
    axes = fig.subplots(len(arrays), len(segs), squeeze=False, sharey=True, gridspec_kw={"width_ratios": widths})
    im = None
    for r, (name, attn) in enumerate(zip(panels, arrays)):
        for c, (a, b) in enumerate(segs):
            ax = axes[r, c]
            im = ax.imshow(np.log10(np.maximum(attn[:, a:b], floor)), aspect="auto", interpolation="nearest",
                           origin="lower", cmap="viridis", vmin=np.log10(floor), vmax=0,
                           extent=(a - 0.5, b - 0.5, -0.5, n_layers - 0.5))
            ax.grid(False)
            ax.set_xticks(range(a, b), [_token_label(tokens[i]) for i in range(a, b)], rotation=90, fontsize=9)
            if needle_span is not None and needle_span[0] < b and needle_span[1] > a:
                s, e = max(a, needle_span[0]), min(b, needle_span[1])
                ax.add_patch(Rectangle((s - 0.5, -0.5), e - s, n_layers, fill=False, edgecolor="#D55E00", lw=2,
                                       label="needle"))
            if c == 0:
                ax.set_ylabel("Layer")
            if c:
                ax.tick_params(axis="y", left=False)
        axes[r, len(segs) // 2].set_title(name, fontsize=10)
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), pad=0.01, shrink=0.9)
    cb.set_label("log10 share of the layer's attention\n(heads summed)")
    shown = ", ".join(f"{a}–{b - 1}" for a, b in segs)
    fig.supxlabel(f"Prompt tokens {shown} of {t} cached (the filler between them is cut); needle outlined", fontsize=10)
    fig.suptitle(title or "Attention received per token and layer", fontsize=11)
    return _save(fig, out_stem)
