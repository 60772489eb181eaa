"""The stats stage's wiring on a synthetic results frame: matching, families, tables, params."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smartkv import stats
from stages import stats as stage
from smartkv.study.params import ParamError, stats_settings
from smartkv.study.labels import HEADLINE

RUNS = {  # run -> (family, kv_ratio, p_correct)
    "int3": ("baseline", 0.25, 0.7), "kivi-2": ("baseline", 0.236, 0.5), "int2": ("baseline", 0.188, 0.1),
    f"{stats.EXACT_PREFIX}int3": ("smartkv", 0.249, 0.75), HEADLINE: ("smartkv", 0.299, 0.8),
    "smartkv-b0.22": ("smartkv", 0.22, 0.6), "random-alloc": ("ablation", 0.30, 0.5),
}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    difficulty = rng.random((2, 30))  # shared per prompt, so runs' outcomes are correlated
    rows = []
    for run, (family, ratio, p) in RUNS.items():
        for ti, task in enumerate(("niah", "ruler", "perplexity")):
            for i in range(30):
                ppl = task == "perplexity"
                rows.append(dict(run=run, method="m", family=family, budget=np.nan, bits=np.nan, task=task,
                                 sample_id=f"s{i}", seed=0, cluster=f"{task}-h{i // 3}",
                                 score=np.nan if ppl else float(difficulty[ti, i] < p),
                                 nll=2 + (1 - p) + 0.1 * rng.random() if ppl else np.nan,
                                 kv_ratio=ratio * (1.3 if ppl else 1.0), kv_bytes=int(1000 * ratio),
                                 tokens_per_s=1.0))
    return pd.DataFrame(rows)


def test_matched_tests_pair_exact_labels_and_adjust_per_family(frame):
    settings = stats_settings({})
    main = frame[frame["family"] != "ablation"]
    tests = stage.matched_tests(main, stats.overall(main), settings)
    pooled = tests[tests["task"] == "all"].set_index(["baseline", "measure"])
    assert pooled.loc[("int3", "score"), "target"] == f"{stats.EXACT_PREFIX}int3"
    assert pooled.loc[("int3", "score"), "match"] == "exact_label"
    assert pooled.loc[("int2", "score"), "match"] == "nearest_above"
    # Memory of both sides over the same prompts: accuracy rows for score, perplexity rows for NLL.
    assert pooled.loc[("int3", "score"), "baseline_kv_ratio"] == pytest.approx(0.25)
    assert pooled.loc[("int3", "nll"), "baseline_kv_ratio"] == pytest.approx(0.25 * 1.3)
    assert pooled.loc[("int3", "score"), "target_kv_bytes"] == 249
    # prompts share haystacks (3 per cluster): the test counts clusters, the prompt-level McNemar p is kept
    assert pooled.xs("score", level="measure")["test"].str.startswith("cluster_sign_flip").all()
    assert pooled.xs("score", level="measure")["p_prompts"].notna().all()
    assert (pooled.xs("score", level="measure")["n_clusters"] == 20).all()  # 2 tasks x 10 haystacks
    # Holm within each family: recompute one family by hand.
    fam = tests[tests["family"] == "baselines vs matched SmartKV [score]"]
    assert len(fam) == 3 and fam["p_holm"].tolist() == pytest.approx(list(stats.holm(fam["p"])))
    assert (tests["significant"] == (tests["p_holm"] < 0.05)).all()
    assert set(tests.loc[~tests["significant"], "verdict"]) <= {"inconclusive"}
    power = stats.power_report(tests)
    md = stats.main_table(stats.summarize(main), tests, power)
    assert md.count("**") == 4 * int(tests.loc[tests["task"] == "all", "significant"].sum())
    assert "exact_label" in md and "mean of per-task means" in md and "## Power" in md


def test_ablation_tests_against_headline(frame):
    tests = stage.ablation_tests(frame, ["random-alloc"], stats_settings({}))
    assert set(tests["measure"]) == {"score", "nll"}
    assert (tests["target"] == HEADLINE).all() and (tests["baseline"] == "random-alloc").all()
    assert set(tests["family"]) == {"ablations vs headline [score]", "ablations vs headline [nll]"}


@pytest.mark.parametrize("key, value", [("alpha", 0.0), ("alpha", "0.05"), ("noninferiority_margin", -0.05),
                                        ("power_effect", 1.5), ("power_target", True)])
def test_stats_settings_reject_bad_values(key, value):
    with pytest.raises(ParamError, match=f"stats.{key}="):
        stats_settings({"stats": {key: value}})
