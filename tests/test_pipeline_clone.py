"""A `git clone` of the tiny study (`origin`, tests/pipeline_support.py) (slow): it is up to date
(`dvc status` clean); `dvc exp run -S budget=0.3 smartkv` there leaves prepare, baselines and match as
they are and makes stale exactly what reads the headline run; `dvc plots show` works offline; a
`dvc repro` killed mid-stage resumes with the cells that had not finished. It
reads origin only (a clone copies its commits), so it runs beside tests/test_pipeline.py, which
re-runs a stage in origin's working tree, and beside tests/test_pipeline_sweeps.py (its own clone).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_support import DVC, git, ran_stages, run, stale_stages


@pytest.mark.slow
def test_clone_is_up_to_date_and_an_experiment_stales_only_its_readers(origin: Path, tmp_path: Path):
    clone = tmp_path / "clone"
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    status = run([DVC, "status"], clone)
    assert "up to date" in status, status

    # The headline budget: only what reads it goes stale (not prepare, baselines or match). The
    # experiment runs the smartkv stage itself; what is downstream of it is read from `dvc status`
    # (every stage's run was checked on origin; running them again here would add minutes, not checks).
    out = run([DVC, "exp", "run", "-S", "budget=0.3", "smartkv"], clone)
    assert ran_stages(out) == {"smartkv"}, out[-2000:]
    import pandas as pd

    headline = pd.concat([pd.read_parquet(f) for f in sorted((clone / "data/smartkv").glob("*.parquet"))]).query(
        "run == 'smartkv'")
    assert len(headline) and (headline["budget"] == 0.3).all() and (headline["kv_ratio"] <= 0.3 + 1e-6).all()
    # `profile` times the headline run, so the budget is its param too; so does the passages section,
    # whose SmartKV cells run the headline budget against random allocation (its `ablations`)
    assert stale_stages(run([DVC, "status"], clone)) == {"smartkv_metrics", "stats", "figures", "latency", "errors",
                                                         "profile", "report", "slides", "passages_smartkv"}
    git("checkout", "--", ".", cwd=clone)  # every output is in git: this restores the committed study

    # `dvc plots show` on the clone: the data plots' libraries are inlined, nothing is fetched.
    html = run([DVC, "plots", "show", "-o", tmp_path / "html"], clone) and (tmp_path / "html/index.html").read_text()
    assert "<script src=" not in html and "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed(") >= 3 and "vega-embed" in html  # the three data plots and the library


@pytest.mark.slow
def test_a_repro_killed_mid_stage_resumes_without_redoing_finished_cells(origin: Path, tmp_path: Path):
    """Kill `dvc repro` of the smartkv cells once the first cell has landed in dvc.lock; the next
    `dvc repro` re-runs only the cells that had not finished."""
    import os
    import re
    import signal
    import subprocess
    import time

    import yaml
    from pipeline_support import BIN, ran_cells

    clone = tmp_path / "resume"
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["budget"] = 0.35  # every smartkv cell goes stale, nothing upstream of them
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cells = [f"smartkv@{c}" for c in params["cells"]["main"]]

    def landed() -> set[str]:
        """Cells whose dvc.lock entry already records the new budget."""
        try:
            lock = yaml.safe_load((clone / "dvc.lock").read_text())
        except yaml.YAMLError:  # read half-written while dvc rewrites it: not landed yet
            return set()
        if not isinstance(lock, dict):  # read while empty, between dvc's truncate and its write
            return set()
        lock = lock.get("stages", {})
        return {c for c in cells if lock.get(c, {}).get("params", {}).get("params.yaml", {}).get("budget") == 0.35}

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "SMARTKV_LOG": "WARNING", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(DVC), "repro", "smartkv"], cwd=clone, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    def next_cell_running() -> bool:
        """A smartkv cell's own process runs while dvc waits on it: killing then leaves dvc.lock whole
        (a kill while dvc writes the lock would truncate it, an interruption no re-run can resume from)."""
        out = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "stages.smartkv_runs"], capture_output=True)
        return out.returncode == 0

    deadline = time.monotonic() + 900
    while not (landed() and next_cell_running()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stage: the next cell's process is running
    proc.wait()
    finished = landed()
    assert finished and finished != set(cells), f"the kill came too late or too early: {finished}"
    for lock in (clone / ".dvc/tmp").glob("*lock*"):  # a killed dvc leaves its locks behind
        lock.unlink()

    out = run([DVC, "repro", "smartkv"], clone)
    again = [c for c in ran_cells(out) if c.startswith("smartkv@")]
    assert set(again) == set(cells) - finished, (again, finished)
    assert landed() == set(cells)
    assert all(re.search(rf"Stage '{re.escape(c)}' didn't change, skipping", out) for c in finished), out[-2000:]
