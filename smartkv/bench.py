"""Decode speed of each method against context length, relative to `fp16`, all in one process.

Method, per context length: one prefill of a `context`-token prompt (paid once: every run forks
it, see `smartkv.runner`); each run decodes `new_tokens` tokens (EOS suppressed so every run
decodes the same number). The C++ kernels are built and every run is warmed up before anything
is timed; then the runs are timed round-robin `repeats` times, so that a noisy neighbour hurts
all of them alike.

A timed decode is split at its first step (`StepClock`). The first step feeds the prompt's last
token through the method's cache, and that is where a compressing cache quantizes (and, for
SmartKV, allocates) the whole prompt, once per request: it is reported as `first_step_ms`. The
steps after it are the steady decode, `tokens_per_s`: what every further token costs. Both are
reported, and so is the rate over all `new_tokens` with the first step included
(`tokens_per_s_with_first`): for a short generation the one-off compression is a real share of
the time. The default `new_tokens` (33) times 32 steady steps, two of SmartKV's re-allocations
at `realloc_freq` 16: the steady rate pays them at the rate a long generation does.

Reported per run: the median, min, max and inter-quartile range of each measure, and the
ratios to fp16's medians from the same run (plus the per-round ratios, each against the fp16
run of the same round). Last, one extra decode of each SmartKV run with phase timers on
(`smartkv.phase_timer`) gives the share of a steady decode step spent in importance tracking,
re-allocation, window release and de-quantizing the history, and the same phases' seconds in
the first step.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

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
# timed tokens per run: a first step, then 32 steady steps (two re-allocations at realloc_freq 16)
DEFAULT_NEW_TOKENS = 33


class StepClock(LogitsProcessor):
    """Stamps the time each decode step's logits are ready (and leaves the scores as they are), so that
    one timed `generate` splits into its first step and the steady steps after it. `on_first`, if set,
    is called once, right after the first step (the phase timers snapshot their totals there)."""

    def __init__(self, on_first=None) -> None:
        self.stamps: list[float] = []
        self.on_first = on_first

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1 and self.on_first is not None:
            self.on_first()
        return scores


@dataclass(frozen=True)
class DecodeTiming:
    """One timed decode: `tokens` new tokens in `seconds`, the first step `first_s` of them."""

    tokens: int
    seconds: float
    first_s: float
    steady_s: float  # from the first step's logits to the last step's: tokens - 1 steps

    @property
    def steady_tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.steady_s if self.tokens > 1 and self.steady_s > 0 else float("nan")

    @property
    def tokens_per_s_with_first(self) -> float:
        return self.tokens / self.seconds


def timed_decode(model, pre: Prefill, cache, new_tokens: int, on_first=None) -> DecodeTiming:
    """Decode exactly `new_tokens` tokens with `cache`, timing the first step apart from the rest."""
    clock = StepClock(on_first)
    start = time.perf_counter()
    new, _ = decode(model, pre, cache, new_tokens, min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]))
    seconds = time.perf_counter() - start  # on the clock's own start, so that first + steady <= seconds
    return DecodeTiming(int(new.shape[1]), seconds, clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0])


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
    """Seconds and calls of each cache phase in one decode, split like the timings: `<phase>_share` is
    the phase's share of the steady steps' time, `first_<phase>_s` its seconds in the first step."""
    from smartkv.phase_timer import PHASES, timed_phases

    cache, _ = fork(pre, run, model)
    with timed_phases() as phases:
        first: dict = {}
        timing = timed_decode(model, pre, cache, new_tokens, on_first=lambda: first.update(phases))
    out = {"decode_s": timing.seconds, "first_step_s": timing.first_s, "steady_s": timing.steady_s,
           "steady_steps": timing.tokens - 1}
    for name in PHASES:
        steady = phases[name] - first[name]
        out[f"{name}_s"] = steady
        out[f"{name}_share"] = steady / timing.steady_s if timing.steady_s > 0 else float("nan")
        out[f"{name}_calls"] = phases[f"{name}_calls"] - first[f"{name}_calls"]
        out[f"first_{name}_s"] = first[name]
    return out


def bench_context(model, tok, runs: list[RunSpec], context: int, new_tokens: int, repeats: int, warmup_tokens: int,
                  profile: bool, pre: Prefill | None = None) -> dict:
    """One context's timings; `pre`: a prefill of `bench_prompt(tok, context)` made by the caller
    (e.g. `smartkv.analysis.profile`, which measures its memory), else made here."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (a first step and a steady one), got {new_tokens}")
    if pre is None:
        ids, mask = encode(tok, [bench_prompt(tok, context)], device=model.device)
        pre = prefill(model, ids, mask)
    ids = pre.input_ids
    timings: dict[str, list[DecodeTiming]] = {r.label: [] for r in runs}
    memory: dict[str, dict] = {}
    for rep in range(repeats + 1):  # repetition 0 is the warm-up
        for run in runs:
            cache, _ = fork(pre, run, model)
            timing = timed_decode(model, pre, cache, max(2, warmup_tokens) if rep == 0 else new_tokens)
            if rep:
                timings[run.label].append(timing)
                memory[run.label] = memory_of(cache)
    base = timings["fp16"]
    base_steady = statistics.median(t.steady_tokens_per_s for t in base)
    base_with_first = statistics.median(t.tokens_per_s_with_first for t in base)
    rows = []
    for run in runs:
        ts = timings[run.label]
        steady = [t.steady_tokens_per_s for t in ts]
        with_first = [t.tokens_per_s_with_first for t in ts]
        rows.append({
            "run": run.label,
            "method": run.method,
            "params": run.params,
            # the steady decode: every step after the first
            "tokens_per_s": spread(steady),
            "tokens_per_s_all": steady,
            "ratio_vs_fp16": statistics.median(steady) / base_steady,
            "ratio_vs_fp16_by_round": spread([t.steady_tokens_per_s / b.steady_tokens_per_s for t, b in zip(ts, base)]),
            # the first step: the prompt's last token through the cache, with its one-off compression
            "first_step_ms": spread([1000.0 * t.first_s for t in ts]),
            "first_step_ms_all": [1000.0 * t.first_s for t in ts],
            # all new tokens, the first step included
            "tokens_per_s_with_first": spread(with_first),
            "ratio_vs_fp16_with_first": statistics.median(with_first) / base_with_first,
            "kv_ratio": memory[run.label]["ratio"],
            "kv_bytes": memory[run.label]["kv_bytes"],
        })
    phases = {}
    if profile:
        for run in runs:
            if run.method == "smartkv":
                phases[run.label] = _phase_shares(model, pre, run, new_tokens)
    return {"context": context, "context_tokens": int(ids.shape[1]), "prefill_s": pre.seconds, "new_tokens": new_tokens,
            "results": rows, "phases": phases}


def format_table(result: dict) -> str:
    lines = [f"decode tokens/s after the first step, and the first step's ms (the prompt's last token through the "
             f"cache, with its one-off compression), {result['new_tokens']} new tokens, median [min-max] of "
             f"{result['repeats']} round-robin repeats, ratios to fp16 of the same run "
             f"(torch threads {result['machine']['threads']})"]
    for block in result["contexts"]:
        lines.append(f"\ncontext {block['context_tokens']} tokens (prefill {block['prefill_s']:.1f} s)")
        lines.append(f"{'run':16s} {'tok/s':>8s} {'min':>8s} {'max':>8s} {'vs fp16':>8s} {'1st ms':>8s} "
                     f"{'w/ 1st':>8s} {'KV/FP16':>8s}")
        for r in block["results"]:
            t = r["tokens_per_s"]
            lines.append(f"{r['run']:16s} {t['median']:8.2f} {t['min']:8.2f} {t['max']:8.2f} {r['ratio_vs_fp16']:8.3f} "
                         f"{r['first_step_ms']['median']:8.1f} {r['ratio_vs_fp16_with_first']:8.3f} {r['kv_ratio']:8.3f}")
        for label, p in block["phases"].items():
            shares = ", ".join(f"{k[:-6]} {100 * v:.1f}%" for k, v in p.items() if k.endswith("_share"))
            firsts = ", ".join(f"{k[6:-2]} {1000 * v:.0f} ms" for k, v in p.items()
                               if k.startswith("first_") and k != "first_step_s" and v > 0)
            lines.append(f"  {label} share of a steady decode step: {shares}")
            lines.append(f"  {label} first step {1000 * p['first_step_s']:.0f} ms, of which: {firsts or 'no phase'}")
    lines.append("\nvs fp16: steady tokens/s over fp16's; w/ 1st: the same over all new tokens, the first step included")
    return "\n".join(lines)


def run_bench(model_name: str, dtype: str, runs: list[RunSpec], contexts: list[int] | tuple[int, ...] = DEFAULT_CONTEXTS,
              new_tokens: int = DEFAULT_NEW_TOKENS, repeats: int = 3, threads: int | None = None, profile: bool = True,
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
        "provenance": provenance(revision=True, config={"model": model_name, "dtype": dtype, "device": device, "contexts": list(contexts),
                                  "new_tokens": new_tokens, "repeats": repeats,
                                  "runs": [(r.label, r.method, r.params) for r in runs]}),
        "created_unix": time.time(),
    }
    result["table"] = format_table(result)
    return result
