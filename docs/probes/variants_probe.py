"""Dev-seed probe: SmartKV variants against uniform INT3 at ~equal bytes, on the study's own
needle task (niah, Landmark's block layout, classic block), through the stages' evaluate().

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python docs/probes/variants_probe.py \
        --seeds 101 102 --lengths 1024 2048 --n 1 --out docs/probes/variants.csv

Dev seeds only (the study reports on test seeds 0-5); prints per run the accuracy, the mean
answer log-probability, KL from FP16 and the measured KV ratio, per length and pooled.
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch

from smartkv.evaluate import evaluate
from smartkv.models import load_model
from smartkv.runner import RunSpec
from smartkv.tasks import generate_task

HEAD = {"bits": [0, 2, 3, 4, 8], "group_size": 64, "window": 32, "window_share": 0.1, "sink_tokens": 4,
        "allocation": "greedy", "signal": "ema", "key_smoothing": True, "prior": 0.5, "decay": 0.9,
        "realloc_freq": 16, "budget": 0.25}
VARIANTS = {
    "smartkv": {},
    "prior-0.25": {"prior": 0.25},
    "prior-0": {"prior": 0.0},
    "prior-0.75": {"prior": 0.75},
    "head-gran": {"granularity": "head"},
    "kv-split-k2": {"kv_split": True, "key_weight": 2.0, "bits": [2, 3, 4, 8]},
    "no-8bit": {"bits": [0, 2, 3, 4]},
    "head-prior-0": {"granularity": "head", "prior": 0.0},
    "head-prior-0.25": {"granularity": "head", "prior": 0.25},
}


def needle_frames(model, tok, runs, seed: int, lengths: list[int], n: int) -> list[pd.DataFrame]:
    """`runs` on the study's needle task (block layout, five depths) of one dev seed, per length."""
    frames = []
    for length in lengths:
        samples = generate_task("niah", tok, n_per_cell=n, lengths=[length],
                                depths=[0.1, 0.3, 0.5, 0.7, 0.9], seed=seed, layout="block", block="classic")
        for s in samples:
            s.meta.setdefault("max_new_tokens", 8)
        frames.append(evaluate(model, tok, samples, runs, seed=seed, decay=0.9, desc=f"seed {seed} {length}"))
    return frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--n", type=int, default=1, help="prompts per (length, depth, seed)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--ppl", type=int, default=0, help="perplexity prompts (1k + 512 scored tokens) per seed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("default")
    runs = [RunSpec("int3", "uniform", {"bits": 3})]
    runs += [RunSpec(v, "smartkv", {**HEAD, **VARIANTS[v]}, "smartkv") for v in args.variants]
    frames = []
    for seed in args.seeds:
        frames += needle_frames(model, tok, runs, seed, args.lengths, args.n)
        if args.ppl:
            samples = generate_task("perplexity", tok, n_per_cell=args.ppl, lengths=[1024], depths=[], seed=seed,
                                    continuation_tokens=512)
            frames.append(evaluate(model, tok, samples, runs, seed=seed, decay=0.9, desc=f"seed {seed} ppl"))
    df = pd.concat(frames, ignore_index=True)
    if args.out:
        keep = ["run", "task", "seed", "sample_id", "context_length", "depth", "score", "answer_logprob", "kl_fp16",
                "nll", "kv_ratio", "mean_bits"]
        df[[c for c in keep if c in df]].to_csv(args.out, index=False, float_format="%.6g")
    cols = {"score": "acc", "answer_logprob": "logp", "kl_fp16": "kl", "kv_ratio": "kv"}
    needle = df[df["task"] == "niah"]
    print(needle.groupby(["run", "context_length"])[list(cols)].mean().rename(columns=cols).round(4).unstack(1))
    print(needle.groupby("run")[list(cols)].mean().rename(columns=cols).round(4))
    ppl = df[df["task"] == "perplexity"]
    if len(ppl):
        print(ppl.groupby("run")[["nll", "kv_ratio"]].mean().round(4))


if __name__ == "__main__":
    main()
