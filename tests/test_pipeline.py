"""The DVC pipeline end to end on tiny params, in a temporary copy of the repository (slow).

Checks that every metrics and plots file appears with sane values, that a second
`dvc repro` does nothing, that re-running a model stage gives the same metrics, and that
changing `budget` re-runs only what depends on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

METRICS = ["main.json", "tasks.json", "significance.json", "ablations.json", "power.json", "latency.json"]
FIGURES = ["pareto", "needle_heatmaps", "allocation_map", "ablations", "regret", "latency"]
CSVS = ["pareto.csv", "latency.csv", "ablations.csv"]
STAGES = ["prepare", "baselines", "smartkv", "ablations", "stats", "figures", "report"]


def tiny_params(params: dict) -> dict:
    """Smallest study that still exercises every stage: 2 seeds (for a std), 160-token prompts."""
    p = dict(params)
    p["seeds"] = [0, 1]
    p["tasks"] = {
        "niah": {"lengths": [160], "depths": [0.5], "n_per_cell": 1, "max_new_tokens": 6},
        "perplexity": {"lengths": [160], "n_per_cell": 1, "kwargs": {"continuation_tokens": 8}},
    }
    p["longbench"] = {**p["longbench"], "enabled": False}
    p["budget"] = 0.5
    p["budgets"] = [0.3]
    p["baselines"] = [
        {"label": "fp16", "method": "fp16"},
        {"label": "int4", "method": "uniform", "params": {"bits": 4}},
        {"label": "int2", "method": "uniform", "params": {"bits": 2}},
        {"label": "kivi-2", "method": "kivi", "params": {"bits": 2}},
    ]
    p["ablations"] = [{"label": "random-alloc", "params": {"allocation": "random"}},
                      {"label": "oracle", "oracle": True}]
    p["figures"] = {"heatmap_runs": ["fp16", "int2", "smartkv"]}
    p["allocation_example"] = {"length": 80, "depth": 0.5, "seed": 0, "max_new_tokens": 4}
    return p


def run(cmd: list, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "SMARTKV_LOG": "WARNING"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def ran_stages(out: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in out}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("pipeline")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    skip = ("data/", "metrics/", "plots/", "dvc.lock", "REPORT.md")
    for f in filter(None, files):
        if f.startswith(skip) or not (REPO / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params(params), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    if not (dst / ".dvc").is_dir():
        run([DVC, "init", "-q"], dst)
    return dst


@pytest.mark.slow
def test_pipeline_end_to_end(repo: Path):
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == set(STAGES), out[-3000:]

    for name in METRICS:
        data = json.loads((repo / "metrics" / name).read_text())
        assert data, name
    main = json.loads((repo / "metrics/main.json").read_text())["runs"]
    assert {"fp16", "int4", "int2", "kivi-2", "smartkv", "smartkv-b0.30"} <= set(main)
    for run_name, m in main.items():
        assert 0.0 <= m["score_mean"] <= 1.0, (run_name, m)
        assert 0.0 < m["kv_ratio"] <= 1.01, (run_name, m)
        assert "tokens_per_s" not in m  # timings live in metrics/latency.json only
    assert main["fp16"]["kv_ratio"] == pytest.approx(1.0)
    assert main["int2"]["kv_ratio"] < main["int4"]["kv_ratio"] < 1.0
    assert main["smartkv"]["kv_ratio"] <= 0.5 + 1e-6
    assert "score_std" in main["fp16"]  # 2 seeds give a std
    lat = json.loads((repo / "metrics/latency.json").read_text())["runs"]
    assert all(v["tokens_per_s"] > 0 for v in lat.values())
    sig = json.loads((repo / "metrics/significance.json").read_text())["tests"]
    assert sig and all(0 <= t["all"]["p"] <= t["all"]["p_holm"] <= 1 for t in sig.values())
    power = json.loads((repo / "metrics/power.json").read_text())
    assert 0 < power["n_for_target_power_by_discordance"]["0.30"]
    abl = json.loads((repo / "metrics/ablations.json").read_text())
    assert {"smartkv", "random-alloc", "oracle"} <= set(abl["runs"])
    assert "regret_vs_oracle" in abl

    for stem in FIGURES:
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            path = repo / "plots" / f"{stem}.{ext}"
            assert path.read_bytes()[:4] == magic and path.stat().st_size > 1000, path
    for name in CSVS:
        lines = (repo / "plots" / name).read_text().strip().splitlines()
        assert len(lines) >= 3, name
    report = (repo / "REPORT.md").read_text()
    for heading in ("## Setup", "## Main results", "## Figures", "## Ablations", "## Significance", "## Limitations"):
        assert heading in report
    assert "plots/pareto.png" in report
    assert (repo / "dvc.lock").is_file()
    assert not list((repo / "data").glob(".*.tmp")), "a temporary file was left behind"

    # Nothing changed: nothing runs.
    out = run([DVC, "repro"], repo)
    assert not ran_stages(out), out[-2000:]

    # Re-running a model stage from scratch gives identical metrics (deterministic on CPU);
    # only the timings in metrics/latency.json may differ.
    before = {n: (repo / "metrics" / n).read_text() for n in METRICS if n != "latency.json"}
    run([DVC, "repro", "--force", "--single-item", "smartkv"], repo)
    run([DVC, "repro"], repo)
    for name, text in before.items():
        assert (repo / "metrics" / name).read_text() == text, f"{name} changed on a re-run"

    # Only what depends on `budget` re-runs (not prepare, not baselines).
    shown = run([DVC, "metrics", "show", "--json"], repo)
    assert "main.json" in shown
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["budget"] = 0.4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == {"smartkv", "ablations", "stats", "figures", "report"}, out[-2000:]
    main2 = json.loads((repo / "metrics/main.json").read_text())["runs"]
    assert main2["fp16"] == main["fp16"]  # baselines untouched
    assert main2["smartkv"]["kv_ratio"] <= 0.4 + 1e-6
