"""Stage `latency`: throughput of the forwards that read each cache, from the model stages' timings.

In the default (teacher-forced) scoring that is the answer's forward through the cache, not a
greedy decode loop; `python -m smartkv bench` measures decode speed proper.

Reads data/timings/{baselines,smartkv,ablations}.parquet (the `split` seeds) and writes
metrics/latency.json, plots/latency.{png,pdf} and plots/latency.csv. Timings differ on
every run, so they live apart from the results: no stage but this one reads them, and a
re-run that only moves the clock re-runs nothing downstream of the results.
"""

from __future__ import annotations

import pandas as pd

from smartkv.study.params import study_split
from smartkv.study.labels import HEADLINE
from stages.common import METRICS, PLOTS, part_files, stage_main


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json, read_parquet_with_meta
    from smartkv.plots import latency_bars, write_plot_data

    split = study_split(params)
    frames = [read_parquet_with_meta(path)[0] for part in ("baselines", "smartkv", "ablations", "peers")
              for path in part_files(part, params, timings=True)]
    t = pd.concat(frames, ignore_index=True)
    t = t[(t["split"] == split) & t["tokens_per_s"].notna()]
    # The headline run appears once (the ablations stage does not re-run it).
    t = t.drop_duplicates(["run", "task", "sample_id", "seed"])
    per_task = (t.groupby(["run", "task"], sort=False)
                .agg(method=("method", "first"), family=("family", "first"), tokens_per_s=("tokens_per_s", "mean"),
                     tokens_per_s_median=("tokens_per_s", "median"))
                .reset_index())
    latency_bars(per_task, PLOTS / "latency")
    fp = per_task[per_task["method"] == "fp16"].groupby("task")["tokens_per_s"].mean()
    rel = per_task[per_task["task"].isin(fp.index)].assign(rel=lambda d: d["tokens_per_s"] / d["task"].map(fp))
    by_run = rel.groupby("run", sort=False).agg(family=("family", "first"), tokens_per_s=("tokens_per_s", "mean"),
                                                rel_to_fp16=("rel", "mean")).reset_index()
    write_plot_data(by_run, PLOTS / "latency.csv")
    runs = {}
    for run, g in t.groupby("run", sort=False):
        runs[run] = {"tokens_per_s": float(g["tokens_per_s"].mean()),
                     "tokens_per_s_median": float(g["tokens_per_s"].median()), "n": int(len(g))}
    atomic_write_json(METRICS / "latency.json", {"split": split, "headline": HEADLINE, "runs": runs})


if __name__ == "__main__":
    main()
