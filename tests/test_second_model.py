"""The matched-comparison stages' library half (smartkv/matched_study.py): params, tests, table.

The stage end to end (its prompts, the model, matched SmartKV) runs in tests/test_pipeline.py on
the tiny profile; here the checks that need no model.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from smartkv.study import load_params
from smartkv import matched_study as sm
from smartkv import matched_tests as mt
from smartkv.study.params import ParamError

PARAMS = load_params()


def _with(**over) -> dict:
    p = copy.deepcopy(PARAMS)
    p["second_model"].update(over)
    return p


def test_settings_of_the_committed_params():
    s = sm.settings(PARAMS)
    assert s["model"] == "gemma3-270m" and set(s["seeds"]) <= set(PARAMS["seeds"]["test"])
    assert [r.label for r in s["runs"]][0] == "fp16" and s["match"] == ["int3", "kivi-2"]
    assert s["plan"][0]["name"] == "niah" and sm.n_prompts(s) > 0


@pytest.mark.parametrize("over, words", [
    ({"seeds": [100]}, "not test seeds"),
    ({"seeds": []}, "non-empty list"),
    ({"runs": ["int3"], "match": ["int3"]}, "must include fp16"),
    ({"runs": ["fp16", "int9"]}, "int9 not in baselines"),
    ({"match": ["int4"]}, "int4 not in second_model.runs"),
    ({"model": ""}, "must name a model"),
    ({"tasks": {"niah": {"lengths": []}}}, "lengths"),
    ({"extra": 1}, "unknown key(s) extra"),
])
def test_bad_settings_name_the_key(over, words):
    with pytest.raises(ParamError, match=r"second_model|tasks") as err:
        sm.settings(_with(**over))
    assert words in str(err.value)


def _frame(t_scores, b_scores, length=1024, t_kv=0.24, b_kv=0.25) -> pd.DataFrame:
    rows = []
    for i, (t, b) in enumerate(zip(t_scores, b_scores)):
        for run, score, kv in (("smartkv@int3", t, t_kv), ("int3", b, b_kv), ("fp16", 1.0, 1.0)):
            rows.append({"run": run, "task": "niah", "sample_id": f"s{i}", "seed": 0, "context_length": length,
                         "score": float(score), "kv_ratio": kv, "error": ""})
    return pd.DataFrame(rows)


def test_tests_count_discordant_pairs_and_adjust():
    # 12 prompts SmartKV alone gets, 1 int3 alone gets: exact McNemar p = 2 * P(X <= 1 | 13, 1/2)
    t = [1] * 12 + [0] + [1] * 7
    b = [0] * 12 + [1] + [1] * 7
    df = pd.concat([_frame(t[:10], b[:10], 1024), _frame(t[10:], b[10:], 2048).assign(
        sample_id=lambda d: d["sample_id"] + "x")], ignore_index=True)
    out = mt.tests(df, ["int3"])
    pooled = out[(out["task"] == "all") & (out["measure"] == "score")].iloc[0]
    assert (pooled["n_target_only"], pooled["n_baseline_only"], pooled["n_pairs"]) == (12, 1, 20)
    assert pooled["p"] == pytest.approx(2 * (1 + 13) / 2 ** 13)
    assert pooled["verdict"] == "target better"
    per_length = out[(out["task"] != "all") & (out["measure"] == "score")]
    assert set(per_length["task"]) == {"niah@1k", "niah@2k"}
    # Holm over the two lengths: each adjusted p is at least its raw p, and at most 1
    assert (per_length["p_holm"] >= per_length["p"] - 1e-12).all() and (per_length["p_holm"] <= 1).all()


def test_accuracy_and_table_bold_only_what_holm_keeps():
    df = _frame([1] * 12 + [0] * 8, [0] * 12 + [0] * 8)
    m = mt.metrics(df, mt.tests(df, ["int3"]), {"model": "m", "seeds": [0]})
    fp16 = m["accuracy"]["fp16"]["niah@1k"]
    assert (fp16["correct"], fp16["n"], fp16["accuracy"]) == (20, 20, 1.0)
    lo, hi = fp16["ci95"]
    assert 0.8 < lo < 1.0 and hi == pytest.approx(1.0)  # Wilson, not a degenerate [1, 1]
    text = mt.table(m)
    assert "| fp16 | 20/20 | 1.000 |" in text and "| smartkv@int3 | 12/20 | 0.240 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| smartkv@int3 | int3 | all | score"))
    assert "12 / 0" in row and "**target better**" in row

    even = _frame([1, 0, 1, 0], [0, 1, 0, 1])
    row = next(line for line in mt.table(mt.metrics(even, mt.tests(even, ["int3"]), {"model": "m", "seeds": [0]}))
               .splitlines() if line.startswith("| smartkv@int3 | int3 | all | score"))
    assert "**" not in row and row.rstrip().endswith("| inconclusive |")


def test_report_section_reads_the_metrics_and_names_a_missing_file():
    from smartkv.report.sections import second_model_section

    df = _frame([1] * 12 + [0] * 8, [0] * 20)
    text = "\n".join(second_model_section(mt.metrics(df, mt.tests(df, ["int3"]), {"model": "gemma3-270m",
                                                                                     "seeds": [0]})))
    assert "`gemma3-270m`" in text and "| fp16 | 20/20 | 1.000 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| smartkv@int3 | int3 | all | score"))
    assert "12 / 0" in row and "0.240 / 0.250" in row and "**target better**" in row
    assert "second_model" in "\n".join(second_model_section(None))


def test_stage_refuses_a_bad_stats_value_before_any_model_work(monkeypatch, capsys):
    from stages import section as stage

    bad = copy.deepcopy(PARAMS)
    bad["stats"]["alpha"] = 2
    monkeypatch.setattr("stages.common.load_params", lambda: bad)
    monkeypatch.setattr("sys.argv", ["section", "tasks", "second_model"])
    monkeypatch.setattr(sm, "prepare", lambda *a, **k: pytest.fail("prepared prompts despite a bad stats value"))
    with pytest.raises(SystemExit) as exit_:
        stage.main()
    assert exit_.value.code == 2
    assert "stats.alpha=2" in capsys.readouterr().err


def test_prepare_is_the_main_studys_task_loop(monkeypatch):
    # one sample loop for both stages (smartkv.study.grid.task_samples): same rows as calling it by hand
    from smartkv.models import load_tokenizer
    from smartkv.study.grid import task_samples

    s = sm.settings(_with(seeds=[0]))
    tok = load_tokenizer("default")
    df = sm.prepare(s, tok)
    by_hand = [x.to_row() for t in s["plan"] for x in task_samples(t, tok, 0)]
    assert len(df) == len(by_hand) == sm.n_prompts(s)
    assert df["prompt"].tolist() == [r["prompt"] for r in by_hand]
    assert set(df["split"]) == {"test"} and set(df["seed"]) == {0}
    assert all(json.loads(m)["max_new_tokens"] > 0 for m in df["meta"])


def test_extra_cells_section_runs_the_main_model_on_its_own_grid():
    s = sm.settings(PARAMS, "extra_cells")
    assert s["section"] == "extra_cells" and s["model"] == PARAMS["model"]  # model: null = the main model
    cells = {(t["name"], n) for t in s["plan"] for n in t["lengths"]}
    assert ("niah", 4096) in cells and ("ruler_multikey", 1024) in cells
    assert "fp16" in [r.label for r in s["runs"]] and set(s["match"]) <= {r.label for r in s["runs"]}
    bad = copy.deepcopy(PARAMS)
    bad["extra_cells"]["match"] = ["int4"]
    with pytest.raises(ParamError, match=r"extra_cells.match: int4 not in extra_cells.runs"):
        sm.settings(bad, "extra_cells")
    with pytest.raises(ValueError, match="section 'third_model'"):
        sm.settings(PARAMS, "third_model")


def test_cells_are_named_alike_in_accuracy_and_tests():
    assert [mt.cell_name("niah", n) for n in (1024, 4096, 160)] == ["niah@1k", "niah@4k", "niah@160"]
    df = pd.concat([_frame([1, 1, 0], [0, 1, 0], 4096),
                    _frame([1, 0], [1, 0], 1024).assign(task="ruler_multikey", sample_id=lambda d: d["sample_id"] + "m")],
                   ignore_index=True)
    t = mt.tests(df, ["int3"], family=sm.SECTIONS["extra_cells"])
    assert set(t["task"]) == {"all", "niah@4k", "ruler_multikey@1k"}  # one length per task: still named by cell
    assert all(x.startswith("extra cells: ") for x in t["family"])
    m = mt.metrics(df, t, {"model": "default", "seeds": [0]})
    assert list(m["accuracy"]["fp16"]) == ["niah@4k", "ruler_multikey@1k"]
    assert "| run | niah@4k | ruler_multikey@1k | KV x FP16 |" in mt.table(m)


def test_limitations_carry_a_matched_stage_s_losses_and_weak_fp16_cells():
    from smartkv.report.limitations import limitations, matched_study_limits
    from smartkv.report.sections import extra_cells_section

    df = _frame([0] * 12 + [1] * 8, [1] * 20, 4096)
    m = mt.metrics(df, mt.tests(df, ["int3"]), {"model": "default", "seeds": [0]})
    lines = matched_study_limits(m, "extra_cells")
    assert len(lines) == 1 and "**Significant loss** in `extra_cells` (default)" in lines[0] and "(score, all" in lines[0]
    m["accuracy"]["fp16"]["niah@4k"].update(correct=17, accuracy=0.85)
    assert any("FP16 itself scores below 0.9 on niah@4k (17/20)" in x for x in matched_study_limits(m, "extra_cells"))
    assert matched_study_limits(None, "extra_cells") == []
    # the stats stage's alpha decides, not a literal: 5 / 0 discordant (exact p 0.0625) is a loss at 0.1
    df = _frame([0] * 5 + [1] * 15, [1] * 20, 4096)
    for alpha, listed in ((0.1, True), (0.05, False)):
        m5 = mt.metrics(df, mt.tests(df, ["int3"], alpha=alpha), {"model": "default", "seeds": [0]})
        assert any("**Significant loss**" in x for x in matched_study_limits(m5, "extra_cells")) is listed
    out = limitations(pd.DataFrame(), None, {"model": "m"}, extra_cells=m)
    assert any(x.startswith("The extra cells (niah@4k (n = 20))") for x in out)
    assert "dvc repro extra_cells" in "\n".join(extra_cells_section(None))
    assert "`default` (the main study's model)" in "\n".join(extra_cells_section(m))


def test_the_summary_of_findings_states_a_matched_stage_s_loss_and_its_inconclusive_cells():
    # a loss at 4k (SmartKV alone right 0, int3 alone right 12) next to a cell that cannot tell
    from smartkv.report.sections import summary_of_findings

    df = pd.concat([_frame([0] * 12 + [1] * 8, [1] * 20, 4096),
                    _frame([1, 0, 1], [0, 1, 1], 1024).assign(sample_id=lambda d: d["sample_id"] + "k")],
                   ignore_index=True)
    m = mt.metrics(df, mt.tests(df, ["int3"]), {"model": "default", "seeds": [0]})
    text = "\n".join(summary_of_findings(None, {"extra_cells": m}))
    line = next(x for x in text.splitlines() if "(`extra_cells`)" in x)
    assert "`smartkv@int3` vs `int3`: pooled **significantly worse** (0.435 vs 0.957, n = 23, 1 / 13 discordant" in line
    assert "niah@4k **significantly worse** (0.400 vs 1.000, n = 20, 0 / 12 discordant, Holm p < 0.001)" in line
    assert "niah@1k inconclusive (0.667 vs 0.667, n = 3, 1 / 1 discordant, Holm p = 1.000)" in line
    assert "second_model" not in text  # a stage that has not run adds no bullet


@pytest.mark.parametrize("argv, needle", [
    (["section"], "usage: python -m stages.section"),
    (["section", "baselines", "second_model"], "usage: python -m stages.section"),
    (["section", "tasks", "third_model"], "usage: python -m stages.section"),
    (["section", "baselines", "second_model", "niah-999"], "cells.second_model: no cell 'niah-999'; allowed: niah-"),
])
def test_a_section_step_with_bad_arguments_exits_2_with_one_line(monkeypatch, capsys, argv, needle):
    from stages import section as stage

    monkeypatch.setattr("stages.common.load_params", lambda: copy.deepcopy(PARAMS))
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_:
        stage.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
