"""Cluster-correct statistics (smartkv/stats/clusters.py): prompts sharing a passage count once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smartkv.stats.clusters import attach_passage_clusters, cluster_sign_test, passage_cluster
from smartkv.stats.paired import compare, mcnemar_exact


def test_prompts_that_differ_only_in_their_key_share_a_passage():
    a = "The grass is green. The pass key is 52173. Remember it. What is the pass key?"
    b = a.replace("52173", "90812")
    assert passage_cluster("niah", a) == passage_cluster("niah", b)
    assert passage_cluster("niah", a) != passage_cluster("niah", a.replace("green", "blue"))
    assert passage_cluster("niah", a) != passage_cluster("passkey", a)


@pytest.mark.parametrize("n10, n01", [(0, 0), (1, 0), (5, 1), (12, 3), (9, 9), (20, 2)])
def test_with_one_prompt_per_cluster_the_sign_test_is_exact_mcnemar(n10, n01):
    d = np.array([1.0] * n10 + [-1.0] * n01 + [0.0] * 7)
    p, k, method = cluster_sign_test(d, None)
    assert k == n10 + n01
    assert p == pytest.approx(mcnemar_exact(n10, n01), abs=1e-12) if k <= 16 else method == "monte_carlo"


def test_repeated_keys_of_one_text_are_one_unit_of_evidence():
    """30 prompts that all win, but over 2 texts: a prompt count says p ~ 2e-9, the clusters cannot
    say better than 0.5 (two signs)."""
    d = np.ones(30)
    clusters = ["a"] * 15 + ["b"] * 15
    assert compare(d, np.zeros(30))["p"] < 1e-8
    row = compare(d, np.zeros(30), clusters)
    assert row["test"] == "cluster_sign_flip_exact" and row["n_clusters"] == 2
    assert row["p"] == pytest.approx(0.5) and row["p_prompts"] < 1e-8


def test_one_text_carrying_the_whole_win_is_not_significant():
    """Issue 33's headline: one text 33 vs 1 found, the other nine net slightly negative."""
    t = np.array([1] * 33 + [0] + [1, 0] * 45 + [0, 1] * 48, dtype=float)
    b = np.array([0] * 33 + [1] + [0, 1] * 45 + [1, 0] * 48, dtype=float)
    clusters = ["text0"] * 34 + [f"text{1 + i % 9}" for i in range(186)]
    row = compare(t, b, clusters)
    assert row["n_clusters"] == 10 and row["p_prompts"] < 0.05 and row["p"] > 0.05


def test_many_clusters_use_a_seeded_monte_carlo():
    rng = np.random.default_rng(0)
    d = rng.normal(0.2, 1.0, 400)
    clusters = np.repeat(np.arange(40), 10)
    p1, k, method = cluster_sign_test(d, clusters, seed=3)
    assert method == "monte_carlo" and k == 40 and 0 < p1 < 1 and p1 == cluster_sign_test(d, clusters, seed=3)[0]


def test_results_get_their_prompt_s_passage():
    tasks = pd.DataFrame({"task": ["niah", "niah", "niah"], "sample_id": ["s0", "s1", "s0"], "seed": [0, 0, 1],
                          "prompt": ["key 1 text", "key 2 text", "key 3 other"]})
    res = pd.DataFrame({"task": ["niah"] * 4, "sample_id": ["s0", "s1", "s0", "s9"], "seed": [0, 0, 1, 0],
                        "run": ["a"] * 4, "cluster": ["s0", "s1", "s0", "s9"]}, index=[5, 6, 7, 8])
    out = attach_passage_clusters(res, tasks)
    assert list(out.index) == [5, 6, 7, 8]
    assert out.loc[5, "cluster"] == out.loc[6, "cluster"] != out.loc[7, "cluster"]
    assert out.loc[8, "cluster"] == "niah:s9"  # not among the tasks: its own cluster


def test_the_missing_query_limitation_names_the_cells_not_yet_re_run():
    from smartkv.report.limitations import missing_query_limits

    prov = {"parts": {"smartkv": [{"cells": ["niah-1024-1of2"], "last_query": False},
                                  {"cells": ["niah-1024-2of2"], "last_query": True}],
                      "baselines": [{"cells": ["niah-1024-1of2", "niah-1024-2of2"]}]}}
    [line] = missing_query_limits(prov)
    assert "`smartkv` niah-1024-1of2" in line and "Re-run with it: `smartkv` niah-1024-2of2" in line
    prov["parts"]["smartkv"][0]["last_query"] = True
    assert missing_query_limits(prov) == [] and missing_query_limits(None) == []
