"""Stage param validation: a bad value stops the stage before any work, one line naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smartkv.study import ParamError
from smartkv.study.grid import longbench_plan, task_plan
from smartkv.study.params import device_map_setting, seed_subset, seeds_by_split, study_split
from smartkv.study.labels import HEADLINE, matched_label
from smartkv.study.runs import ablation_runs, baseline_runs, match_labels, smartkv_runs

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "longbench"
PROFILES = [REPO / "params.yaml", REPO / "tests" / "fixtures" / "params_tiny.yaml"]


@pytest.fixture()
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def validate(p: dict) -> list:
    seeds_by_split(p)
    study_split(p)
    seed_subset(p, "ablations_seeds")
    device_map_setting(p)
    task_plan(p)
    match_labels(p)
    return baseline_runs(p) + smartkv_runs(p, {"int3": 0.25}) + ablation_runs(p)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profiles_validate(path):
    p = yaml.safe_load(path.read_text())
    labels = [r.label for r in validate(p)]
    assert len(labels) == len(set(labels))
    assert labels.count(HEADLINE) == 1
    assert set(p) == set(yaml.safe_load(PROFILES[0].read_text())), "the tiny profile must set every key"


def test_matched_runs_take_the_measured_budget(params):
    runs = smartkv_runs(params, {"int3": 0.2512, "kivi-2": 0.2791})
    by_label = {r.label: r for r in runs}
    assert runs[0].label == HEADLINE and runs[0].params["budget"] == params["budget"]
    assert by_label[matched_label("int3")].params["budget"] == 0.2512
    assert by_label["smartkv@kivi-2"].params["budget"] == 0.2791
    # the matched runs share every other SmartKV setting with the headline
    assert {k: v for k, v in by_label["smartkv@int3"].params.items() if k != "budget"} == \
           {k: v for k, v in runs[0].params.items() if k != "budget"}


def test_empty_budget_sweep_leaves_the_headline(params):
    p = copy.deepcopy(params)
    p["budgets"] = []
    assert [r.label for r in smartkv_runs(p)] == [HEADLINE]


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda p: p.update(budget=0), "budget"),
        (lambda p: p.update(budget=1.5), "budget"),
        (lambda p: p.update(budgets="0.3"), "budgets"),
        (lambda p: p.update(budgets=[0.3, 2.0]), "budgets[1]"),
        (lambda p: p["baselines"].append({"label": "x", "method": "nope"}), "method"),
        (lambda p: p["baselines"].append({"label": "x", "method": "uniform", "params": {"bits": 5}}), "bits"),
        (lambda p: p["baselines"].append({"label": "fp16", "method": "fp16"}), "duplicate"),
        (lambda p: p["baselines"].append({"label": "smartkv@x", "method": "fp16"}), "matched runs"),
        (lambda p: p["ablations"].append({"label": "y", "params": {"allocation": "magic"}}), "allocation"),
        (lambda p: p.update(baselines=[]), "baselines must list at least one run"),
        (lambda p: p.update(baselines=[{"label": "fp16", "method": "fp16"}, "int3"]), "baselines[1] must be a mapping"),
        (lambda p: p.update(ablations={"label": "y"}), "ablations must list at least one variant"),
        (lambda p: p["ablations"].insert(1, ["y"]), "ablations[1] must be a mapping"),
        (lambda p: p.update(decay=1.0), "decay"),
        (lambda p: p.update(realloc_freq=-1), "realloc_freq"),
        (lambda p: p.update(seeds=[0, 1]), "seeds"),
        (lambda p: p.update(seeds={"dev": [], "test": [0]}), "seeds.dev"),
        (lambda p: p.update(seeds={"dev": [0], "test": [0, 1]}), "both dev and test"),
        (lambda p: p.update(split="train"), "split"),
        (lambda p: p.update(device_map="everywhere"), "device_map"),
        (lambda p: p.update(device_map={"model.layers.0": "gpu"}), "device_map"),
        (lambda p: p.update(ablations_seeds=[0, 100]), "ablations_seeds"),
        (lambda p: p.update(ablations_seeds=[]), "ablations_seeds"),
        (lambda p: p.update(match=["int7"]), "match"),
        (lambda p: p["tasks"]["niah"].update(lengths=[]), "tasks.niah.lengths"),
        (lambda p: p["tasks"]["niah"].update(depths=[]), "tasks.niah.depths"),
        (lambda p: p["tasks"].update(nope={"lengths": [100]}), "unknown task"),
        (lambda p: p.update(tasks={}), "grid has no samples"),
        (lambda p: p.update(longbench={"enabled": True, "source": "/no/such/folder", "tasks": ["trec"]}),
         "longbench.source"),
    ],
)
def test_bad_params_name_the_key(params, edit, key):
    p = copy.deepcopy(params)
    edit(p)
    with pytest.raises(ParamError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(p)


def test_one_check_per_value(params):
    """budget and decay are checked by the method-level helpers, one message for both paths."""
    from smartkv.methods.registry import ConfigError, make_config

    p = copy.deepcopy(params)
    p["decay"] = 1.0
    with pytest.raises(ParamError) as study_err:
        smartkv_runs(p)
    with pytest.raises(ConfigError) as method_err:
        make_config("smartkv", decay=1.0)
    assert str(method_err.value) == f"smartkv: {study_err.value}"


def test_longbench_fixture_folder_validates(params):
    p = copy.deepcopy(params)
    p["longbench"] = {"enabled": True, "source": str(FIXTURE), "tasks": ["trec", "hotpotqa"],
                      "max_context_tokens": [512], "n_per_task": 1}
    assert longbench_plan(p)["tasks"] == ["trec", "hotpotqa"]


def test_stage_exits_2_with_one_line(tmp_path, params):
    p = copy.deepcopy(params)
    p["budget"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "matched_budgets.json").write_text("{}")
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", "stages.smartkv_runs", p["cells"]["main"][0]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: params.yaml: budget=1.5 must be a fraction of FP16 memory in (0, 1]"], \
        proc.stderr
    assert not (tmp_path / "data").exists()


def test_n_per_cell_per_length(params):
    p = copy.deepcopy(params)
    p["tasks"]["niah"]["lengths"] = [1024, 2048]
    p["tasks"]["niah"]["n_per_cell"] = [6, 2]
    niah = next(t for t in task_plan(p) if t["name"] == "niah")
    assert niah["n_per_cell"] == [6, 2]
    p["tasks"]["niah"]["n_per_cell"] = 3
    assert next(t for t in task_plan(p) if t["name"] == "niah")["n_per_cell"] == [3, 3]
    p["tasks"]["niah"]["n_per_cell"] = [6]
    with pytest.raises(ParamError, match=r"one count per length \(2\)"):
        task_plan(p)
    p["tasks"]["niah"]["n_per_cell"] = [6, 0]
    with pytest.raises(ParamError, match=r"n_per_cell\[1\]"):
        task_plan(p)


def _with(params: dict, dotted: str, value):
    p = copy.deepcopy(params)
    *path, leaf = dotted.split(".")
    node = p
    for part in path:
        node = node[part]
    node[leaf] = value
    return p


STAGE_ERRORS = [  # (module and args, params change or raw text, what the one line must name)
    (["stages.baselines", "niah-1024-1of6"], "budget: [0.3\nseeds: {dev: [1]\n", "not valid YAML: line 2, column 6"),
    (["stages.prepare"], ("cells.main", ["niah-1024", "perplexity-1024"]),
     "cells.main does not match the task grid: missing niah-2048"),
    (["stages.baselines", "niah-999"], None, "cells.main: no cell 'niah-999'; allowed: niah-1024-1of6"),
    (["stages.baselines"], None, "usage: python -m baselines <cell>"),
    (["stages.baselines", "niah-1024"], ("cells.main", ["niah-1024", "niah-1024-1of2"]),
     "cells.main: niah-1024 must be listed whole or as all of its shards"),
    (["stages.smartkv_runs", "niah-1024-1of6"], ("cells.main", ["niah-1024-x"]),
     "cells.main: 'niah-1024-x' is not a cell name; allowed: <task>-<length>"),
    (["stages.section", "baselines", "extra_cells", "niah-4096-1of6"], ("extra_cells.match", ["int7"]),
     "extra_cells.match: int7 not in extra_cells.runs"),
    (["stages.section_tests", "second_model"], ("stats.alpha", 2), "stats.alpha=2 must lie in (0, 0.5)"),
    (["stages.stats"], ("split", "train"), "split='train' must be one of dev, test"),
]


@pytest.mark.parametrize("argv, change, names", STAGE_ERRORS, ids=[" ".join(a) for a, _, _ in STAGE_ERRORS])
def test_every_stage_refuses_bad_params_in_one_line(tmp_path, params, argv, change, names):
    if isinstance(change, str):
        (tmp_path / "params.yaml").write_text(change)
    else:
        p = params if change is None else _with(params, *change)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: params.yaml: ") and names in lines[0], lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()  # nothing half-written
