"""A `git clone` of the tiny study (`origin`, tests/pipeline_support.py) (slow): it is up to date
(`dvc status` clean); `dvc exp run -S budget=0.3 smartkv` there leaves prepare, baselines and match as
they are and makes stale exactly what reads the headline run; `dvc plots show` works offline. It
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
    # `profile` times the headline run, so the budget is its param too
    assert stale_stages(run([DVC, "status"], clone)) == {"stats", "figures", "latency", "errors", "profile", "report",
                                                         "slides"}
    git("checkout", "--", ".", cwd=clone)  # every output is in git: this restores the committed study

    # `dvc plots show` on the clone: the data plots' libraries are inlined, nothing is fetched.
    html = run([DVC, "plots", "show", "-o", tmp_path / "html"], clone) and (tmp_path / "html/index.html").read_text()
    assert "<script src=" not in html and "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed(") >= 3 and "vega-embed" in html  # the three data plots and the library
