"""Re-run a slice of the study with the code at hand and write its rows, or compare two such
files: evidence that a change leaves the study's results as they are, where re-running every
stage is not affordable on the machine at hand.

    python docs/probes/neutrality/check_rows.py write OUT.parquet [n]   # n prompts per needle length
    python docs/probes/neutrality/check_rows.py compare A.parquet B.parquet

`write` evaluates the first n needle prompts of each length of test seed 0 with the runs and
params of the baselines and smartkv stages (ablations included). `compare` checks every result
column of two such files (one written by the code before the change, one after, on the same
machine) for exact equality and exits 1 on any difference. Committed results are not the
reference: float results differ between CPUs (this probe found the answer log-probabilities of
the committed rows and of the same code on another machine apart in the last digits).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from smartkv.io import atomic_write_parquet, read_parquet_with_meta
from smartkv.study.driver import evaluate_runs
from smartkv.study.match import budgets
from smartkv.study.runs import ablation_runs, baseline_runs, smartkv_runs

TIMING = {"prefill_s", "fork_s", "forced_s", "reference_s", "decode_s", "tokens_per_s"}
KEY = ["stage", "run", "sample_id", "seed"]


def write(out: str, n: int) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    tasks, meta = read_parquet_with_meta("data/tasks.parquet")
    needles = tasks[(tasks.split == "test") & (tasks.seed == 0) & (tasks.task == "niah")]
    picked = needles.groupby("context_length", sort=False).head(n)
    matched = budgets(json.loads(Path("metrics/matched_budgets.json").read_text()), "test")
    stages = {"baselines": baseline_runs(params), "smartkv": smartkv_runs(params, matched) + ablation_runs(params)}
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.parquet"
        atomic_write_parquet(picked, path, meta)
        for stage, runs in stages.items():
            df = evaluate_runs(params, runs, path, split="test", desc=stage)
            frames.append(df.drop(columns=[c for c in df.columns if c in TIMING]).assign(stage=stage))
    pd.concat(frames).sort_values(KEY).reset_index(drop=True).to_parquet(out)


def compare(a: str, b: str) -> int:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    cols = [c for c in x.columns if c in y.columns]
    diff = [c for c in cols if not x[c].astype(str).equals(y[c].astype(str))]
    print(f"{len(x)} vs {len(y)} rows ({x['run'].nunique()} runs x {x['sample_id'].nunique()} prompts), "
          f"{len(cols)} columns compared; differing: {diff or 'none'}")
    return 1 if diff or len(x) != len(y) or set(x.columns) != set(y.columns) else 0


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
