"""The study's targets in REPORT (smartkv/report/goals.py) and the budget bounds behind them
(smartkv/budget_bounds.py): met only with Δ >= 0 and a CI that rules out a loss > margin."""

from __future__ import annotations

import pandas as pd
import pytest

from smartkv.report.goals import goal_rows, goals_section, judge
from smartkv.budget_bounds import budget_bounds


def _test(target, baseline, diff, lo, hi, task="all", measure="score", **kw) -> dict:
    return {"target": target, "baseline": baseline, "task": task, "measure": measure, "n_pairs": 200,
            "target_mean": 0.8 + diff, "baseline_mean": 0.8, "mean_diff": diff, "ci_lo": lo, "ci_hi": hi,
            "target_kv_ratio": 0.245, "baseline_kv_ratio": 0.25, "p_holm": 0.5, **kw}


@pytest.mark.parametrize("diff, lo, met", [(0.10, 0.02, True), (0.01, -0.04, True), (0.0, -0.049, True),
                                           (0.01, -0.06, False), (-0.01, -0.03, False), (0.0, -0.05, False)])
def test_a_target_needs_a_point_estimate_at_least_zero_and_a_ci_above_minus_the_margin(diff, lo, met):
    assert judge(diff, lo, 0.05) is met


def test_every_matched_comparison_is_judged_where_it_was_measured():
    tests = pd.DataFrame([_test("smartkv@int3", "int3", 0.12, 0.05, 0.2),
                          _test("smartkv@int3", "int3", 0.12, 0.05, 0.2, task="niah@1k"),  # per task: not a row
                          _test("smartkv@int3", "int3", 0.3, 0.2, 0.4, measure="kl_fp16"),  # not accuracy
                          _test("smartkv@kivi-4", "fp16", -0.01, -0.03, 0.0),  # the reference: not a target
                          _test("smartkv@int4", "hqq-4", -0.05, -0.08, -0.02)])
    extra = {"model": "default", "comparisons": [_test("smartkv@int3", "int3", 0.03, -0.04, 0.11),
                                                 _test("smartkv@int3", "int3", -0.06, -0.16, 0.04, task="niah@4k")]}
    abl = pd.DataFrame([_test("smartkv", "random-alloc", 0.19, 0.13, 0.25), _test("smartkv", "oracle", 0, -0.1, 0.1)])
    # a section's oracle comparison is a diagnostic (the ceiling of ranking), not a goal
    extra["comparisons"].append(dict(_test("smartkv", "oracle", -0.2, -0.3, -0.1),
                                     family="extra cells: headline vs the oracle ranking [score]"))
    rows = goal_rows(tests, abl, {"extra_cells": extra}, 0.05)
    got = [(r["where"], r["baseline"], r["met"]) for r in rows]
    assert got == [("main grid, pooled", "int3", True), ("main grid, pooled", "hqq-4", False),
                   ("`extra_cells` (default), pooled", "int3", True),
                   ("`extra_cells` (default), niah@4k", "int3", False),
                   ("ablations, pooled (same budget)", "random-alloc", True)]
    text = "\n".join(goals_section(tests, abl, {"extra_cells": extra}, 0.05))
    assert "3 of 5 met." in text and "more than 5 points" in text
    assert "| `extra_cells` (default), niah@4k | `smartkv@int3` vs `int3` | 0.245 / 0.250 | 0.740 / 0.800 | " \
           "-0.060 [-0.160, +0.040] | 200 | 0.500 | not met |" in text


def _rows(gaps, budget=0.25, errors=()) -> pd.DataFrame:
    rows = [{"run": "smartkv", "method": "smartkv", "budget": budget, "kv_ratio": budget + g, "error": ""} for g in gaps]
    rows += [{"run": "smartkv", "method": "smartkv", "budget": budget, "kv_ratio": float("nan"), "error": e}
             for e in errors]
    rows.append({"run": "int3", "method": "uniform", "budget": float("nan"), "kv_ratio": 0.25, "error": ""})
    return pd.DataFrame(rows)


def test_budget_bounds_count_rows_over_the_cap_and_rows_that_leave_more_than_the_slack():
    ok = budget_bounds(_rows([-0.004, -0.019, 0.0], errors=["below the floor"]), 0.02)
    assert ok["all_within"] and set(ok["runs"]) == {"smartkv"}  # baselines are not SmartKV rows
    r = ok["runs"]["smartkv"]
    assert (r["n"], r["n_error"], r["n_over"], r["n_under"]) == (3, 1, 0, 0)
    assert (r["gap_min"], r["gap_max"]) == (pytest.approx(-0.019), pytest.approx(0.0))
    bad = budget_bounds(_rows([0.001, -0.03, -0.01]), 0.02)
    assert not bad["all_within"] and (bad["runs"]["smartkv"]["n_over"], bad["runs"]["smartkv"]["n_under"]) == (1, 1)
    assert not budget_bounds(_rows([])[lambda d: d["method"] != "smartkv"], 0.02)["all_within"]  # nothing to vouch for
    with pytest.raises(ValueError, match=r"slack=-0.1"):
        budget_bounds(_rows([0.0]), -0.1)


def test_the_section_says_plainly_when_a_budget_is_not_held():
    b = {"slack": 0.02, "all_within": False,
         "stages": {"smartkv": {"all_within": False, "runs": {"smartkv-b0.10": {
             "n": 10, "n_over": 2, "n_under": 0, "gap_min": -0.01, "gap_max": 0.003}}}}}
    text = "\n".join(goals_section(None, None, {"budgets": b}, 0.05))
    assert "_no matched comparisons were run_" in text
    assert "Budgets: **not met**: outside [budget − 0.02, budget] in `smartkv`/`smartkv-b0.10` (2 over, 0 under, of 10)" in text
