"""Stage param validation: a bad value stops the stage before any work, one line naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import common
from stages.common import ParamError

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "longbench"


@pytest.fixture()
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_validate(params):
    assert common.check_seeds(params)
    assert common.task_plan(params)
    runs = common.baseline_runs(params) + common.smartkv_runs(params) + common.ablation_runs(params)
    labels = [r.label for r in runs]
    assert len(labels) == len(set(labels))
    assert common.smartkv_runs(params)[0].label == common.HEADLINE


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda p: p.update(budget=0), "budget"),
        (lambda p: p.update(budget=1.5), "budget"),
        (lambda p: p.update(budgets=[]), "budgets"),
        (lambda p: p.update(budgets=[0.3, 2.0]), "budgets[1]"),
        (lambda p: p["baselines"].append({"label": "x", "method": "nope"}), "method"),
        (lambda p: p["baselines"].append({"label": "x", "method": "uniform", "params": {"bits": 5}}), "bits"),
        (lambda p: p["baselines"].append({"label": "fp16", "method": "fp16"}), "duplicate"),
        (lambda p: p["ablations"].append({"label": "y", "params": {"allocation": "magic"}}), "allocation"),
        (lambda p: p.update(decay=1.0), "decay"),
        (lambda p: p.update(realloc_freq=-1), "realloc_freq"),
        (lambda p: p.update(seeds=[]), "seeds"),
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
        common.check_seeds(p)
        common.task_plan(p)
        common.baseline_runs(p)
        common.smartkv_runs(p)
        common.ablation_runs(p)


def test_longbench_fixture_folder_validates(params):
    p = copy.deepcopy(params)
    p["longbench"] = {"enabled": True, "source": str(FIXTURE), "tasks": ["trec", "hotpotqa"],
                      "max_context_tokens": [512], "n_per_task": 1}
    assert common.longbench_plan(p)["tasks"] == ["trec", "hotpotqa"]


def test_stage_exits_2_with_one_line(tmp_path, params):
    p = copy.deepcopy(params)
    p["budget"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", "stages.smartkv_runs"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: params.yaml: budget=1.5 must be a fraction of FP16 memory in (0, 1]"], proc.stderr
    assert not (tmp_path / "data").exists()
