"""REPORT's "Cell by cell" section and limitation, from metrics/cells.json (stage `stats`)."""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from smartkv.cell_check import describe

WHY = ("The NIAH prompts of one cell (task x length x needle depth) share their haystack, the classic "
       "filler block, and differ in the pass key only, so the per-prompt McNemar above counts keys, "
       "not haystacks. Here each matched comparison is seen one level up: the cells where each side "
       "finds more needles, an exact sign test over the cells that differ, and how much of the net "
       "the largest cell gives (over 100% when other cells pull the other way).")


def cells_section(m: Mapping | None) -> list[str]:
    if not m:
        return ["_`metrics/cells.json` is missing: this section needs the `stats` stage (`dvc repro stats`)._", ""]
    out = [WHY, ""]
    out += [f"- {describe(c)}." for c in m.get("comparisons") or []]
    for stage, comparisons in (m.get("matched_stages") or {}).items():
        out += ["", f"In `{stage}`:", ""] + [f"- {describe(c)}." for c in comparisons]
    return out + [""]


def carried_by_one_cell(m: Mapping | None, tests: pd.DataFrame | None = None, share: float = 0.5) -> list[str]:
    """A limitation naming the significant comparisons (Holm, pooled accuracy, in `tests`) whose
    net comes mostly from one cell of the grid; without `tests`, every comparison."""
    if not (m or {}).get("comparisons"):
        return []
    significant = None
    if tests is not None and not tests.empty and {"significant", "measure", "task"} <= set(tests.columns):
        rows = tests[(tests["measure"] == "score") & (tests["task"] == "all") & tests["significant"].astype(bool)]
        significant = set(zip(rows["target"], rows["baseline"]))
    carried = [c for c in m["comparisons"]
               if c.get("top_share") is not None and c["top_share"] >= share and c["n_cells"] > 1
               and (significant is None or (c["target"], c["baseline"]) in significant)]
    if not carried:
        return []
    return ["**Carried by one cell**: " + "; ".join(
        f"`{c['target']}` vs `{c['baseline']}` ({c['top_cell']} gives {c['top_share']:.0%} of the net "
        f"{c['net']:+d}; ahead in {c['cells_target']} of {c['n_cells']} cells, behind in {c['cells_baseline']})"
        for c in carried) + ". Those cells share one haystack per needle position, so such a result "
        "is about that position of this haystack more than about needles in general (\"Cell by cell\")."]
