"""The report's summary leads with the comparisons a skeptic reads first (issue 33): INT3, KIVI-2, HQQ-4
and the strongest peer per kept ratio, each with its passage-by-passage count; comparisons against a
baseline near zero are listed as sanity checks and never counted as wins."""

from __future__ import annotations

import numpy as np
import pandas as pd

from smartkv.report.sections import primary_comparisons, summary_of_findings
from smartkv.stats.paired import clusters_ahead_behind, compare


def test_clusters_ahead_behind_counts_passages_by_their_summed_difference():
    d = np.array([1.0, 0.0, -1.0, 1.0, -1.0, 1.0])
    assert clusters_ahead_behind(d, ["a", "a", "b", "c", "d", "d"]) == (2, 1)  # d ties: neither
    assert clusters_ahead_behind(d, None) == (3, 2)  # each prompt its own cluster
    assert clusters_ahead_behind(np.array([]), None) == (0, 0)


def test_compare_reports_the_passage_counts_beside_the_pooled_mean():
    # one passage carries the whole pooled win: 8 prompts ahead there, one behind in each of 3 others
    t = np.array([1] * 8 + [0, 0, 0] + [1] * 9)
    b = np.array([0] * 8 + [1, 1, 1] + [1] * 9)
    clusters = ["p0"] * 8 + ["p1", "p2", "p3"] + [f"q{i}" for i in range(9)]
    row = compare(t, b, clusters)
    assert row["mean_diff"] > 0
    assert (row["clusters_ahead"], row["clusters_behind"], row["n_clusters"]) == (1, 3, 13)


def _row(target, baseline, t_mean, b_mean, *, outcome_p=1.0, t_kv=0.24, b_kv=0.25, ahead=3, behind=2, k=10):
    return {"family": "baselines vs matched SmartKV [score]", "target": target, "baseline": baseline, "task": "all",
            "measure": "score", "higher_is_better": True, "n_pairs": 210, "target_mean": t_mean,
            "baseline_mean": b_mean, "mean_diff": t_mean - b_mean, "ci_lo": t_mean - b_mean - 0.1,
            "ci_hi": t_mean - b_mean + 0.1, "n_clusters": k, "clusters_ahead": ahead, "clusters_behind": behind,
            "p_holm": outcome_p, "significant": outcome_p < 0.05,
            "verdict": ("target better" if t_mean > b_mean else "target worse") if outcome_p < 0.05 else "inconclusive",
            "target_kv_ratio": t_kv, "baseline_kv_ratio": b_kv}


def _tests() -> pd.DataFrame:
    return pd.DataFrame([
        _row("smartkv@int3", "int3", 0.92, 0.78),
        _row("smartkv@kivi-2", "kivi-2", 0.94, 0.71, outcome_p=0.01, ahead=9, behind=1),
        _row("smartkv-b0.20", "int2", 0.61, 0.014, outcome_p=0.03),
        _row("smartkv-b0.15", "snapkv-k0.15", 0.57, 0.0, outcome_p=0.02, t_kv=0.145, b_kv=0.155),
        _row("smartkv-b0.15", "knorm-k0.15", 0.57, 0.70, outcome_p=0.5, t_kv=0.145, b_kv=0.155, ahead=2, behind=6),
    ])


def test_primary_comparisons_take_the_named_baselines_and_the_strongest_peer_per_kept_ratio():
    primary = primary_comparisons(_tests().assign(outcome="x"))
    assert [r["baseline"] for r, _ in primary] == ["int3", "kivi-2", "knorm-k0.15"]
    assert "picked on test" in primary[-1][1]


def test_summary_leads_with_the_primary_comparisons_and_lists_sanity_checks_apart():
    lines = summary_of_findings(_tests(), {})
    assert lines[0].startswith("- Main grid, classic needles")  # the passages' lines lead when that section ran
    assert lines[1].startswith("  - `smartkv@int3`") and "ahead in 3 and behind in 2 of 10 passages" in lines[1]
    assert "`knorm-k0.15`" in lines[3] and "behind in 6 of 10 passages" in lines[3]
    counts = next(x for x in lines if "substantive comparisons" in x)
    # kivi-2 is the one real win; the int2 and snapkv wins are against baselines near zero
    assert "significantly better in 1 substantive" in counts
    checks = next(x for x in lines if x.startswith("- Sanity checks"))
    assert "`int2` scores 0.014" in checks and "`snapkv-k0.15` scores 0.000" in checks and "knorm" not in checks
