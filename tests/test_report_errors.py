"""The errors analysis, the generated report's result-chosen prose and the slides, on synthetic frames."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from smartkv import stats
from smartkv.analysis import errors as err
from smartkv.report import findings, render_report, significant_losses
from smartkv.report.slides import render_slides, slide_texts

N = 40


def _rows(run, method, family, scores, kv, matched_to="", needle=None):
    out = []
    for i, s in enumerate(scores):
        out.append({"run": run, "method": method, "family": family, "budget": np.nan, "bits": np.nan,
                    "task": "niah", "sample_id": f"niah-{i}", "cluster": f"niah-{i}", "seed": 0,
                    "context_length": 1024 if i % 2 else 2048, "depth": [0.1, 0.5, 0.9][i % 3],
                    "answers": '["1"]', "metric": "contains", "error": "", "prediction": str(s),
                    "score": float(s), "nll": np.nan, "kv_ratio": kv, "kv_bytes": int(kv * 1000),
                    "needle_bits": np.nan if needle is None else needle[i], "haystack_bits": np.nan if needle is None else 3.0,
                    "matched_to": matched_to, "split": "test"})
    return out


@pytest.fixture
def results():
    """int3 right on every prompt; smartkv@int3 wrong on the first 20 (a clear loss), with
    fewer bits on the needle where it fails; kivi-2 and its partner split evenly."""
    sk = [0] * 20 + [1] * 20
    needle = [2.0] * 20 + [4.0] * 20
    rows = (_rows("fp16", "fp16", "baseline", [1] * N, 1.0)
            + _rows("int3", "uniform", "baseline", [1] * N, 0.25)
            + _rows("smartkv@int3", "smartkv", "smartkv", sk, 0.249, "int3", needle)
            + _rows("kivi-2", "kivi", "baseline", [i % 2 for i in range(N)], 0.2)
            + _rows("smartkv@kivi-2", "smartkv", "smartkv", [(i + 1) % 2 for i in range(N)], 0.199, "kivi-2",
                    [3.0] * N))
    return pd.DataFrame(rows)


def test_pairs_follow_matched_to_and_leave_fp16_out(results):
    m = err.pairs(results)
    assert dict(zip(m["baseline"], m["target"])) == {"int3": "smartkv@int3", "kivi-2": "smartkv@kivi-2"}


def test_discordant_prompts_and_counts(results):
    paired = err.paired_outcomes(results, err.pairs(results))
    flips = err.discordant(paired)
    mine = flips[flips["smartkv_run"] == "smartkv@int3"]
    assert len(mine) == 20 and set(mine["direction"]) == {err.SMARTKV_FAILS}
    assert set(mine["sample_id"]) == {f"niah-{i}" for i in range(20)}
    kivi = flips[flips["smartkv_run"] == "smartkv@kivi-2"]
    assert kivi["direction"].value_counts().to_dict() == {err.SMARTKV_FAILS: 20, err.BASELINE_FAILS: 20}
    counts = {c["smartkv_run"]: c for c in err.pair_counts(paired)}
    assert counts["smartkv@int3"][err.SMARTKV_FAILS] == 20 and counts["smartkv@int3"][err.BASELINE_FAILS] == 0


def test_failure_strata_rates_and_exact_cis(results):
    s = err.failure_strata(results, ["smartkv@int3", "int3"])
    depth = s[(s["run"] == "smartkv@int3") & (s["factor"] == "depth")]
    assert depth["n"].sum() == N and depth["failures"].sum() == 20
    assert ((s["ci_lo"] >= 0) & (s["ci_lo"] <= s["rate"]) & (s["rate"] <= s["ci_hi"]) & (s["ci_hi"] <= 1)).all()
    zero = s[s["run"] == "int3"]
    assert (zero["rate"] == 0).all() and (zero["ci_hi"] > 0).all()  # no failures is not certainty
    assert set(s["factor"]) == {"context_length", "depth", "task"}


def test_needle_bits_by_outcome_and_json(results):
    bits = err.needle_bits(results, ["smartkv@int3"]).set_index("outcome")
    assert bits.loc["failure", "needle_bits"] == 2.0 and bits.loc["success", "needle_bits"] == 4.0
    assert bits.loc["failure", "gap"] == -1.0 and bits.loc["failure", "n"] == 20
    assert bits.loc["failure", "p_gap"] < 0.001
    paired = err.paired_outcomes(results, err.pairs(results))
    doc = err.errors_json("test", err.pair_counts(paired), err.failure_strata(results, ["smartkv@int3"]),
                          err.needle_bits(results, ["smartkv@int3"]))
    json.dumps(doc, allow_nan=False)  # NaN would break `dvc metrics show`
    assert doc["pairs"]["smartkv@int3_vs_int3"]["smartkv fails"] == 20


def _tests(results):
    t = pd.concat([stats.paired_tests(results, f"smartkv@{b}", [b], family="baselines vs matched SmartKV [score]")
                   for b in ("int3", "kivi-2")], ignore_index=True)
    return stats.apply_holm(t)


def _sens(direction: float) -> dict:
    """Top vs bottom: KL(top) − KL(bottom) = direction × 0.1, CI excluding 0."""
    c = {"top_vs_bottom": {"a": "top-window-k10", "b": "bottom-window-k10", "accuracy_a": 0.9 if direction < 0 else 0.4,
                           "accuracy_b": 0.4 if direction < 0 else 0.9,
                           "kl_diff": {"mean_diff": 0.1 * direction, "ci_lo": 0.1 * direction - 0.02,
                                       "ci_hi": 0.1 * direction + 0.02, "n": 60},
                           "mcnemar": {"only_a": 2, "only_b": 30, "p_mcnemar": 1e-6}}}
    return {"comparisons": {"window-k10": c}, "n_prompts": 60, "fp16_accuracy": 0.95,
            "design": {"low_bits": 2, "high_bits": 4}}


def test_hypothesis_verdict_follows_the_sign():
    assert findings.hypothesis(_sens(+1))["verdict"] == "supported"
    h = findings.hypothesis(_sens(-1))
    assert h["verdict"] == "contradicted" and bool(h["table"]["significant"].iloc[0])
    assert findings.hypothesis(None) is None


def test_report_says_a_loss_plainly_and_lists_it_apart(results, tmp_path):
    tests = _tests(results)
    loss = tests[tests["target"] == "smartkv@int3"].iloc[0]
    assert loss["significant"] and loss["verdict"] == "target worse"  # the fixture is a clear loss
    summary = stats.summarize(results)
    md = render_report(summary, tests, None, {}, {"model": "m"}, {"config": {}}, str(tmp_path),
                       metrics={"sensitivity": _sens(-1)})
    head = md.split("## Background")[0]
    assert "significantly worse in 1" in head and "**SmartKV is significantly worse**" in head
    assert "**contradicted**" in head
    lim = md.split("## Limitations")[1].split("## Conclusion")[0]
    first, *rest = [x for x in lim.splitlines() if x.startswith("- ")]
    assert first.startswith("- **Significant loss**") and "`smartkv@int3` vs `int3`" in first
    inconclusive = next(x for x in rest if x.startswith("- Inconclusive"))
    assert "`smartkv@kivi-2` vs `kivi-2`" in inconclusive and "smartkv@int3" not in inconclusive
    assert "loses significantly to 1" in md.split("## Conclusion")[1]
    assert significant_losses(tests[tests["target"] == "smartkv@kivi-2"]) == []


def test_report_names_missing_metrics_files(results, tmp_path):
    md = render_report(stats.summarize(results), _tests(results), None, {}, {}, {"config": {}}, str(tmp_path),
                       metrics={})
    for name, stage in (("attention", "attention"), ("sensitivity", "sensitivity"), ("errors", "errors"),
                        ("latency", "latency"), ("profile", "profile")):
        assert f"`metrics/{name}.json` is missing" in md and f"`dvc repro {stage}`" in md
    for heading in ("## Method", "## Background and related work", "## Error analysis", "## Cost", "```text"):
        assert heading in md


def test_slides_twelve_pages_deterministic(results, tmp_path):
    tests, summary = _tests(results), stats.summarize(results)
    metrics = {"sensitivity": _sens(-1)}
    a = render_slides(summary, tests, None, metrics, {"model": "m"}, tmp_path / "plots", tmp_path / "a.pdf")
    b = render_slides(summary, tests, None, metrics, {"model": "m"}, tmp_path / "plots", tmp_path / "b.pdf")
    data = a.read_bytes()
    assert data[:4] == b"%PDF" and data == b.read_bytes() and b"CreationDate" not in data
    assert data.count(b"/Type /Page\n") + data.count(b"/Type /Page ") + data.count(b"/Type /Page>") == 12
    txt = slide_texts(summary, tests, None, metrics, {"model": "m"})
    assert any("Significant loss" in x and "smartkv@int3" in x for x in txt["limitations"])
    assert any("contradicted" in x for x in txt["insight"])
