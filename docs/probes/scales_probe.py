"""Dev-seed probe: SmartKV's scale/zero-point format (fp16 vs int8) and group size (64 vs 32) at
budget 0.25, on the study's needle task (niah, Landmark's block layout, classic block, 1k tokens),
through the stages' evaluate().

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python docs/probes/scales_probe.py \
        --seeds 101 102 103 --out docs/probes/scales.csv

Dev seeds only (the study reports on test seeds 0-5). Prints per run the accuracy, the mean answer
log-probability, KL from FP16, the measured KV ratio and mean bits, and, for every run, the share of
quantized values and of bytes held at 8 bits (issue 7: "drop the 8-bit tier where it only costs").
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch

import smartkv.evaluate as ev
from smartkv.models import load_model
from smartkv.runner import RunSpec
from variants_probe import HEAD, needle_frames  # the same headline config and needle grid

VARIANTS = {
    "smartkv": {},  # fp16 metadata, groups of 64 (params.yaml)
    "int8-g64": {"scale_format": "int8"},
    "int8-g32": {"scale_format": "int8", "group_size": 32},
    "fp16-g32": {"group_size": 32},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--n", type=int, default=1, help="prompts per (length, depth, seed)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # every cache's values per width (`memory_report()["bits_histogram"]`), in evaluate()'s row order
    hists: list[dict[int, int]] = []
    real_memory_of = ev.memory_of

    def memory_with_histogram(cache):
        hists.append(dict(cache.memory_report().get("bits_histogram", {})) if hasattr(cache, "memory_report") else {})
        return real_memory_of(cache)

    ev.memory_of = memory_with_histogram
    model, tok = load_model("default")
    runs = [RunSpec("int3", "uniform", {"bits": 3})]
    runs += [RunSpec(v, "smartkv", {**HEAD, **VARIANTS[v]}, "smartkv") for v in args.variants]
    frames = []
    for seed in args.seeds:
        frames += needle_frames(model, tok, runs, seed, args.lengths, args.n)
    df = pd.concat(frames, ignore_index=True)
    if len(hists) != len(df):
        raise RuntimeError(f"{len(hists)} histograms for {len(df)} rows: a run failed; see the log")
    quantized = [sum(n for b, n in h.items() if b != 16) for h in hists]
    df["share8_values"] = [h.get(8, 0) / q if q else float("nan") for h, q in zip(hists, quantized)]
    df["share0_values"] = [h.get(0, 0) / q if q else float("nan") for h, q in zip(hists, quantized)]
    if args.out:
        keep = ["run", "task", "seed", "sample_id", "context_length", "depth", "score", "answer_logprob", "kl_fp16",
                "kv_ratio", "mean_bits", "kv_scales_bytes", "kv_codes_bytes", "share8_values", "share0_values"]
        df[[c for c in keep if c in df]].to_csv(args.out, index=False, float_format="%.6g")
    cols = {"score": "acc", "answer_logprob": "logp", "kl_fp16": "kl", "kv_ratio": "kv", "mean_bits": "bits",
            "share8_values": "8bit", "share0_values": "evicted"}
    print(df.groupby("run")[list(cols)].mean().rename(columns=cols).round(4).to_string())
    scales = df.groupby("run")[["kv_scales_bytes", "kv_codes_bytes"]].mean()
    print((scales["kv_scales_bytes"] / scales["kv_codes_bytes"]).round(4).rename("scales / codes bytes").to_string())


if __name__ == "__main__":
    main()
