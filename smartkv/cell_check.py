"""Does a paired 0/1 win hold across the grid's cells, or does one cell carry it?

The study's NIAH prompts use the classic filler block (`block: classic`, the one layout FP16
succeeds with at 2k-4k on the default model, docs/study.md, "Tasks and calibration"): every prompt of a
cell (task x prompt length x needle depth) has the same haystack and differs from the others in
its pass key only. Exact McNemar over prompts then answers "on prompts like these", and its n
counts keys, not haystacks: a method that fails one needle position fails it for every key, so
one cell can supply a whole comparison's discordant pairs. This module asks the question one
level up: per cell, the mean paired difference; across cells, how many favour each side, an
exact sign test over the cells that differ, and how much of the net discordant count the
largest cell carries.

It reads results rows (any stage's), so it stays out of the model stages' dependencies.
"""

from __future__ import annotations

import pandas as pd
from scipy import stats as sps

CELL = ("task", "context_length", "depth")
KEY = ("sample_id", "seed")
DEPTH_BINS = (0.1, 0.3, 0.5, 0.7, 0.9)  # centres of the fifths of [0, 1]: a drawn depth's cell


def depth_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` with each drawn depth (a task without a depth grid, such as `niah_passage`, whose
    every prompt draws its own) put in the fifth of [0, 1] it falls in, named by its centre: a
    cell of one prompt says nothing, a fifth of the depths does."""
    from smartkv.tasks.registry import TASKS

    if "depth" not in rows.columns:
        return rows
    drawn = rows["task"].map(lambda t: t in TASKS and not TASKS[t].uses_depth) & rows["depth"].notna()
    if not drawn.any():
        return rows
    out = rows.copy()
    out.loc[drawn, "depth"] = [DEPTH_BINS[min(int(d * 5), 4)] for d in out.loc[drawn, "depth"]]
    return out


def cell_name(cell: tuple) -> str:
    """`niah@1k d0.1` from (task, prompt length, depth): the matched stages' cell name, plus depth."""
    from smartkv.matched_tests import cell_name as task_at_length

    task, length, depth = cell
    return task_at_length(task, int(length)) + ("" if pd.isna(depth) else f" d{float(depth):g}")


def cell_check(rows: pd.DataFrame, target: str, baseline: str, measure: str = "score") -> dict:
    """The cell-level view of `target` against `baseline` on 0/1 `measure` (prompts both scored).

    Returns n_cells, cells (per cell: n, mean difference, discordant counts), cells_target /
    cells_baseline / cells_tied, sign_p (two-sided exact binomial over the untied cells), net
    (target-only minus baseline-only prompts), top_cell and top_share (the cell with the largest
    net in the net's direction, and its net over the whole net; > 1 when other cells pull the
    other way)."""
    rows = depth_cells(rows)
    cols = [c for c in CELL if c in rows.columns]
    sides = []
    for run in (target, baseline):
        part = rows[(rows["run"] == run) & rows[measure].notna()]
        sides.append(part[[*cols, *KEY, measure]])
    m = sides[0].merge(sides[1], on=[*cols, *KEY], suffixes=("_t", "_b"))
    if m.empty:
        raise ValueError(f"no prompt scored by both {target!r} and {baseline!r} on {measure!r}")
    t, b = m[f"{measure}_t"], m[f"{measure}_b"]
    m = m.assign(t_only=((t == 1) & (b == 0)).astype(int), b_only=((t == 0) & (b == 1)).astype(int), diff=t - b)
    if "depth" not in cols:
        m["depth"] = float("nan")
    cells = []
    for key, g in m.groupby(list(CELL), sort=True, dropna=False):
        cells.append({"cell": cell_name(key), "n": len(g), "mean_diff": float(g["diff"].mean()),
                      "target_only": int(g["t_only"].sum()), "baseline_only": int(g["b_only"].sum())})
    up = sum(c["mean_diff"] > 0 for c in cells)
    down = sum(c["mean_diff"] < 0 for c in cells)
    net = int(m["t_only"].sum() - m["b_only"].sum())
    sign_p = float(sps.binomtest(up, up + down, 0.5).pvalue) if up + down else 1.0
    top, share = None, None
    if net:
        top_c = max(cells, key=lambda c: (c["target_only"] - c["baseline_only"]) * (1 if net > 0 else -1))
        top, share = top_c["cell"], (top_c["target_only"] - top_c["baseline_only"]) / net
    return {"target": target, "baseline": baseline, "measure": measure, "n_prompts": len(m),
            "n_cells": len(cells), "cells_target": up, "cells_baseline": down,
            "cells_tied": len(cells) - up - down, "sign_p": sign_p, "net": net,
            "top_cell": top, "top_share": share, "cells": cells}


def describe(c: dict) -> str:
    """One line: the cells' split, the sign test, and the cell that carries the net."""
    line = (f"`{c['target']}` vs `{c['baseline']}`: ahead in {c['cells_target']} of {c['n_cells']} cells, "
            f"behind in {c['cells_baseline']}, tied in {c['cells_tied']} (exact sign p {c['sign_p']:.3g})")
    if c["top_cell"] is not None:
        line += (f"; {c['top_cell']} alone gives {c['top_share']:.0%} of its net {c['net']:+d} prompts")
    return line
