"""Sweeps as DVC experiments, on a `git clone` of the tiny study (`origin`, tests/pipeline_support.py)
(slow): dev-seed experiments queued and run as docs/study.md ("Sweeps") says feed the `sweeps`
summary, which keeps what it recorded once the experiment refs are gone. Its own clone, so it runs beside
tests/test_pipeline.py and tests/test_pipeline_clone.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_support import DVC, git, ran_stages, run


@pytest.mark.slow
def test_queued_dev_experiments_feed_the_sweeps_summary(origin: Path, tmp_path: Path):
    clone = tmp_path / "clone"
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    # A dev-seed sweep over decay, queued and run as docs/study.md says: the smartkv cells and their metrics alone.
    run([DVC, "exp", "run", "--queue", "-S", "split=dev", "-S", "decay=0.85,0.9", "smartkv_metrics"], clone)
    run([DVC, "exp", "run", "--run-all"], clone)
    out = run([DVC, "repro", "--force", "sweeps"], clone)
    assert ran_stages(out) == {"sweeps"}, out[-2000:]
    sweeps = json.loads((clone / "metrics/sweeps.json").read_text())
    assert sweeps["n_experiments"] == 2 and sweeps["n_dev"] == 2, sweeps
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
