"""Decode speed of each method relative to `fp16`, all measured in one run on one shared prefill.

Method: one prefill of a `context`-token prompt; each run forks it and decodes `new_tokens`
tokens (EOS suppressed so every run decodes the same number). Each run is warmed up once,
then the runs are timed round-robin `repeats` times (so that a noisy neighbour hurts all of
them alike) and the median tokens/s is reported, with its ratio to fp16's median.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from smartkv.runner import RunSpec, decode, encode, fork, memory_of, prefill

DEFAULT_RUNS = [
    RunSpec("fp16", "fp16"),
    RunSpec("hf_dynamic", "hf_dynamic", family="peer"),
    RunSpec("uniform-4", "uniform", {"bits": 4}),
    RunSpec("uniform-2", "uniform", {"bits": 2}),
    RunSpec("kivi-4", "kivi", {"bits": 4}),
    RunSpec("kivi-2", "kivi", {"bits": 2}),
    RunSpec("smartkv-b0.35", "smartkv", {"budget": 0.35}, "smartkv"),
    RunSpec("smartkv-b0.25", "smartkv", {"budget": 0.25}, "smartkv"),
    RunSpec("hf_quanto-4", "hf_quanto", {"nbits": 4}, "peer"),
    RunSpec("hf_quanto-2", "hf_quanto", {"nbits": 2}, "peer"),
    RunSpec("hf_hqq-4", "hf_hqq", {"nbits": 4}, "peer"),
]


def parse_runs(items: list[str]) -> list[RunSpec]:
    """`LABEL=METHOD[:key=value,...]` -> RunSpec (values parsed as numbers where they look like one)."""
    runs = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--run {item!r} must look like LABEL=METHOD[:key=value,...]")
        label, rest = item.split("=", 1)
        method, _, kv = rest.partition(":")
        params = {}
        for pair in filter(None, kv.split(",")):
            k, _, v = pair.partition("=")
            try:
                params[k] = int(v)
            except ValueError:
                try:
                    params[k] = float(v)
                except ValueError:
                    params[k] = v
        runs.append(RunSpec(label, method, params))
    if not any(r.method == "fp16" for r in runs):
        runs.insert(0, RunSpec("fp16", "fp16"))
    return runs


def _prompt(tokenizer, n_tokens: int) -> str:
    from smartkv.tasks import generate_task

    sample = generate_task("niah", tokenizer, n_per_cell=1, lengths=[n_tokens], depths=[0.5], seed=0)[0]
    return sample.prompt


def run_bench(model_name: str, dtype: str, runs: list[RunSpec], context: int, new_tokens: int, repeats: int,
              threads: int | None = None) -> dict:
    from smartkv.io import provenance
    from smartkv.models import load_model

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_model(model_name, dtype=dtype)
    ids, mask = encode(tok, [_prompt(tok, context)], device=model.device)
    pre = prefill(model, ids, mask)
    timings: dict[str, list[float]] = {r.label: [] for r in runs}
    memory: dict[str, dict] = {}
    for rep in range(repeats + 1):  # repetition 0 is the warm-up
        for run in runs:
            cache, _ = fork(pre, run, model)
            n = 4 if rep == 0 else new_tokens
            new, seconds = decode(model, pre, cache, n, min_new_tokens=n)
            if rep:
                timings[run.label].append(new.shape[1] / seconds)
                memory[run.label] = memory_of(cache)
    med = {k: statistics.median(v) for k, v in timings.items()}
    base = med["fp16"]
    rows = []
    for run in runs:
        rows.append({
            "run": run.label,
            "method": run.method,
            "params": run.params,
            "tokens_per_s": med[run.label],
            "tokens_per_s_all": timings[run.label],
            "ratio_vs_fp16": med[run.label] / base,
            "kv_ratio": memory[run.label]["ratio"],
            "kv_bytes": memory[run.label]["kv_bytes"],
        })
    lines = [f"decode speed at {ids.shape[1]} prompt tokens, {new_tokens} new tokens, median of {repeats} "
             f"(torch threads {torch.get_num_threads()})",
             f"{'run':16s} {'tok/s':>8s} {'vs fp16':>8s} {'KV/FP16':>8s}"]
    for r in rows:
        lines.append(f"{r['run']:16s} {r['tokens_per_s']:8.2f} {r['ratio_vs_fp16']:8.3f} {r['kv_ratio']:8.3f}")
    return {
        "context_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_s": pre.seconds,
        "results": rows,
        "table": "\n".join(lines),
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "provenance": provenance({"model": model_name, "dtype": dtype, "context": context, "new_tokens": new_tokens,
                                  "repeats": repeats, "runs": [(r.label, r.method, r.params) for r in runs]}),
        "created_unix": time.time(),
    }
