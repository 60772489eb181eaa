"""The `passages` section (issue 33): independent real-text needles, calibrated on dev before test.

No model here: the settings, the calibration gate of `python -m stages.section calibrate`, and the
report's lines. The section end to end runs in tests/test_pipeline.py on the tiny profile.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from smartkv import matched_study as ms
from smartkv.study import load_params
from smartkv.study.params import ParamError

PARAMS = load_params()


def _with(**over) -> dict:
    p = copy.deepcopy(PARAMS)
    p["passages"].update(over)
    return p


def test_committed_section_is_the_primary_comparisons_on_independent_prompts():
    s = ms.settings(PARAMS, "passages")
    assert [r.label for r in s["runs"]] == ["fp16", "int3", "kivi-2", "hqq-4"]
    assert s["match"] == ["int3", "kivi-2", "hqq-4"]
    assert s["dev_seeds"] and min(s["dev_seeds"]) >= 100 and max(s["seeds"]) < 100
    (t,) = s["plan"]
    assert t["name"] == "niah_passage" and t["lengths"] == [1024, 2048, 4096]
    # at least 200 independent prompts per comparison over the three lengths (issue 33)
    assert sum(t["n_per_cell"]) * len(s["seeds"]) >= 200
    assert s["fp16_bar"] == 0.9


@pytest.mark.parametrize("over, words", [
    ({"dev_seeds": [5]}, "must list dev seeds (>= 100)"),
    ({"dev_seeds": "100"}, "must list dev seeds"),
    ({"fp16_bar": 1.5}, "fp16_bar=1.5 must be a fraction in [0, 1]"),
    ({"fp16_bar": True}, "fp16_bar=True must be a fraction"),
])
def test_bad_calibration_settings_name_the_key(over, words):
    with pytest.raises(ParamError) as err:
        ms.settings(_with(**over), "passages")
    assert words in str(err.value) and "passages." in str(err.value)


def _rows(found: dict) -> pd.DataFrame:
    """FP16 rows on dev: {length: (correct, n)}."""
    rows = []
    for length, (k, n) in found.items():
        for i in range(n):
            rows.append({"run": "fp16", "task": "niah_passage", "context_length": length, "sample_id": f"{length}-{i}",
                         "seed": 100, "cluster": f"p{length}-{i}", "score": float(i < k), "error": ""})
    return pd.DataFrame(rows)


def test_calibration_summary_says_which_cells_pass_the_bar(monkeypatch):
    monkeypatch.setattr("smartkv.study.driver.evaluate_runs", lambda *a, **k: _rows({1024: (19, 20), 2048: (8, 10)}))
    _, summary = ms.calibrate(PARAMS, ms.settings(PARAMS, "passages"), "unused.parquet")
    assert summary["cells"]["niah_passage-1024"] == {"n": 20, "passages": 20, "fp16": 0.95, "found": 19, "passed": True}
    assert summary["cells"]["niah_passage-2048"]["passed"] is False and summary["failed"] == ["niah_passage-2048"]


def test_a_cell_under_the_bar_stops_the_stage_and_writes_nothing(monkeypatch, tmp_path, capsys):
    from stages import section as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("stages.common.load_params", lambda: copy.deepcopy(PARAMS))
    monkeypatch.setattr("sys.argv", ["section", "calibrate", "passages"])
    monkeypatch.setattr(ms, "prepare", lambda s, tok, split="test": pd.DataFrame({"seed": [100], "split": [split]}))
    monkeypatch.setattr("smartkv.models.load_tokenizer", lambda name: None)
    monkeypatch.setattr("smartkv.study.driver.evaluate_runs", lambda *a, **k: _rows({1024: (20, 20), 4096: (3, 4)}))
    with pytest.raises(SystemExit) as exit_:
        stage.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "FP16 is under fp16_bar=0.9 on dev in niah_passage-4096" in err and "niah_passage-4096 3/4" in err
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.json"))


def _metrics(t_found: int, b_found: int, n: int = 204, ci=(-0.02, 0.08)) -> dict:
    return {"model": "default", "seeds": [0], "accuracy": {"fp16": {"niah_passage@1k": {"n": n, "correct": n, "kv_ratio": 1.0}}},
            "comparisons": [{"family": "f", "target": "smartkv@int3", "baseline": "int3", "task": "all",
                             "measure": "score", "n_pairs": n, "n_clusters": n, "target_mean": t_found / n,
                             "baseline_mean": b_found / n, "mean_diff": (t_found - b_found) / n, "p": 0.5,
                             "p_holm": 0.5, "ci_lo": ci[0], "ci_hi": ci[1], "verdict": "inconclusive",
                             "target_kv_ratio": 0.247, "baseline_kv_ratio": 0.25}]}


def test_summary_leads_with_the_passages_and_says_a_miss_plainly():
    from smartkv.report.sections import passages_lines, summary_of_findings

    cal = {"dev_seeds": [100, 101], "bar": 0.9, "cells": {"niah_passage-1024": {"n": 40, "found": 39, "fp16": 0.975}}}
    ok = passages_lines(_metrics(190, 185), cal)
    assert "204 needles in 204 distinct passages" in ok[0] and "niah_passage-1024 39/40" in ok[0]
    assert "meets the ≥ bar" in ok[1] and "0.931 vs 0.907" in ok[1]
    behind = passages_lines(_metrics(180, 185, ci=(-0.04, 0.01)), cal)[1]
    assert "**misses the ≥ bar**: behind on the point estimate" in behind
    wide = passages_lines(_metrics(190, 185, ci=(-0.07, 0.1)), cal)[1]
    assert "its CI admits a loss of more than 0.05" in wide
    lines = summary_of_findings(None, {"passages": _metrics(190, 185), "passages_calibration": cal})
    assert lines[0].startswith("- Primary comparisons, independent prompts")
    assert passages_lines(None, cal) == []


@pytest.mark.parametrize("over, words", [
    ({"budgets": [0]}, "passages.budgets=[0] must list fractions in (0, 1]"),
    ({"budgets": "0.1"}, "must list fractions"),
    ({"ablations": ["no-such"]}, "passages.ablations: no-such not in ablations; known: random-alloc"),
])
def test_bad_extra_runs_name_the_key(over, words):
    with pytest.raises(ParamError) as err:
        ms.settings(_with(**over), "passages")
    assert words in str(err.value)


def test_smartkv_step_runs_the_matched_the_fixed_budgets_and_the_ablations_beside_the_headline(monkeypatch):
    """One tracked prefill per prompt serves them all: they go to evaluate_runs together."""
    seen = {}
    monkeypatch.setattr("smartkv.study.driver.evaluate_runs",
                        lambda params, runs, *a, **k: seen.setdefault("runs", runs) and pd.DataFrame())
    monkeypatch.setattr("smartkv.study.match.measure", lambda base, labels: "measured")
    monkeypatch.setattr("smartkv.study.match.budgets", lambda m, split: {"int3": 0.25, "kivi-2": 0.21, "hqq-4": 0.27})
    ms.run_smartkv(PARAMS, ms.settings(PARAMS, "passages"), "unused.parquet", pd.DataFrame())
    runs = {r.label: r for r in seen["runs"]}
    assert set(runs) == {"smartkv", "smartkv@int3", "smartkv@kivi-2", "smartkv@hqq-4", "smartkv-b0.15",
                         "smartkv-b0.10", "random-alloc", "oracle"}
    assert runs["random-alloc"].params["budget"] == runs["smartkv"].params["budget"] == PARAMS["budget"]
    assert runs["oracle"].oracle and runs["oracle"].params == runs["smartkv"].params  # ranking is all that differs
    assert runs["random-alloc"].params["allocation"] == "random" and runs["smartkv-b0.10"].params["budget"] == 0.1
    # a section without ablations or budgets runs the matched runs alone, as before
    seen.clear()
    ms.run_smartkv(PARAMS, ms.settings(_with(ablations=[], budgets=[]), "passages"), "unused.parquet", pd.DataFrame())
    assert {r.label for r in seen["runs"]} == {"smartkv@int3", "smartkv@kivi-2", "smartkv@hqq-4"}


def test_headline_against_random_allocation_is_its_own_family():
    from smartkv import matched_tests as mt

    rows = []
    for i in range(12):
        for run, score in (("smartkv", 1.0), ("random-alloc", float(i < 2)), ("smartkv@int3", 1.0), ("int3", 1.0)):
            rows.append({"run": run, "task": "niah_passage", "sample_id": f"p{i}", "seed": 0, "context_length": 1024,
                         "cluster": f"p{i}", "score": score, "kv_ratio": 0.25, "error": ""})
    t = mt.tests(pd.DataFrame(rows), ["int3"], family=ms.SECTIONS["passages"], ablations=["random-alloc"])
    abl = t[(t["baseline"] == "random-alloc") & (t["task"] == "all") & (t["measure"] == "score")].iloc[0]
    assert abl["target"] == "smartkv" and abl["mean_diff"] == pytest.approx(10 / 12)
    assert abl["family"].startswith("independent passages: headline vs ablations") and abl["verdict"] == "target better"


def test_each_passages_comparison_gets_a_readable_figure_and_slide(tmp_path):
    from smartkv.plots_sections import section_plot
    from smartkv.report.slides import passages_slides

    m = _metrics(190, 185)
    m["accuracy"] = {run: {"niah_passage@1k": {"n": 204, "correct": k, "accuracy": k / 204, "ci95": [k / 204 - 0.05,
                                                                                                 k / 204 + 0.03],
                                              "kv_ratio": kv}}
                     for run, k, kv in (("fp16", 204, 1.0), ("int3", 185, 0.25), ("smartkv@int3", 190, 0.247))}
    paths = section_plot(m, tmp_path / "passages")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in paths)
    slides = passages_slides({"passages": m})
    assert len(slides) == 1
    texts = [t.get_text() for t in slides[0].texts]
    assert "Independent prompts: smartkv@int3 vs int3" in texts and "meets the ≥ bar" in " ".join(texts).replace("\n", " ")
    # no text beyond the slide's edges, with the longest caption a comparison gets (issue 33)
    long = dict(m["comparisons"][0], baseline="tova-k0.15", target="smartkv-b0.15",
                family="independent passages: SmartKV vs the presses chosen on dev [score]")
    for fig in passages_slides({"passages": dict(m, comparisons=[long, *m["comparisons"]])}):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        r = FigureCanvasAgg(fig).get_renderer()
        for t in fig.texts:
            box = t.get_window_extent(r)
            assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0 and box.y1 <= fig.bbox.height, t.get_text()
    assert passages_slides({}) == []
    # a section without comparisons still gets its file, saying so
    assert section_plot({"model": "m", "accuracy": {}, "comparisons": []}, tmp_path / "empty")[0].is_file()


def test_limitations_say_what_the_independent_prompts_lack():
    from smartkv.report.limitations import passages_limits

    assert "have not run" in passages_limits(None)[0]
    assert "no eviction peer has run yet" in passages_limits(_metrics(190, 185))[0]
    with_peer = _metrics(190, 185) | {"presses": {"pairs": [["smartkv-b0.15", "snapkv-w16-k0.15"]],
                                                  "press_cells_missing": ["niah_passage-4096-3of3"]}}
    lines = passages_limits(with_peer)
    assert "no eviction peer" not in " ".join(lines) and "`niah_passage-4096-3of3`" in lines[0]
    assert "chosen there on the dev passages" in lines[-1]


def test_a_section_reports_its_finished_cells_and_names_the_rest(tmp_path, monkeypatch):
    """Cells land one by one: the readers take the cells every part has written and say which are missing."""
    from smartkv.report.sections import matched_section, passages_lines
    from stages.common import read_section, section_cells

    monkeypatch.chdir(tmp_path)
    params = copy.deepcopy(PARAMS)
    cells = params["cells"]["passages"]
    row = {"run": "fp16", "task": "niah_passage", "sample_id": "x", "seed": 0, "context_length": 1024, "score": 1.0}
    for part, written in (("baselines", cells[:4]), ("smartkv", cells[:2])):
        (tmp_path / "data" / "passages" / part).mkdir(parents=True)
        for c in written:
            pd.DataFrame([dict(row, sample_id=f"{part}-{c}")]).to_parquet(tmp_path / "data" / "passages" / part / f"{c}.parquet")
    done, missing = section_cells("passages", params)
    assert done == cells[:2] and missing == cells[2:]
    df, missing = read_section("passages", params)
    assert len(df) == 4 and missing == cells[2:]  # the baselines of cells 3-4 wait for their SmartKV cells
    m = _metrics(190, 185) | {"missing_cells": missing}
    assert "**Cells not run yet: niah_passage-1024-3of3" in passages_lines(m, None)[0]
    assert "**Not every cell has run yet**" in "\n".join(matched_section(m, "passages", "{model}"))


def test_the_ablation_line_is_not_called_a_sanity_check_for_a_byte_apart():
    from smartkv.report.sections import passages_lines

    m = _metrics(196, 185)
    m["comparisons"].append(dict(m["comparisons"][0], target="smartkv", baseline="random-alloc",
                                 family="independent passages: headline vs ablations [score]",
                                 verdict="target better", target_kv_ratio=0.2451, baseline_kv_ratio=0.2450))
    lines = passages_lines(m, None)
    assert "smartkv@int3" in lines[1] and "random-alloc" in lines[2]  # matched first, then the ablation
    assert "sanity check" not in lines[2] and "attention-guided against random allocation" in lines[2]


def test_smartkv_meets_the_press_chosen_on_dev_at_each_kept_ratio_and_the_control_is_fp16():
    from smartkv import matched_tests as mt
    from smartkv.report.sections import passages_lines

    choice = {"kept": {"0.25": {"chosen": "knorm-k0.25"}, "0.15": {"chosen": "snapkv-ks5-w8-k0.15"},
                       "0.10": {"chosen": "tova-k0.10"}}}
    runs = {"smartkv", "smartkv-b0.15", "knorm-k0.25", "snapkv-ks5-w8-k0.15", "tova-k0.10"}
    # 0.10 has no SmartKV run at that budget: no pair; 0.25 is the headline budget
    assert mt.press_pairs(choice, [0.15], 0.25, runs) == [("smartkv", "knorm-k0.25"),
                                                         ("smartkv-b0.15", "snapkv-ks5-w8-k0.15")]
    rows = []
    for i in range(30):
        for run, score, pred in (("smartkv-b0.15", float(i < 20), "k"), ("snapkv-ks5-w8-k0.15", float(i < 5), "k"),
                                 ("fp16", 1.0, f"a{i}"), ("kvpress-none", 1.0, f"a{i}" if i else "other")):
            rows.append({"run": run, "task": "niah_passage", "sample_id": f"p{i}", "seed": 0, "context_length": 1024,
                         "cluster": f"p{i}", "score": score, "kv_ratio": 0.15, "error": "", "prediction": pred,
                         "kl_fp16": float("nan") if "-k0." in run or run.startswith("kvpress") else 0.01 * i})
    df = pd.DataFrame(rows)  # kvpress rows carry no KL from FP16: that measure is not tested for them
    t = mt.tests(df, [], family=ms.SECTIONS["passages"], presses=[("smartkv-b0.15", "snapkv-ks5-w8-k0.15")])
    assert set(t["measure"]) == {"score"}
    r = t[(t["task"] == "all") & (t["measure"] == "score")].iloc[0]
    assert r["family"].startswith("independent passages: " + mt.PRESS_FAMILY) and r["mean_diff"] == pytest.approx(0.5)
    m = mt.metrics(df, t, {"model": "m", "seeds": [0]})
    assert m["control"] == dict(m["control"], n=30, differ=1, differ_ids=["p0"], missing=0)  # one answer differs
    lines = passages_lines(m, None)
    assert "the press chosen on the dev passages for 0.15 kept" in lines[1]
    assert "**The no-press control (`kvpress-none`) differs from `fp16` on 1 of 30 prompts**" in lines[-1]


def test_the_oracle_ranking_says_whether_ranking_or_the_low_tier_lost_a_needle():
    """Needles INT3 finds and SmartKV at its bytes misses: the oracle ranking (same cache, same bytes,
    perfect importance) finding them blames the ranking; missing them too blames the low tier."""
    from smartkv import matched_tests as mt
    from smartkv.report.sections import passages_lines

    def rows(oracle_finds_lost: bool, oracle_kv: float = 0.245):
        out = []
        for i in range(20):
            lost = i < 4  # int3 finds, smartkv@int3 misses
            for run, score, kv in (("int3", 1.0, 0.25), ("smartkv@int3", float(not lost), 0.245),
                                   ("smartkv", float(not lost), 0.245), ("random-alloc", float(i < 1), 0.245),
                                   ("oracle", float(oracle_finds_lost or not lost), oracle_kv)):
                out.append({"run": run, "task": "niah_passage", "sample_id": f"p{i}", "seed": 0,
                            "context_length": 1024, "cluster": f"p{i}", "score": score, "kv_ratio": kv, "error": ""})
        return pd.DataFrame(out)

    ranking = mt.ranking_or_tier(rows(True), ["int3"], "oracle")
    assert ranking == [dict(ranking[0], lost=4, oracle_finds=4, bottleneck="ranking", n=20)]
    assert ranking[0]["lost_ids"] == ["p0", "p1", "p2", "p3"]
    tier = mt.ranking_or_tier(rows(False), ["int3"], "oracle")
    assert tier[0]["oracle_finds"] == 0 and tier[0]["bottleneck"] == "low tier"
    # an oracle at other bytes differs from SmartKV in more than ranking: no diagnosis
    assert mt.ranking_or_tier(rows(True, oracle_kv=0.30), ["int3"], "oracle") == []
    # the oracle is its own family: it does not dilute the planned random-allocation test
    df = rows(False)
    t = mt.tests(df, ["int3"], family=ms.SECTIONS["passages"], ablations=["oracle"], oracle="oracle")
    fam = set(t.loc[t["baseline"] == "oracle", "family"])
    assert fam and all("headline vs the oracle ranking" in f for f in fam)
    m = mt.metrics(df, t, {"model": "m", "seeds": [0], "match": ["int3"], "ablations": ["random-alloc", "oracle"]},
                   oracle="oracle")
    assert m["bottleneck"][0]["also_finds"] == {"random-alloc": 1}
    lines = passages_lines(m, None)
    oracle_line = next(x for x in lines if "`oracle`" in x and "vs" in x and "needles" not in x)
    assert "the gap ranking could close" in oracle_line and "bar" not in oracle_line
    # the oracle row is told by its family, not by a diagnosis: with none (bytes apart), still the oracle's words
    no_diag = passages_lines(dict(m, bottleneck=[]), None)
    assert any("`oracle`" in x and "the gap ranking could close" in x for x in no_diag)
    assert not any("`oracle`" in x and "random allocation" in x for x in no_diag)
    assert any("the oracle ranking (`oracle`) finds 0; `random-alloc` finds 1: the bottleneck is **the low tier**" in x
               for x in lines)
