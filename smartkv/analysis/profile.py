"""Where decode time and memory go, per method and context length (issue 9, the `profile` stage).

Per context, one prompt (the bench's, `smartkv.bench.bench_prompt`) is prefilled once in full
precision; every method forks that prefill, as in `smartkv.bench`, so all of them decode the
same tokens in one process. Three measurements:

- **Time**: `smartkv.bench.bench_context`: warm-up, then the runs timed round-robin `repeats`
  times; per run the median, min, max and quartiles of the steady decode time per token (every
  step after the first) and of the first step (the prompt's last token through the cache, where
  a compressing cache quantizes the prompt once), and the ratios to fp16's medians from the same
  run, steady and with the first step included. Its phase timers (`smartkv.phase_timer`) give
  the share of a steady SmartKV decode step spent in importance tracking, re-allocation, window
  release and de-quantization (whatever phases `PHASES` names today), and each phase's time in
  the first step.
- **Memory**: what torch actually allocates, not only what the cache reports. On CUDA,
  `torch.cuda.max_memory_allocated` above the level at the start. On CPU torch keeps no
  allocator statistics, and `tracemalloc` sees none of torch's buffers (they are not Python
  allocations), so the CPU allocator's own events are read from `torch.profiler` with
  `profile_memory=True`: every allocation and free of a tensor, in time order; their running sum
  is the memory held above the start, and its maximum the peak. Measured per method over the
  fork (the cache is built from copies of the prefilled tensors, one layer at a time, as a
  prefill would hand them over: `fork(copy=True)`) and the decode: so the peak holds the cache
  and every decode temporary (de-quantized history, attention, activations), and not the
  weights, the prompt or the shared prefill, which every method pays alike. The prefill's own
  peak (full-precision attention over the prompt, the same for every method since each one
  attends at full precision while it prefills) is measured once per context. Not seen on either
  device: buffers a library allocates outside torch's allocator (oneDNN scratch on CPU).
- **Operators**: `torch.profiler`'s operators by self CPU time over one decode of the fp16 run
  and one of the headline SmartKV run at one context, top k each. The C++ kernels are pybind
  functions, not ATen ops, so the cache's phases are marked as ranges
  (`smartkv.phase_timer.labelled_phases`): a kernel's time is its range's self time. What no
  operator or range covers (Python, pybind calls outside the phases) is reported apart as
  `unattributed`, so the table never claims more than it saw.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from smartkv.bench import WARMUP_TOKENS, bench_context, bench_prompt, spread
from smartkv.runner import RunSpec, decode, encode, fork, memory_of, prefill

MIB = 2 ** 20
TOP_OPS = 10
PHASE_PREFIX = "smartkv::"  # names of the cache phases' ranges in the operator table


@dataclass(frozen=True)
class Allocation:
    """Memory allocated while a block ran, above the level at its start."""

    peak_bytes: int  # the most held at any moment
    end_bytes: int   # still held when it returned (what it keeps, e.g. a cache)
    source: str      # how it was measured


def cpu_allocation_trace(prof) -> list[tuple[float, int]]:
    """(time, bytes) of every CPU allocation (+) and free (-) a `torch.profiler` run with
    `profile_memory=True` recorded, in time order. Read from the exported Chrome trace: the
    public format (frees of memory allocated before profiling began are not recorded)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    out = [(float(e["ts"]), int(e["args"]["Bytes"])) for e in events
           if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    out.sort(key=lambda x: x[0])
    return out


def peak_of(trace: list[tuple[float, int]]) -> tuple[int, int]:
    """(peak, end) of the running sum of allocation events, from 0 at the start."""
    held = peak = 0
    for _, nbytes in trace:
        held += nbytes
        peak = max(peak, held)
    return peak, held


def measure_allocation(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Allocation]:
    """Run `fn()`; return its result and what torch allocated meanwhile (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, Allocation(torch.cuda.max_memory_allocated(device) - base,
                               torch.cuda.memory_allocated(device) - base, "torch.cuda.max_memory_allocated")
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu or cuda, not {device.type}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    peak, end = peak_of(cpu_allocation_trace(prof))
    return out, Allocation(peak, end, "torch.profiler profile_memory (CPU allocator events)")


def run_memory(model, pre, run: RunSpec, new_tokens: int) -> dict:
    """Peak bytes allocated over the fork and a decode of `new_tokens`, next to the cache's own bytes."""

    def fork_and_decode():
        cache, _ = fork(pre, run, model, copy=True)
        decode(model, pre, cache, new_tokens, min_new_tokens=new_tokens)
        return memory_of(cache)

    mem, alloc = measure_allocation(fork_and_decode, model.device)
    return {"peak_allocated_bytes": alloc.peak_bytes, "held_at_end_bytes": alloc.end_bytes,
            "cache_bytes": int(mem["kv_bytes"]), "fp16_cache_bytes": int(mem["fp16_kv_bytes"]),
            "cache_ratio": float(mem["ratio"]), "peak_over_cache": alloc.peak_bytes / max(int(mem["kv_bytes"]), 1),
            "source": alloc.source}


def top_ops(model, pre, run: RunSpec, new_tokens: int, k: int = TOP_OPS) -> dict:
    """The `k` operators with the most self CPU time over one decode of `new_tokens` with `run`."""
    from torch.profiler import ProfilerActivity, profile

    from smartkv.phase_timer import labelled_phases

    cache, _ = fork(pre, run, model)
    with labelled_phases(prefix=PHASE_PREFIX), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        decode(model, pre, cache, new_tokens, min_new_tokens=new_tokens)
        wall_us = (time.perf_counter() - start) * 1e6
    rows = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()]
    total_self = sum(r[2] for r in rows)
    rows.sort(key=lambda r: -r[2])
    per_token = 1000.0 * new_tokens  # µs -> ms per generated token
    return {
        "run": run.label,
        "new_tokens": new_tokens,
        "wall_ms_per_token": wall_us / per_token,
        "self_cpu_ms_per_token": total_self / per_token,
        # time inside the profiled decode that no operator or range covers (Python, pybind)
        "unattributed_ms_per_token": max(wall_us - total_self, 0.0) / per_token,
        # self time of each cache phase's range (the C++ kernels' time is here), top 10 or not
        "phase_self_ms_per_token": {name[len(PHASE_PREFIX):]: us / per_token for name, _, us in rows
                                    if name.startswith(PHASE_PREFIX)},
        "ops": [{"op": name, "calls": int(calls), "self_cpu_ms_per_token": us / per_token,
                 "share_of_wall": us / wall_us} for name, calls, us in rows[:k]],
    }


def latency_rows(block: dict) -> list[dict]:
    """Steady decode ms per token and first-step ms (median, min, max, quartiles) per run of one `bench_context` block."""
    rows = []
    for r in block["results"]:
        ms = [1000.0 / t for t in r["tokens_per_s_all"]]
        rows.append({"run": r["run"], "method": r["method"], "params": r["params"], "context": block["context"],
                     "context_tokens": block["context_tokens"], "ms_per_token": spread(ms), "ms_per_token_all": ms,
                     "ratio_vs_fp16": r["ratio_vs_fp16"], "ratio_vs_fp16_by_round": r["ratio_vs_fp16_by_round"],
                     "first_step_ms": r["first_step_ms"], "first_step_ms_all": r["first_step_ms_all"],
                     "ratio_vs_fp16_with_first": r["ratio_vs_fp16_with_first"]})
    return rows


def profile_context(model, ids: torch.Tensor, mask: torch.Tensor, runs: list[RunSpec], context: int, new_tokens: int,
                    repeats: int, warmup_tokens: int, ops_runs: tuple[str, ...] = ()) -> dict:
    """Time, memory, phase shares and (for `ops_runs`) top operators of every run on one prompt
    (`ids`, `mask`: [1, context] tokens; `context` is the length asked for, kept as its label)."""
    pre, prefill_alloc = measure_allocation(lambda: prefill(model, ids, mask), model.device)
    block = bench_context(model, None, runs, context, new_tokens, repeats, warmup_tokens, profile=True, pre=pre)
    memory = {run.label: run_memory(model, pre, run, new_tokens) for run in runs}
    ops = {run.label: top_ops(model, pre, run, new_tokens) for run in runs if run.label in ops_runs}
    return {"context": context, "context_tokens": block["context_tokens"], "prefill_s": block["prefill_s"],
            "prefill_peak_allocated_bytes": prefill_alloc.peak_bytes, "latency": latency_rows(block),
            "memory": memory, "phases": block["phases"], "top_ops": ops}


def profile_methods(model, tok, runs: list[RunSpec], contexts: list[int], new_tokens: int, repeats: int,
                    ops_context: int | None, ops_runs: tuple[str, ...], log: Callable[[str], None] = print) -> dict:
    """Every context in turn (the first one warms every run past a re-allocation, as the bench does)."""
    from smartkv import kernels

    if "fp16" not in {r.method for r in runs}:
        raise ValueError("the profile needs an fp16 run: every ratio is against it")
    if model.device.type == "cpu":
        kernels.warm_up()  # build or load the C++ kernels before anything is timed
    blocks = []
    for i, context in enumerate(contexts):
        start = time.perf_counter()
        warm = min(new_tokens, WARMUP_TOKENS) if i == 0 else 2
        ids, mask = encode(tok, [bench_prompt(tok, context)], device=model.device)
        blocks.append(profile_context(model, ids, mask, runs, context, new_tokens, repeats, warm,
                                      ops_runs if context == ops_context else ()))
        log(f"context {context}: {time.perf_counter() - start:.0f} s")
    return {"new_tokens": new_tokens, "repeats": repeats, "contexts": blocks,
            "kernels": "pytorch path (SMARTKV_NO_KERNEL)" if kernels.disabled() else "c++",
            "summary": summarize(blocks)}


def summarize(blocks: list[dict]) -> dict:
    """Per run, across contexts: steady decode ms/token and × fp16, first-step ms and × fp16 with it, peak and
    cache MiB, SmartKV's phase shares."""
    out: dict[str, dict] = {}
    for b in blocks:
        for row in b["latency"]:
            run = out.setdefault(row["run"], {"method": row["method"], "contexts": {}})
            mem = b["memory"][row["run"]]
            entry = {"ms_per_token": row["ms_per_token"]["median"], "ratio_vs_fp16": row["ratio_vs_fp16"],
                     "first_step_ms": row["first_step_ms"]["median"],
                     "ratio_vs_fp16_with_first": row["ratio_vs_fp16_with_first"],
                     "peak_allocated_mib": mem["peak_allocated_bytes"] / MIB, "cache_mib": mem["cache_bytes"] / MIB}
            phases = b["phases"].get(row["run"])
            if phases:
                entry["phase_shares"] = {k[:-len("_share")]: v for k, v in phases.items() if k.endswith("_share")}
            run["contexts"][str(b["context"])] = entry
    return out


def plot_rows(result: dict) -> list[dict]:
    """One flat row per (context, run): what `dvc plots` and the figures read."""
    rows = []
    for b in result["contexts"]:
        for r in b["latency"]:
            m = b["memory"][r["run"]]
            s = r["ms_per_token"]
            rows.append({"run": r["run"], "method": r["method"], "context": b["context"], "ms_per_token": s["median"],
                         "ms_min": s["min"], "ms_max": s["max"], "ms_q1": s["q1"], "ms_q3": s["q3"],
                         "ratio_vs_fp16": r["ratio_vs_fp16"], "first_step_ms": r["first_step_ms"]["median"],
                         "ratio_vs_fp16_with_first": r["ratio_vs_fp16_with_first"],
                         "peak_allocated_mib": m["peak_allocated_bytes"] / MIB,
                         "cache_mib": m["cache_bytes"] / MIB, "n_repeats": len(r["ms_per_token_all"]),
                         "new_tokens": result["new_tokens"]})
    return rows
