"""FP16 calibration of `niah_passage` on dev seeds: teacher-forced exact match per (variant, length).

    nice -n 10 python docs/probes/independent_prompts/probe.py --grid docs/probes/independent_prompts/grid_inline.yaml \
        --seeds 100 101 --threads 2 --out /tmp/p_inline.csv

Runs `smartkv.calibrate.pilot` (FP16 alone, the study's scoring: teacher-forced exact match of
the gold key, and greedy generation) on the default model, and prints a markdown table with the
CPU seconds the run took. Dev seeds only (>= 100): they read the New Testament, test the Old.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from smartkv.calibrate import check_dev_seeds, pilot
from smartkv.models import load_model


def table(df: pd.DataFrame) -> str:
    g = df.groupby(["variant", "context_length"]).agg(
        n=("score", "size"), forced=("forced_exact", "sum"), generated=("score", "sum"),
        logprob=("answer_logprob", "mean"), prefill_s=("prefill_s", "mean")).reset_index()
    lines = ["| variant | length | n | FP16 teacher-forced exact | FP16 generated | answer log-prob | prefill s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in g.itertuples():
        lines.append(f"| {r.variant} | {r.context_length} | {r.n} | {int(r.forced)}/{r.n} ({r.forced / r.n:.2f}) | "
                     f"{int(r.generated)}/{r.n} | {r.logprob:.3f} | {r.prefill_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="default")
    p.add_argument("--out", required=True, help="per-sample CSV")
    args = p.parse_args(argv)
    check_dev_seeds(args.seeds)
    torch.set_num_threads(args.threads)
    grid = yaml.safe_load(Path(args.grid).read_text())
    t0, c0 = time.perf_counter(), time.process_time()
    model, tokenizer = load_model(args.model)
    df = pilot(model, tokenizer, grid, args.seeds, progress=False)
    df.drop(columns=["config"], errors="ignore").to_csv(args.out, index=False)
    print(table(df))
    print(f"\nmodel {args.model}, seeds {args.seeds}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.machine()} {platform.processor() or ''}; wall {time.perf_counter() - t0:.0f} s, "
          f"CPU {time.process_time() - c0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
