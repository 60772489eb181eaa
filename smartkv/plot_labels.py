"""Point labels that do not overlap, and intervals that stay inside [0, 1].

`place_labels` is a greedy collision pass (no adjustText dependency): each label tries a
ring of offsets around its point, nearest first, and takes the first whose box stays inside
the axes and overlaps no label placed before it, no marker and no other obstacle; a label
pushed away from its point gets a thin leader line. It measures real text extents with the
figure's renderer, so it runs after the layout is fixed (`draw_without_rendering`) and keeps
the labels out of the layout (they cannot move the axes they were measured against).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox

# Offsets tried, in points: eight directions on growing rings (nearest first).
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_RADII = [5, 11, 18, 27, 38, 52]
_PAD_PX = 2.0


def _align(dx: int, dy: int) -> tuple[str, str]:
    return ({1: "left", 0: "center", -1: "right"}[dx], {1: "bottom", 0: "center", -1: "top"}[dy])


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], *,
                 fontsize: float = 8, marker_pt: float = 4.0, obstacles: Sequence[Bbox] = ()) -> list:
    """Annotate point i with texts[i] where it collides with nothing; returns the annotations.

    `marker_pt`: half-size of the markers in points (their boxes are obstacles too);
    `obstacles`: further display-space boxes to keep clear (a legend inside the axes).
    """
    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # a renderer to measure text with (figures here are built without pyplot)
    fig.draw_without_rendering()  # fix the layout first: the labels are measured against it
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    centres = ax.transData.transform(np.column_stack([xs, ys]).astype(float))
    m = marker_pt * px_per_pt
    taken = [Bbox.from_extents(cx - m, cy - m, cx + m, cy + m) for cx, cy in centres if np.isfinite([cx, cy]).all()]
    taken += list(obstacles)
    out = []
    for (cx, cy), x, y, text in zip(centres, xs, ys, texts):
        if not np.isfinite([cx, cy]).all():
            continue
        # Anchored in data coordinates, offset in points: both survive the save's other dpi.
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points",
                          fontsize=fontsize, color="#333333", zorder=4,
                          bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        ann.set_in_layout(False)
        best, best_cost = None, math.inf
        for r in _RADII:
            for dx, dy in _DIRECTIONS:
                ha, va = _align(dx, dy)
                ann.set_ha(ha), ann.set_va(va)
                ann.xyann = (dx * r / (math.sqrt(2) if dx and dy else 1), dy * r / (math.sqrt(2) if dx and dy else 1))
                box = ann.get_window_extent(renderer).padded(_PAD_PX)
                outside = (box.width * box.height) - _overlap(box, frame)
                cost = sum(_overlap(box, t) for t in taken) + 10 * outside
                if cost < best_cost:
                    best, best_cost = (ha, va, ann.xyann, box), cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        ha, va, xyann, box = best
        ann.set_ha(ha), ann.set_va(va)
        ann.xyann = xyann
        if math.hypot(*xyann) > _RADII[1]:  # pushed away: a leader line says whose label it is
            ax.annotate("", (x, y), xytext=xyann, textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.6, "shrinkA": 0, "shrinkB": 3},
                        zorder=3).set_in_layout(False)
        taken.append(box)
        out.append(ann)
    return out


def label_boxes(fig, labels) -> list[Bbox]:
    """Display-space boxes of `labels` after a fresh draw (what a test checks for overlaps)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in labels]


def clipped_errors(mean, lo_half, hi_half, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Asymmetric error-bar lengths [2, n] for mean - lo_half .. mean + hi_half, clipped to [lo, hi]
    (a score cannot leave [0, 1]; an std bar drawn past it misleads). NaN halves give no bar."""
    mean = np.asarray(mean, dtype=float)
    down = np.nan_to_num(np.asarray(lo_half, dtype=float))
    up = np.nan_to_num(np.asarray(hi_half, dtype=float))
    return np.vstack([np.clip(np.minimum(down, mean - lo), 0, None), np.clip(np.minimum(up, hi - mean), 0, None)])


def wilson_interval(k, n, z: float = 1.959963984540054) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion k/n (95% by default), elementwise.

    Wilson (1927), "Probable inference, the law of succession, and statistical inference",
    JASA 22(158). Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at
    k = 0 or k = n.
    """
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); rounding would leave it a hair inside.
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0, 1))
    hi = np.where(k == n, 1.0, np.clip(centre + half, 0, 1))
    return lo, hi
