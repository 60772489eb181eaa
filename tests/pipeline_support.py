"""What the three pipeline test files share: the tiny study's `origin` repository, built once per test run.

`origin` is a copy of this repository's code with tests/fixtures/params_tiny.yaml as its params,
after `dvc repro` and a commit of every output (all are `cache: false`), as a clone would get it.
`make test` runs two xdist workers with whole files per worker: tests/test_pipeline.py (checks on
origin itself) starts first on one worker; tests/test_pipeline_sweeps.py and
tests/test_pipeline_clone.py (each on its own clone of origin) run last, on whichever workers are
free (tests/conftest.py orders them). All three ask for origin; the first builds it under a file
lock in the run's shared temporary folder, the others wait for it and reuse it, so their checks run
side by side instead of one after the other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "params_tiny.yaml"
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

# Stage names as dvc.yaml writes them; a `foreach` stage runs as `<name>@<item>`, one per cell.
STAGES = ["prepare", "baselines", "match", "peers", "attention", "sensitivity", "smartkv", "smartkv_metrics", "stats",
          "figures", "latency", "errors", "profile", "report", "slides", "sweeps", "section_tasks",
          "extra_cells_baselines", "extra_cells_smartkv", "second_model_baselines", "second_model_smartkv",
          "section_calibration", "passages_baselines", "passages_smartkv", "peers_tuning", "passages_peers",
          "section_tests"]


def run(cmd: list, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "SMARTKV_LOG": "WARNING", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # stages import the code of the repository they run in
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=2400)  # a shared 2-core machine
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def ran_cells(out: str) -> list[str]:
    """Every stage `dvc repro` ran, foreach items by their full name (`baselines@niah-160-1of2`)."""
    return re.findall(r"Running stage '([^']+)'", out)


def ran_stages(out: str) -> set[str]:
    return {name.split("@")[0] for name in ran_cells(out)} & set(STAGES)


def stale_stages(status: str) -> set[str]:
    """Stages `dvc status` names (a line "<stage>:" for each stage whose deps, params or outs changed)."""
    names = {line.strip()[:-1].split("@")[0] for line in status.splitlines() if line.strip().endswith(":")}
    return names & set(STAGES)


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


def shared_origin(tmp_path_factory, worker_id: str) -> Path:
    """The tiny study reproduced and committed with every output: built by the first test that asks,
    reused by the others of the same run (xdist workers share their run's temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # one process: its own; workers: the run's, above theirs
    with FileLock(str(shared / "origin.lock")):
        dst, done = shared / "origin", shared / "origin.built"
        if not done.exists():
            if dst.exists():  # a build that failed half-way: start again
                shutil.rmtree(dst)
            dst.mkdir()
            build_origin(dst)
            done.touch()
    return dst


def build_origin(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    skip = ("data/", "metrics/", "plots/", "dvc.lock", "REPORT.md")
    for f in filter(None, files):
        if f.startswith(skip) or not (REPO / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    shutil.copy2(TINY, dst / "params.yaml")
    # The peers stage runs kvpress in its own venv (`make test` builds it first): lend it to the copy.
    kvpress = REPO / ".venv-kvpress"
    assert (kvpress / "bin/python").exists(), ".venv-kvpress is missing: run `make venv-kvpress` (make test does)"
    (dst / ".venv-kvpress").symlink_to(kvpress)
    git("init", "-q", cwd=dst)
    (dst / ".git/info/exclude").write_text(".venv-kvpress\n")
    git("add", "-A", cwd=dst)
    git("commit", "-qm", "tiny study: code", cwd=dst)
    out = run([DVC, "repro"], dst)
    assert ran_stages(out) == set(STAGES), out[-3000:]
    git("add", "-A", cwd=dst)
    git("commit", "-qm", "tiny study: results", cwd=dst)
    return dst
