"""Calibration pilot and cost probe for the study's task grid (issue 8, "Regime" and "Cost").

A task measures a cache only where FP16 gets it right, so every (task, length) of the study is
piloted first on dev seeds (never the seeds that report results): FP16 alone, teacher-forced
exact match and greedy generation side by side. The same run times each part of a sample
(prefill once, then per method: fork, the teacher-forced answer, generation), which sizes
the study.

    python -m smartkv.calibrate pilot --grid grid.yaml --seeds 100 101 --out pilot.csv
    python -m smartkv.calibrate cost --lengths 1024 2048 4096 --n 2 --out cost.csv

`grid.yaml` maps task names to {lengths, depths, n_per_cell, kwargs}, as `params.yaml`'s
`tasks` does (or labels to the same plus `task: <name>`, to pilot variants of one task). Run with OMP_NUM_THREADS=1 and --threads 1 to time one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

DEV_SEED_MIN = 100  # dev seeds are >= 100; test (reporting) seeds are 0..99

COST_RUNS = [
    ("fp16", "fp16", {}),
    ("int3", "uniform", {"bits": 3}),
    ("kivi-2", "kivi", {"bits": 2}),
    ("smartkv-b0.25", "smartkv", {"budget": 0.25}),  # the config's defaults are the study's
]


def check_dev_seeds(seeds: list[int]) -> None:
    bad = [s for s in seeds if s < DEV_SEED_MIN]
    if bad:
        raise ValueError(f"seeds {bad} are test seeds; calibration uses dev seeds >= {DEV_SEED_MIN} only")


def pilot(model, tokenizer, grid: dict, seeds: list[int], *, progress: bool = True) -> pd.DataFrame:
    """FP16 on every sample of `grid` from each dev seed: per-sample rows with forced and generated scores."""
    from smartkv.evaluate import evaluate
    from smartkv.runner import RunSpec
    from smartkv.tasks import generate_task

    check_dev_seeds(seeds)
    frames = []
    for label, spec in grid.items():
        name = spec.get("task", label)  # a `task:` entry lets one grid pilot variants of a task
        kwargs = dict(spec.get("kwargs") or {})
        for seed in seeds:
            samples = generate_task(name, tokenizer, n_per_cell=int(spec.get("n_per_cell", 1)),
                                    lengths=list(spec["lengths"]), depths=list(spec.get("depths") or []),
                                    seed=seed, **kwargs)
            for s in samples:
                s.meta.setdefault("max_new_tokens", int(spec.get("max_new_tokens", 32)))
            df = evaluate(model, tokenizer, samples, [RunSpec("fp16", "fp16")], seed=seed, prediction="generate",
                          progress=progress, desc=f"pilot {name} seed {seed}")
            df["variant"] = label
            df["kwargs"] = str(kwargs)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def pilot_table(df: pd.DataFrame) -> pd.DataFrame:
    """Task x length: n, FP16 teacher-forced exact match, generated score, mean prefill seconds."""
    answer = df[df["metric"] != "perplexity"]
    table = answer.groupby(["variant", "kwargs", "context_length"]).agg(
        n=("score", "size"), forced_exact=("forced_exact", "mean"), generated=("score", "mean"),
        answer_logprob=("answer_logprob", "mean"), prefill_s=("prefill_s", "mean")).reset_index()
    return table


def cost(model, tokenizer, lengths: list[int], n: int, seed: int = DEV_SEED_MIN, *, progress: bool = True,
         out: str | None = None) -> pd.DataFrame:
    """CPU seconds of each part of a sample, on `n` niah prompts per length and one perplexity prompt.

    Measured as this process's CPU time (`time.process_time`), not wall time: on a shared
    machine wall time counts other processes' work, CPU time does not (with one thread it is
    what a dedicated core would take). Parts: prefill with and without the importance pass;
    the FP16 reference; per `COST_RUNS` method: fork, the teacher-forced answer, and a fresh
    fork + greedy generation capped at the answer + `ANSWER_SLACK` tokens. With `out`, the
    rows so far are written there after every sample (a long probe can be read while it runs).
    """
    from tqdm.auto import tqdm

    from smartkv.answer_scores import target_ids
    from smartkv.evaluate import ANSWER_SLACK, FP16_REFERENCE
    from smartkv.runner import RunSpec, decode, encode, forced_logits, fork, prefill
    from smartkv.tasks import generate_task

    def cpu(fn, *args, **kw):
        t0 = time.process_time()
        out = fn(*args, **kw)
        return out, time.process_time() - t0

    runs = [RunSpec(label, method, params) for label, method, params in COST_RUNS]
    samples = generate_task("niah", tokenizer, n_per_cell=n, lengths=lengths, depths=[0.5], seed=seed)
    samples += generate_task("perplexity", tokenizer, n_per_cell=1, lengths=lengths, depths=[], seed=seed)
    rows = []
    with torch.no_grad():
        for s in tqdm(samples, desc="cost", disable=not progress):
            ids, mask = encode(tokenizer, [s.prompt], device=model.device)
            target = torch.tensor([target_ids(tokenizer, s.prompt, s.target)])
            _, untracked = cpu(prefill, model, ids, mask, track=False)
            pre, tracked = cpu(prefill, model, ids, mask, track=True)
            (ref_cache, _), ref_fork = cpu(fork, pre, FP16_REFERENCE, model)
            _, ref = cpu(forced_logits, model, pre, ref_cache, target)
            base = {"task": s.task, "context_length": s.context_length, "n_tokens": ids.shape[1],
                    "answer_tokens": target.shape[1], "prefill_cpu_s": untracked, "prefill_tracked_cpu_s": tracked,
                    "reference_cpu_s": ref_fork + ref}
            for run in runs:
                (cache, _), fork_s = cpu(fork, pre, run, model)
                _, forced_s = cpu(forced_logits, model, pre, cache, target)
                row = {**base, "run": run.label, "fork_cpu_s": fork_s, "forced_cpu_s": forced_s,
                       "generate_cpu_s": float("nan"), "new_tokens": 0}
                if s.task != "perplexity":
                    (cache, _), fork2 = cpu(fork, pre, run, model)
                    (new, _), gen = cpu(decode, model, pre, cache, int(target.shape[1]) + ANSWER_SLACK)
                    row.update(generate_cpu_s=fork2 + gen, new_tokens=int(new.shape[1]))
                rows.append(row)
            if out:
                pd.DataFrame(rows).to_csv(out, index=False)
    return pd.DataFrame(rows)


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean CPU seconds per (task, length, run)."""
    cols = ["prefill_cpu_s", "prefill_tracked_cpu_s", "reference_cpu_s", "fork_cpu_s", "forced_cpu_s",
            "generate_cpu_s", "answer_tokens", "new_tokens"]
    return df.groupby(["task", "context_length", "run"])[cols].mean().reset_index()


def main(argv: list[str] | None = None) -> int:
    import yaml

    from smartkv.models import load_model

    p = argparse.ArgumentParser(prog="python -m smartkv.calibrate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pilot", help="FP16 accuracy per (task, length) on dev seeds")
    a.add_argument("--grid", required=True, help="YAML: task -> {lengths, depths, n_per_cell, kwargs}")
    a.add_argument("--seeds", type=int, nargs="+", default=[DEV_SEED_MIN])
    b = sub.add_parser("cost", help="CPU seconds per sample part at each length")
    b.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    b.add_argument("--n", type=int, default=2, help="niah prompts per length")
    for q in (a, b):
        q.add_argument("--model", default="default")
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--out", required=True, help="per-sample CSV; the summary table goes to stdout")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.cmd == "pilot":
            path = Path(args.grid)
            if not path.is_file():
                raise ValueError(f"--grid {args.grid!r} is not a file")
            grid = yaml.safe_load(path.read_text()) or {}
            check_dev_seeds(args.seeds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    if args.cmd == "pilot":
        df = pilot(model, tokenizer, grid, args.seeds)
        table = pilot_table(df)
    else:
        df = cost(model, tokenizer, args.lengths, args.n, out=args.out)
        table = cost_table(df)
    df.drop(columns=["config"], errors="ignore").to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wall {time.perf_counter() - start:.1f} s, {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
