"""One-off: split the stage-wide result files of revision d9ece5c into the cell files of `cells`.

The rows are not re-computed: each cell file holds exactly the rows the old file held for that
cell's prompts, in the same order (so `stages.common.read_results` of the cells equals the old
file, which this script checks before it writes). They gain the per-row provenance columns that
new cells carry: `revision` is the last commit that wrote the old file, `torch` the version its
metadata records, and `machine` says it was not recorded. Then `dvc commit` records the cells.

    python scripts/split_into_cells.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd

from smartkv.io import atomic_write_parquet, read_parquet_with_meta
from smartkv.study.cells import cell_list
from smartkv.study.driver import read_results, read_tasks
from smartkv.study.params import load_params
from stages.common import DATA, cell_file

OLD = {  # part -> (old results file, old timings file, tasks file, split its stage ran on)
    "baselines": ("baselines.parquet", "timings/baselines.parquet", "tasks.parquet", None),
    "smartkv": ("smartkv.parquet", "timings/smartkv.parquet", "tasks.parquet", "test"),
    "ablations": ("ablations.parquet", "timings/ablations.parquet", "tasks.parquet", "test"),
    "extra_cells/baselines": ("extra_cells.parquet", "timings/extra_cells.parquet", "extra_cells_tasks.parquet", "test"),
    "extra_cells/smartkv": ("extra_cells.parquet", "timings/extra_cells.parquet", "extra_cells_tasks.parquet", "test"),
    "second_model/baselines": ("second_model.parquet", "timings/second_model.parquet", "second_model_tasks.parquet", "test"),
    "second_model/smartkv": ("second_model.parquet", "timings/second_model.parquet", "second_model_tasks.parquet", "test"),
}
GROUP = {"baselines": "main", "smartkv": "main", "ablations": "main"}


def last_writer(path: Path) -> str:
    return subprocess.run(["git", "log", "-1", "--format=%H", "--", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    params = load_params()
    done_old: set[Path] = set()
    for part, (res, tim, tasks, split) in OLD.items():
        old, old_t = DATA / res, DATA / tim
        df, meta = read_parquet_with_meta(old)
        timings, _ = read_parquet_with_meta(old_t)
        if "/" in part:  # a matched section's file held its baselines' rows, then SmartKV's
            is_ours = df["run"].str.startswith("smartkv@")
            keep = is_ours if part.endswith("smartkv") else ~is_ours
            df = df[keep].reset_index(drop=True)
            timings = timings[keep.values].reset_index(drop=True)
        group = GROUP.get(part, part.split("/")[0])
        by_seed = read_tasks(DATA / tasks, split)
        items = [(seed, s) for seed, v in sorted(by_seed.items()) for s in v]
        stored = meta
        prov = {"revision": last_writer(old), "torch": (stored.get("versions") or {}).get("torch", "unknown"),
                "machine": "not recorded (rows written before per-row provenance)"}
        written = []
        for cell in cell_list(params, group):
            keys = {(seed, s.task, s.sample_id) for seed, s in cell.take(items, sample=lambda p: p[1])}
            mask = [(int(a), str(b), str(c)) in keys for a, b, c in zip(df["seed"], df["task"], df["sample_id"])]
            rows = df[mask].reset_index(drop=True).assign(**prov)
            meta_cell = {**stored, "config": {**stored.get("config", {}), "cell": cell.name}}
            atomic_write_parquet(rows, cell_file(part, cell.name), meta_cell)
            atomic_write_parquet(timings[mask].reset_index(drop=True), cell_file(part, cell.name, True), meta_cell)
            written.append(cell_file(part, cell.name))
        union = read_results([written]).drop(columns=list(prov))
        assert len(union) == len(df), (part, len(union), len(df))
        pd.testing.assert_frame_equal(union, df.reset_index(drop=True))
        print(f"{part}: {len(df)} rows -> {len(written)} cells, union equal to {old}")
        done_old.update({old, old_t})
    for path in sorted(done_old):
        path.unlink()


if __name__ == "__main__":
    main()
