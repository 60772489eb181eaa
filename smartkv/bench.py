"""Decode speed of each method against context length, relative to `fp16`, all in one process.

Method, per context length: one prefill of a `context`-token prompt (paid once: every run forks
it, see `smartkv.runner`); each run decodes `new_tokens` tokens (EOS suppressed so every run
decodes the same number). The C++ kernels are built and every run is warmed up before anything
is timed; then the runs are timed round-robin `repeats` times, so that a noisy neighbour hurts
all of them alike. Reported: the median tokens/s with its min, max and inter-quartile range,
and the ratio to fp16's median from the same run (plus the per-round ratios, each against the
fp16 run of the same round). Last, one extra decode of each SmartKV run with phase timers on
(`smartkv.phase_timer`) gives the share of a decode step spent in importance tracking,
re-allocation, window release and de-quantizing the history.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

from smartkv.runner import Prefill, RunSpec, decode, encode, fork, memory_of, prefill

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_RUNS = [
    RunSpec("fp16", "fp16"),
    RunSpec("uniform-4", "uniform", {"bits": 4}),
    RunSpec("kivi-4", "kivi", {"bits": 4}),
    RunSpec("kivi-2", "kivi", {"bits": 2}),
    RunSpec("smartkv-b0.35", "smartkv", {"budget": 0.35}, "smartkv"),
    RunSpec("smartkv-b0.25", "smartkv", {"budget": 0.25}, "smartkv"),
    RunSpec("hf_quanto-4", "hf_quanto", {"nbits": 4}, "peer"),
    RunSpec("hf_hqq-4", "hf_hqq", {"nbits": 4}, "peer"),
]
# decode steps of the warm-up before the first context: past one re-allocation (every 16 steps)
WARMUP_TOKENS = 17


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
        runs.append(RunSpec(label, method, params, "smartkv" if method == "smartkv" else "baseline"))
    if not any(r.method == "fp16" for r in runs):
        runs.insert(0, RunSpec("fp16", "fp16"))
    return runs


def bench_prompt(tokenizer, n_tokens: int) -> str:
    """The prompt every context is timed on: a needle prompt of `n_tokens` tokens (depth 0.5, seed 0)."""
    from smartkv.tasks import generate_task

    sample = generate_task("niah", tokenizer, n_per_cell=1, lengths=[n_tokens], depths=[0.5], seed=0)[0]
    return sample.prompt


def spread(values: list[float]) -> dict:
    """Median, min, max and quartiles of a few timings."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3}


def _phase_shares(model, pre, run: RunSpec, new_tokens: int) -> dict:
    from smartkv.phase_timer import PHASES, timed_phases

    cache, _ = fork(pre, run, model)
    with timed_phases() as phases:
        _, seconds = decode(model, pre, cache, new_tokens, min_new_tokens=new_tokens)
    out = {"decode_s": seconds}
    for name in PHASES:
        out[f"{name}_s"] = phases[name]
        out[f"{name}_share"] = phases[name] / seconds
        out[f"{name}_calls"] = phases[f"{name}_calls"]
    return out


def bench_context(model, tok, runs: list[RunSpec], context: int, new_tokens: int, repeats: int, warmup_tokens: int,
                  profile: bool, pre: Prefill | None = None) -> dict:
    """One context's timings; `pre`: a prefill of `bench_prompt(tok, context)` made by the caller
    (e.g. `smartkv.analysis.profile`, which measures its memory), else made here."""
    if pre is None:
        ids, mask = encode(tok, [bench_prompt(tok, context)], device=model.device)
        pre = prefill(model, ids, mask)
    ids = pre.input_ids
    timings: dict[str, list[float]] = {r.label: [] for r in runs}
    memory: dict[str, dict] = {}
    for rep in range(repeats + 1):  # repetition 0 is the warm-up
        for run in runs:
            cache, _ = fork(pre, run, model)
            n = warmup_tokens if rep == 0 else new_tokens
            new, seconds = decode(model, pre, cache, n, min_new_tokens=n)
            if rep:
                timings[run.label].append(new.shape[1] / seconds)
                memory[run.label] = memory_of(cache)
    base = timings["fp16"]
    base_median = statistics.median(base)
    rows = []
    for run in runs:
        tps = timings[run.label]
        rows.append({
            "run": run.label,
            "method": run.method,
            "params": run.params,
            "tokens_per_s": spread(tps),
            "tokens_per_s_all": tps,
            "ratio_vs_fp16": statistics.median(tps) / base_median,
            "ratio_vs_fp16_by_round": spread([t / b for t, b in zip(tps, base)]),
            "kv_ratio": memory[run.label]["ratio"],
            "kv_bytes": memory[run.label]["kv_bytes"],
        })
    phases = {}
    if profile:
        for run in runs:
            if run.method == "smartkv":
                phases[run.label] = _phase_shares(model, pre, run, new_tokens)
    return {"context": context, "context_tokens": int(ids.shape[1]), "prefill_s": pre.seconds, "results": rows,
            "phases": phases}


def format_table(result: dict) -> str:
    lines = [f"decode tokens/s, {result['new_tokens']} new tokens, median [min-max] of {result['repeats']} round-robin "
             f"repeats, ratio to fp16 of the same run (torch threads {result['machine']['threads']})"]
    for block in result["contexts"]:
        lines.append(f"\ncontext {block['context_tokens']} tokens (prefill {block['prefill_s']:.1f} s)")
        lines.append(f"{'run':16s} {'tok/s':>8s} {'min':>8s} {'max':>8s} {'vs fp16':>8s} {'KV/FP16':>8s}")
        for r in block["results"]:
            t = r["tokens_per_s"]
            lines.append(f"{r['run']:16s} {t['median']:8.2f} {t['min']:8.2f} {t['max']:8.2f} {r['ratio_vs_fp16']:8.3f} "
                         f"{r['kv_ratio']:8.3f}")
        for label, p in block["phases"].items():
            shares = ", ".join(f"{k[:-6]} {100 * v:.1f}%" for k, v in p.items() if k.endswith("_share"))
            lines.append(f"  {label} share of decode time: {shares}")
    return "\n".join(lines)


def run_bench(model_name: str, dtype: str, runs: list[RunSpec], contexts: list[int] | tuple[int, ...] = DEFAULT_CONTEXTS,
              new_tokens: int = 32, repeats: int = 3, threads: int | None = None, profile: bool = True,
              device: str = "cpu") -> dict:
    from smartkv import kernels, triton_kernels
    from smartkv.io import provenance
    from smartkv.models import load_model

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_model(model_name, dtype=dtype, device=device)
    if model.device.type == "cpu":
        kernels.warm_up()  # build or load the C++ kernels before anything is timed
        path = "pytorch path (SMARTKV_NO_KERNEL)" if kernels.disabled() else "c++"
    else:  # CUDA: Triton compiles on the first call, inside the warm-up repetition
        path = "triton" if triton_kernels.available() else "pytorch path (no triton or SMARTKV_NO_KERNEL)"
    blocks = []
    for i, context in enumerate(contexts):
        # the first context warms every run past a re-allocation; later ones only need new shapes
        warm = min(new_tokens, WARMUP_TOKENS) if i == 0 else 2
        start = time.perf_counter()
        blocks.append(bench_context(model, tok, runs, context, new_tokens, repeats, warm, profile))
        print(f"[bench] context {context}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    result = {
        "new_tokens": new_tokens,
        "repeats": repeats,
        "contexts": blocks,
        "kernels": path,
        "device": str(model.device),
        "gpu": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None,
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "processor": platform.processor(), "loadavg_at_end": list(os.getloadavg())},
        "provenance": provenance({"model": model_name, "dtype": dtype, "device": device, "contexts": list(contexts),
                                  "new_tokens": new_tokens, "repeats": repeats,
                                  "runs": [(r.label, r.method, r.params) for r in runs]}),
        "created_unix": time.time(),
    }
    result["table"] = format_table(result)
    return result
