"""smartkv.study and smartkv.sweeps without a model: matched budgets, results/timings split, sweeps summary."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from smartkv import sweeps
from smartkv.study import driver, match


def rows(run, split, ratios, error="", metric="substring"):
    return [{"run": run, "split": split, "kv_ratio": r, "error": error, "seed": 0, "task": "niah",
             "sample_id": f"s{i}", "metric": metric} for i, r in enumerate(ratios)]


def test_measure_means_each_split_over_scored_rows():
    df = pd.DataFrame(rows("int3", "test", [0.25, 0.27]) + rows("int3", "dev", [0.3])
                      + rows("int3", "test", [math.nan], error="floor") + rows("kivi-2", "test", [0.2, 0.4])
                      + rows("fp16", "test", [1.0]) + rows("int3", "test", [0.5], metric="perplexity"))
    m = match.measure(df, ["int3", "kivi-2"])
    assert m["test"]["int3"] == {"kv_ratio": 0.26, "kv_ratio_min": 0.25, "kv_ratio_max": 0.27, "n_prompts": 2}
    assert m["dev"]["int3"]["kv_ratio"] == 0.3 and "kivi-2" not in m["dev"]
    assert m["test"]["kivi-2"]["kv_ratio"] == pytest.approx(0.3)
    assert "fp16" not in m["test"]  # only the baselines asked for
    assert match.budgets(m, "test") == {"int3": 0.26, "kivi-2": pytest.approx(0.3)}


def test_budgets_skip_what_smartkv_cannot_match():
    m = {"test": {"peer": {"kv_ratio": 1.2}, "int4": {"kv_ratio": 0.31}}}
    assert match.budgets(m, "test") == {"int4": 0.31}
    assert match.budgets(m, "dev") == {}


def test_split_timings_keeps_results_free_of_wall_clock():
    df = pd.DataFrame([{"run": "fp16", "method": "fp16", "family": "baseline", "split": "test", "task": "niah",
                        "sample_id": "a", "seed": 0, "context_length": 100, "new_tokens": 4, "score": 1.0,
                        "prediction": "x", "prefill_s": 0.1, "fork_s": 0.01, "decode_s": 0.2, "tokens_per_s": 20.0}])
    results, timings = driver.split_timings(df)
    assert not set(driver.TIMING_COLUMNS) & set(results.columns)
    assert {"score", "prediction"} <= set(results.columns)
    assert set(timings.columns) == set(driver.ROW_KEYS) | (set(driver.TIMING_COLUMNS) & set(df.columns))
    assert timings["tokens_per_s"].tolist() == [20.0]


def test_run_metrics_are_per_prompt_means():
    base = {"metric": "substring", "nll": math.nan, "kv_ratio": 0.25}
    df = pd.DataFrame([{**base, "run": "smartkv", "score": 1.0, "error": ""},
                       {**base, "run": "smartkv", "score": 0.0, "error": ""},
                       {**base, "run": "smartkv", "score": math.nan, "error": "below floor", "kv_ratio": math.nan},
                       {**base, "run": "smartkv", "metric": "perplexity", "score": math.nan, "nll": 2.0, "error": ""}])
    m = driver.run_metrics(df)["runs"]["smartkv"]
    assert m == {"score_mean": 0.5, "kv_ratio": 0.25, "n_prompts": 2, "n_errors": 1, "nll_mean": 2.0}


def exp(name, split, score, **params):
    p = {"split": split, "budget": 0.25, "decay": 0.9, "realloc_freq": 16, "smartkv": {"allocation": "greedy"}}
    for k, v in params.items():
        if k == "allocation":
            p["smartkv"]["allocation"] = v
        else:
            p[k] = v
    return {"rev": name * 8, "name": name, "error": None,
            "data": {"params": {"params.yaml": {"data": p}},
                     "metrics": {sweeps.METRICS_FILE: {"data": {"runs": {"smartkv": {
                         "score_mean": score, "kv_ratio": p["budget"] - 0.01, "n_prompts": 10}}}}}}}


def shown(*exps):
    """The shape of `dvc exp show --json`: the workspace, then baseline commits with experiments."""
    return [{"rev": "workspace", "experiments": None},
            {"rev": "abc", "experiments": [{"revs": [e], "name": e["name"]} for e in exps]}]


CURRENT = {"budget": 0.25, "decay": 0.9, "realloc_freq": 16, "smartkv": {"allocation": "greedy"}}


def test_sweeps_with_no_experiments_say_so(tmp_path):
    s = sweeps.summarize(sweeps.finished(shown()), CURRENT)
    assert s["note"] == "no experiments yet" and s["n_experiments"] == 0 and s["params"] == {}
    paths = sweeps.plot(s, tmp_path / "sweeps")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_sweeps_choose_on_dev_seeds_one_factor_at_a_time(tmp_path):
    exps = [exp("d85", "dev", 0.6, decay=0.85), exp("d90", "dev", 0.7), exp("d95", "dev", 0.8, decay=0.95),
            exp("t95", "test", 0.1, decay=0.95),              # test seeds: never evidence
            exp("d95r8", "dev", 0.99, decay=0.95, realloc_freq=8),  # two factors off the current values
            exp("r8", "dev", 0.5, realloc_freq=8), exp("dp", "dev", 0.75, allocation="dp")]
    failed = {**exp("bad", "dev", 0.9, decay=0.99), "error": {"msg": "failed"}}
    s = sweeps.summarize(sweeps.finished(shown(*exps, failed)), CURRENT)
    assert s["n_experiments"] == 7 and s["n_dev"] == 6
    decay = s["params"]["decay"]
    assert [v["value"] for v in decay["values"]] == [0.85, 0.9, 0.95]
    assert [v["experiments"] for v in decay["values"]] == [["d85"], ["d90"], ["d95"]]
    assert decay["best_on_dev"] == 0.95 and decay["current"] == 0.9
    assert s["params"]["realloc_freq"]["best_on_dev"] == 16
    assert s["params"]["smartkv.allocation"]["best_on_dev"] == "dp"
    assert "budget" not in s["params"]  # one value only: not swept
    json.dumps(s)  # what the stage writes
    paths = sweeps.plot(s, tmp_path / "sweeps")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_value_scored_on_fewer_prompts_is_not_the_best_on_dev():
    """dp refuses the 2k prompts (too many DP cells): its mean over the 1k prompts alone is
    higher, but over an easier set; the value with every prompt stays the choice."""
    dp = exp("dp", "dev", 0.97, allocation="dp")
    dp["data"]["metrics"][sweeps.METRICS_FILE]["data"]["runs"]["smartkv"]["n_prompts"] = 6
    s = sweeps.summarize(sweeps.finished(shown(exp("greedy", "dev", 0.94), dp)), CURRENT)
    alloc = s["params"]["smartkv.allocation"]
    assert alloc["best_on_dev"] == "greedy"
    by = {v["value"]: v for v in alloc["values"]}
    assert "6 of 10 prompts" in by["dp"]["note"] and by["greedy"].get("note") is None


def test_sweep_values_are_ordered_by_number_not_text():
    exps = [exp(f"r{f}", "dev", 0.5, realloc_freq=f) for f in (64, 4, 16, 32, 8)]
    s = sweeps.summarize(sweeps.finished(shown(*exps)), CURRENT)
    assert [v["value"] for v in s["params"]["realloc_freq"]["values"]] == [4, 8, 16, 32, 64]


def test_budget_sweep_is_shown_not_chosen():
    s = sweeps.summarize(sweeps.finished(shown(exp("b3", "dev", 0.8, budget=0.3), exp("b5", "dev", 0.9, budget=0.5))),
                         {**CURRENT, "budget": 0.3})
    assert s["params"]["budget"]["best_on_dev"] is None
    assert [v["kv_ratio"] for v in s["params"]["budget"]["values"]] == pytest.approx([0.29, 0.49])


def test_a_tie_on_dev_keeps_the_current_value():
    s = sweeps.summarize(sweeps.finished(shown(exp("d85", "dev", 0.7, decay=0.85), exp("d90", "dev", 0.7))), CURRENT)
    assert s["params"]["decay"]["best_on_dev"] == 0.9


def results(scores, logprobs, run="smartkv"):
    """An experiment's data/smartkv.parquet: the headline run's rows, plus another run's."""
    rows = [{"run": run, "task": "niah", "metric": "substring", "sample_id": f"s{i}", "seed": 100,
             "context_length": 1024, "score": s, "answer_logprob": lp, "kl_fp16": 0.1, "nll": math.nan}
            for i, (s, lp) in enumerate(zip(scores, logprobs))]
    # a perplexity row: its nll is compared, its (continuation's) answer log-likelihood is not
    ppl = {**rows[0], "task": "perplexity", "metric": "perplexity", "sample_id": "p0", "score": math.nan,
           "answer_logprob": -900.0 + len(scores), "nll": 1.5}
    return pd.DataFrame(rows + [ppl, {**rows[0], "run": "smartkv-b0.10", "score": 0.0}])


def test_sweeps_compare_each_value_with_the_current_one_on_the_same_prompts(tmp_path):
    n = 12
    at = {"d90" * 8: results([1.0] * n, [-1.0] * n),                          # the current value
          "d85" * 8: results([0.0] * 4 + [1.0] * (n - 4), [-3.0] * n),        # worse on 4 prompts, lower log-lik.
          "d95" * 8: results([1.0] * n, [-1.0 + 0.01 * i for i in range(n)])}  # same accuracy, a bit higher
    exps = [exp("d85", "dev", 8 / n, decay=0.85), exp("d90", "dev", 1.0), exp("d95", "dev", 1.0, decay=0.95),
            exp("old", "dev", 0.5, realloc_freq=8), exp("r16", "dev", 1.0)]  # r16: no rows found
    s = sweeps.summarize(sweeps.finished(shown(*exps), at.get), CURRENT)
    by = {v["value"]: v for v in s["params"]["decay"]["values"]}
    assert "vs_current" not in by[0.9] and by[0.9]["answer_logprob_mean"] == -1.0
    worse = by[0.85]["vs_current"]
    assert worse["score"]["test"] == "mcnemar_exact" and worse["score"]["n_pairs"] == n
    assert (worse["score"]["n_value_only"], worse["score"]["n_current_only"]) == (0, 4)
    assert worse["score"]["p"] == pytest.approx(0.125)  # exact: 2 * 0.5**4
    assert worse["answer_logprob"]["mean_diff"] == pytest.approx(-2.0)
    assert by[0.95]["vs_current"]["answer_logprob"]["mean_diff"] == pytest.approx(0.055)
    assert worse["answer_logprob"]["n_pairs"] == n and "nll" not in worse  # one perplexity pair: no test
    p_holm = [t["p_holm"] for v in (worse, by[0.95]["vs_current"]) for t in v.values()]
    assert all(p is not None and 0 <= p <= 1 for p in p_holm)
    assert min(p_holm) >= min(t["p"] for v in (worse, by[0.95]["vs_current"]) for t in v.values())
    # per-prompt rows travel in the summary: the evidence does not need the experiment refs
    assert s["experiments"][[e["name"] for e in s["experiments"]].index("d85")]["per_prompt"]["score"].count(0.0) == 4
    # a value whose current-value partner has no recorded rows says so instead of testing
    r8 = {v["value"]: v for v in s["params"]["realloc_freq"]["values"]}[8]
    assert "not recorded" in r8["vs_current"]["note"]
    json.dumps(s)
    assert all(p.stat().st_size > 1000 for p in sweeps.plot(s, tmp_path / "sweeps"))
    # the report's section: one row per value, the current marked, Holm-significant deltas bold
    from smartkv.report.sweeps_section import sweeps_section
    text = "\n".join(sweeps_section(s))
    assert "| 0.9 (current) | 10 | 1.000 | – |" in text and "(0/4)" in text
    assert "**-2.000 [" in text  # 12 pairs, every one 2 nats lower: survives Holm
    assert "no per-prompt results recorded" in text  # realloc_freq 8 against a current value without rows
    assert "missing" in sweeps_section(None)[0] and "no experiments yet" in sweeps_section(
        sweeps.summarize([], CURRENT))[0]


def test_each_value_is_paired_with_the_current_value_of_its_own_batch():
    """Same prompts are not enough: float noise moves results across machines, and a sweep may
    run a lighter protocol. A value pairs with the current value's experiment of its batch
    (commit and non-swept params), not with a namesake from another session."""
    n = 10
    at = {"old90" * 8: results([1.0] * n, [-2.0] * n),   # the current value, an earlier session
          "new90" * 8: results([1.0] * n, [-1.0] * n),   # the current value, this batch
          "new85" * 8: results([1.0] * n, [-1.5] * n),   # decay 0.85 in this batch: 0.5 below its partner
          "lone" * 8: results([1.0] * n, [-1.0] * n)}    # another protocol, no current value beside it
    trimmed = {"budgets": []}
    old = [exp("old90", "dev", 1.0)]
    new = [exp("new90", "dev", 1.0, **trimmed), exp("new85", "dev", 1.0, decay=0.85, **trimmed)]
    lone = exp("lone", "dev", 1.0, decay=0.95, budgets=[0.1])
    rerun = exp("rerun90", "dev", 1.0, budgets=[0.2])  # the current value again, newest, in a batch of its own
    at["rerun90" * 8] = results([1.0] * n, [-1.1] * n)
    for e, t in zip(old + new + [lone, rerun],
                    ("2026-11-30", "2026-12-02T19:00", "2026-12-02T19:10", "2026-12-02T19:20", "2026-12-02T19:30")):
        e["data"]["timestamp"] = t
    shown_ = [{"rev": "workspace", "experiments": None},
              {"rev": "c1", "experiments": [{"revs": [e], "name": e["name"]} for e in old]},
              {"rev": "c2", "experiments": [{"revs": [e], "name": e["name"]} for e in new + [lone, rerun]]}]
    found = sweeps.finished(shown_, at.get)
    assert {e["name"]: e["baseline"] for e in found} == {"old90": "c1", "new90": "c2", "new85": "c2", "lone": "c2",
                                                          "rerun90": "c2"}
    by_name = {e["name"]: e for e in found}
    # the fingerprint ignores the swept params and sees the others
    assert by_name["new90"]["protocol"] == by_name["new85"]["protocol"] != by_name["old90"]["protocol"]
    assert by_name["lone"]["protocol"] not in (by_name["new90"]["protocol"], by_name["old90"]["protocol"])
    s = sweeps.summarize(found, CURRENT)
    by = {v["value"]: v for v in s["params"]["decay"]["values"]}
    assert by[0.85]["paired_with"] == "new90"  # "old90" would say -1.5 - -2.0 = +0.5
    assert by[0.85]["vs_current"]["answer_logprob"]["mean_diff"] == pytest.approx(-0.5)
    # the current value's row is the experiment the others were compared with, not the newest re-run
    assert by[0.9]["shown"] == "new90" and sorted(by[0.9]["experiments"]) == ["new90", "old90", "rerun90"]
    assert by[0.9]["answer_logprob_mean"] == -1.0
    assert "same batch" in by[0.95]["vs_current"]["note"] and "paired_with" not in by[0.95]


def test_matching_is_per_cell_when_the_task_set_has_several():
    df = pd.DataFrame([{**r, "context_length": 1024} for r in rows("kivi-2", "test", [0.24, 0.26])]
                      + [{**r, "context_length": 2048} for r in rows("kivi-2", "test", [0.18])]
                      + [{**r, "context_length": 1024, "task": "perplexity"}
                         for r in rows("kivi-2", "test", [0.16], metric="perplexity")])
    m = match.measure(df, ["kivi-2"])
    task = df["task"].iloc[0]
    assert m["test"]["kivi-2"]["by_cell"] == {f"{task}@1024": 0.25, f"{task}@2048": 0.18, "perplexity@1024": 0.16}
    # the headline memory is the accuracy prompts' mean; perplexity rows get their own budget
    assert m["test"]["kivi-2"]["kv_ratio"] == pytest.approx((0.24 + 0.26 + 0.18) / 3, abs=1e-6)
    b = match.budgets(m, "test")
    assert b == {"kivi-2": {(task, 1024): 0.25, (task, 2048): 0.18, ("perplexity", 1024): 0.16}}

    import yaml
    from pathlib import Path

    from smartkv.study.runs import smartkv_runs

    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    runs = [r for r in smartkv_runs(params, b) if r.label == "smartkv@kivi-2"]
    assert sorted((r.task, r.context_length, r.params["budget"]) for r in runs) == \
        sorted([(task, 1024, 0.25), (task, 2048, 0.18), ("perplexity", 1024, 0.16)])
    ppl = next(r for r in runs if r.task == "perplexity")
    assert ppl.applies_to("perplexity", 1024) and not ppl.applies_to(task, 1024)
    assert not ppl.applies_to("perplexity", 2048)
    # a cell whose ratio cannot be matched drops the baseline, not just that cell
    m["test"]["kivi-2"]["by_cell"][f"{task}@2048"] = 1.3
    assert match.budgets(m, "test") == {}


def test_reruns_measure_the_spread_between_repeats_of_one_configuration(tmp_path):
    """Two runs of the current value in different batches (another machine, say) are compared
    prompt by prompt: flips of the 0/1 score and the largest |Δ| of each continuous measure.
    Configurations run once, and records without per-prompt rows, make no pair."""
    n = 8
    at = {"here" * 8: results([1.0] * n, [-1.0] * n),
          "there" * 8: results([1.0] * (n - 1) + [0.0], [-1.0] * (n - 2) + [-1.004, -1.25]),
          "d85" * 8: results([1.0] * n, [-2.0] * n)}
    here, d85 = exp("here", "dev", 1.0), exp("d85", "dev", 1.0, decay=0.85)
    there = exp("there", "dev", 0.875, budgets=[0.2])  # another protocol
    silent = exp("silent", "dev", 1.0)                  # same configuration, no per-prompt rows
    for e, t in zip((here, there, d85, silent), ("2026-12-03T07:00", "2026-12-03T08:00", "2026-12-03T07:10", "x")):
        e["data"]["timestamp"] = t
    found = sweeps.finished(shown(here, there, d85, silent), at.get)
    assert all(e["found_on"] == sweeps.cpu_model() for e in found) and "cores" in sweeps.cpu_model()
    s = sweeps.summarize(found, CURRENT)
    assert len(s["reruns"]) == 1
    r = s["reruns"][0]
    assert (r["a"], r["b"], r["same_commit"], r["same_protocol"]) == ("there", "here", True, False)
    assert r["n_prompts"] == n and r["score_flips"] == 1
    assert r["max_abs"]["answer_logprob"] == pytest.approx(0.25)
    assert r["mean_abs"]["answer_logprob"] == pytest.approx((0.004 + 0.25) / n)
    assert r["max_abs"]["kl_fp16"] == 0.0 and r["max_abs"]["nll"] == 0.0

    from smartkv.report.sweeps_section import sweeps_section

    md = "\n".join(sweeps_section(s))
    row = next(line for line in md.splitlines() if line.startswith("| there vs here"))
    assert row.count("|") == 11 and "| differs |" in row and "| 1 | 0.25 (0.032) |" in row
    # the figure draws that spread as a band under the paired Δs
    assert all(p.stat().st_size > 0 for p in sweeps.plot(s, tmp_path / "sweeps"))
