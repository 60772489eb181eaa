"""Eviction peers chosen on dev (smartkv/peer_tuning.py): the candidates, the rule, the stage's guards.

The stage end to end (kvpress itself, in its venv) runs in tests/test_pipeline.py on the tiny profile.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from smartkv import peer_tuning as pt
from smartkv.kvpress_peers import PeerSpec
from smartkv.study import load_params

PARAMS = load_params()


def _with(**over) -> dict:
    p = copy.deepcopy(PARAMS)
    p["peers_tuning"].update(over)
    return p


def test_committed_candidates_cover_the_issue_grid():
    s = pt.settings(PARAMS)
    specs = pt.candidate_specs(s)
    assert s["section"] == "passages" and s["kept"] == [0.25, 0.15, 0.10]
    snap = [x for x in specs if x.press == "snapkv"]
    assert len(snap) == 4 * 3 * 3  # window x kernel x kept
    assert {x.press for x in specs} == {"snapkv", "knorm", "tova", "streaming_llm", "expected_attention"}
    assert "snapkv-ks5-w16-k0.15" in {x.label for x in specs}
    assert dict(next(x for x in specs if x.label == "snapkv-ks1-w8-k0.10").options) == {"kernel_size": 1, "window_size": 8}


@pytest.mark.parametrize("over, words", [
    ({"section": "nowhere"}, "peers_tuning.section='nowhere' must name a params section"),
    ({"kept": [1.0]}, "peers_tuning.kept=[1.0] must list kept fractions in (0, 1)"),
    ({"candidates": [{"press": "adakv"}]}, "candidates[0].press='adakv'; allowed: snapkv"),
    ({"candidates": [{"press": "none"}]}, "candidates[0].press='none'"),
    ({"candidates": [{"press": "knorm", "grid": {"window_size": [8]}}]}, "knorm takes options none"),
    ({"candidates": [{"press": "snapkv", "grid": {"window_size": []}}]}, "non-empty list"),
    ({"candidates": [{"press": "knorm"}, {"press": "knorm"}]}, "duplicate candidate(s) knorm-k0.10"),
    ({"extra": 1}, "unknown key(s) extra"),
])
def test_bad_tuning_params_name_the_key(over, words):
    with pytest.raises(pt.TuningError) as err:
        pt.candidate_specs(pt.settings(_with(**over)))
    assert words in str(err.value)


def _rows(table: dict) -> pd.DataFrame:
    """{label: [(score, answer_logprob) per prompt]}."""
    return pd.DataFrame([{"run": run, "sample_id": f"p{i}", "score": s, "answer_logprob": lp, "error": ""}
                         for run, vals in table.items() for i, (s, lp) in enumerate(vals)])


def test_the_rule_takes_accuracy_then_log_probability_then_params_order():
    specs = [PeerSpec("a-k0.15", "snapkv", 0.15), PeerSpec("b-k0.15", "knorm", 0.15), PeerSpec("c-k0.15", "tova", 0.15),
             PeerSpec("a-k0.10", "snapkv", 0.10), PeerSpec("b-k0.10", "knorm", 0.10)]
    rows = _rows({"a-k0.15": [(1, -0.5), (0, -2.0)], "b-k0.15": [(1, -0.1), (0, -1.0)], "c-k0.15": [(0, -0.1), (0, -0.2)],
                  "a-k0.10": [(1, -1.0), (0, -1.0)], "b-k0.10": [(1, -1.0), (0, -1.0)]})
    choice = pt.choose(rows, specs)
    assert choice["rule"] == pt.RULE and list(choice["kept"]) == ["0.15", "0.10"]
    assert choice["kept"]["0.15"]["chosen"] == "b-k0.15"  # tied accuracy, higher log-probability
    assert [c["label"] for c in choice["kept"]["0.15"]["candidates"]] == ["b-k0.15", "a-k0.15", "c-k0.15"]
    assert choice["kept"]["0.10"]["chosen"] == "a-k0.10"  # a full tie: the earlier candidate
    control, *runs = pt.chosen_specs(json.loads(json.dumps(choice)), specs)
    # the chosen press first at each ratio, then every other press's dev-best setting (reported on test)
    assert control == pt.CONTROL and [(x.label, x.press, x.kept) for x in runs] == [
        ("b-k0.15", "knorm", 0.15), ("a-k0.15", "snapkv", 0.15), ("c-k0.15", "tova", 0.15),
        ("a-k0.10", "snapkv", 0.10), ("b-k0.10", "knorm", 0.10)]


def test_each_press_runs_on_test_in_its_dev_best_setting_only():
    specs = [PeerSpec("s8-k0.15", "snapkv", 0.15, (("window_size", 8),)),
             PeerSpec("s16-k0.15", "snapkv", 0.15, (("window_size", 16),)), PeerSpec("kn-k0.15", "knorm", 0.15)]
    choice = pt.choose(_rows({"s8-k0.15": [(1, -1.0)], "s16-k0.15": [(0, -1.0)], "kn-k0.15": [(0, -0.5)]}), specs)
    assert [x.label for x in pt.chosen_specs(choice, specs)] == ["kvpress-none", "s8-k0.15", "kn-k0.15"]
    with pytest.raises(pt.TuningError, match="no longer lists"):  # the params changed since the choice
        pt.chosen_specs(choice, specs[1:])


def test_options_reach_the_press_as_kvpress_fields():
    """In kvpress's own venv: the options become the press's dataclass fields."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    python = repo / ".venv-kvpress" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-kvpress here (`make venv-kvpress`; `make test` builds it)")
    code = ("from smartkv.kvpress_peers import PeerSpec, make_press; "
            "p = make_press(PeerSpec('x', 'snapkv', 0.15, (('kernel_size', 1), ('window_size', 8)))); "
            "print(type(p).__name__, p.window_size, p.kernel_size, p.compression_ratio)")
    out = subprocess.run([str(python), "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SnapKVPress", "8", "1", "0.85"]


def test_section_cell_refuses_without_a_dev_choice(monkeypatch, tmp_path, capsys):
    from stages import peers_tuning as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "load_params", lambda: copy.deepcopy(PARAMS))
    monkeypatch.setattr("sys.argv", ["peers", "section", "passages", "niah_passage-1024-1of3"])
    with pytest.raises(SystemExit) as exit_:
        stage.main()
    assert exit_.value.code == 2
    assert "metrics/peers_choice.json not found: run `dvc repro peers_tuning` first" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["peers", "tune", "extra"])
    with pytest.raises(SystemExit):
        stage.main()
    assert "usage: python -m stages.peers_tuning tune | section <section> <cell>" in capsys.readouterr().err
