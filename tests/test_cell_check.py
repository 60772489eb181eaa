"""The cell-by-cell view of a paired 0/1 comparison (smartkv/cell_check.py) and its report lines."""

import pandas as pd
import pytest

from smartkv.cell_check import cell_check, cell_name, describe
from smartkv.report.cells_section import carried_by_one_cell, cells_section


def _rows(cells: dict) -> pd.DataFrame:
    """cells: (length, depth) -> list of (target score, baseline score), one pair per prompt."""
    rows = []
    for (length, depth), pairs in cells.items():
        for i, (t, b) in enumerate(pairs):
            for run, score in (("ours", t), ("base", b)):
                rows.append({"run": run, "task": "niah", "context_length": length, "depth": depth,
                             "sample_id": f"{length}-{depth}-{i}", "seed": 0, "score": float(score)})
    return pd.DataFrame(rows)


def test_one_cell_carrying_the_net_is_named_with_its_share():
    df = _rows({(1024, 0.1): [(1, 0)] * 6, (1024, 0.5): [(0, 1), (1, 1)], (2048, 0.5): [(0, 1), (0, 0)]})
    c = cell_check(df, "ours", "base")
    assert (c["n_cells"], c["cells_target"], c["cells_baseline"], c["cells_tied"]) == (3, 1, 2, 0)
    assert c["net"] == 4 and c["top_cell"] == "niah@1k d0.1" and c["top_share"] == pytest.approx(6 / 4)
    assert c["sign_p"] == pytest.approx(1.0)  # 1 cell up, 2 down: no direction across cells
    assert [x["cell"] for x in c["cells"]] == ["niah@1k d0.1", "niah@1k d0.5", "niah@2k d0.5"]
    assert "ahead in 1 of 3 cells, behind in 2" in describe(c) and "150% of its net +4" in describe(c)
    lines = carried_by_one_cell({"comparisons": [c]})
    assert len(lines) == 1 and "`ours` vs `base` (niah@1k d0.1 gives 150%" in lines[0]
    # with the tests at hand, only a significant comparison is flagged
    tests = pd.DataFrame([{"target": "ours", "baseline": "base", "measure": "score", "task": "all",
                           "significant": sig} for sig in (False,)])
    assert carried_by_one_cell({"comparisons": [c]}, tests) == []
    assert carried_by_one_cell({"comparisons": [c]}, tests.assign(significant=True)) == lines


def test_a_win_spread_over_cells_is_not_flagged_and_the_sign_test_sees_it():
    df = _rows({(1024, d): [(1, 0), (1, 1)] for d in (0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6)})
    c = cell_check(df, "ours", "base")
    assert c["cells_target"] == 8 and c["sign_p"] == pytest.approx(2 * 0.5 ** 8)
    assert c["top_share"] == pytest.approx(1 / 8) and carried_by_one_cell({"comparisons": [c]}) == []


def test_no_net_no_top_cell_and_unscored_prompts_left_out():
    df = _rows({(1024, 0.1): [(1, 0), (0, 1)], (1024, 0.3): [(1, 1)]})
    df.loc[(df.run == "ours") & (df.sample_id == "1024-0.3-0"), "score"] = float("nan")
    c = cell_check(df, "ours", "base")
    assert c["net"] == 0 and c["top_cell"] is None and c["n_prompts"] == 2 and c["n_cells"] == 1
    assert "gives" not in describe(c)
    with pytest.raises(ValueError, match="no prompt scored by both 'ours' and 'nobody'"):
        cell_check(df, "ours", "nobody")


def test_cell_names_and_tasks_without_depth():
    assert cell_name(("niah", 4096, 0.7)) == "niah@4k d0.7" and cell_name(("ruler_vt", 1000, float("nan"))) == "ruler_vt@1000"
    df = _rows({(1024, 0.1): [(1, 0)]}).drop(columns="depth")
    assert cell_check(df, "ours", "base")["cells"][0]["cell"] == "niah@1k"
    assert "metrics/cells.json` is missing" in cells_section(None)[0]
    assert "counts keys, not haystacks" in cells_section({"comparisons": []})[0]
    c = cell_check(df, "ours", "base")
    lines = cells_section({"comparisons": [], "matched_stages": {"extra_cells": [c]}})
    assert "In `extra_cells`:" in lines and any(x.startswith("- `ours` vs `base`: ahead in 1 of 1") for x in lines)


def test_drawn_depths_fall_in_fifths_and_grid_depths_stay():
    """`niah_passage` draws each prompt's depth: its cells are the fifths of [0, 1], not one prompt each."""
    df = _rows({(1024, d): [(1, 0)] for d in (0.05, 0.19, 0.21, 0.55, 0.95)})
    c = cell_check(df.assign(task="niah_passage"), "ours", "base")
    assert [(x["cell"], x["n"]) for x in c["cells"]] == [
        ("niah_passage@1k d0.1", 2), ("niah_passage@1k d0.3", 1), ("niah_passage@1k d0.5", 1), ("niah_passage@1k d0.9", 1)]
    # a task with a depth grid keeps its depths as they are
    assert cell_check(df, "ours", "base")["n_cells"] == 5
