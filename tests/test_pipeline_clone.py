"""A `git clone` of the tiny study (`origin`, tests/pipeline_support.py) (slow): it is up to date
(`dvc status` clean); `dvc exp run -S budget=0.3 smartkv` there leaves prepare, baselines and match as
they are and makes stale exactly what reads the headline run; queued dev-seed experiments feed the
sweeps summary, which keeps what it recorded once the experiment refs are gone; `dvc plots show`
works offline. It reads origin only (a clone copies its commits), so it runs beside
tests/test_pipeline.py, which re-runs a stage in origin's working tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_support import DVC, git, ran_stages, run, stale_stages


@pytest.mark.slow
def test_clone_is_up_to_date_and_sweeps_read_experiments(origin: Path, tmp_path: Path):
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

    headline = pd.read_parquet(clone / "data/smartkv.parquet").query("run == 'smartkv'")
    assert len(headline) and (headline["budget"] == 0.3).all() and (headline["kv_ratio"] <= 0.3 + 1e-6).all()
    # `profile` times the headline run, so the budget is its param too
    assert stale_stages(run([DVC, "status"], clone)) == {"stats", "figures", "latency", "errors", "profile", "report",
                                                         "slides"}
    git("checkout", "--", ".", cwd=clone)  # every output is in git: this restores the committed study

    # A dev-seed sweep over decay, queued and run as README says; the smartkv stage alone.
    run([DVC, "exp", "run", "--queue", "-S", "split=dev", "-S", "decay=0.85,0.9", "smartkv"], clone)
    run([DVC, "exp", "run", "--run-all"], clone)
    out = run([DVC, "repro", "--force", "sweeps"], clone)
    assert ran_stages(out) == {"sweeps"}, out[-2000:]
    sweeps = json.loads((clone / "metrics/sweeps.json").read_text())
    assert sweeps["n_experiments"] == 3 and sweeps["n_dev"] == 2, sweeps
    decay = sweeps["params"]["decay"]
    assert [v["value"] for v in decay["values"]] == [0.85, 0.9] and decay["current"] == 0.9
    assert all(0 <= v["score_mean"] <= 1 and v["n_prompts"] == 1 for v in decay["values"])
    assert decay["best_on_dev"] in (0.85, 0.9)
    # The experiment refs stay on this machine (a clone does not fetch them): the summary keeps
    # what it recorded, so a re-run without them (another clone, `dvc exp remove`) loses nothing.
    run([DVC, "exp", "remove", "--all-commits"], clone)
    assert not run([DVC, "exp", "list", "--all-commits", "--name-only"], clone).strip()
    run([DVC, "repro", "--force", "sweeps"], clone)
    again = json.loads((clone / "metrics/sweeps.json").read_text())
    assert again["experiments"] == sweeps["experiments"] and again["params"] == sweeps["params"]

    # `dvc plots show` on the clone: the data plots' libraries are inlined, nothing is fetched.
    html = run([DVC, "plots", "show", "-o", tmp_path / "html"], clone) and (tmp_path / "html/index.html").read_text()
    assert "<script src=" not in html and "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed(") >= 3 and "vega-embed" in html  # the three data plots and the library
