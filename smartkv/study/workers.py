"""Worker processes for a model stage's evaluation (params `workers`).

On a small CPU one process running torch with T threads leaves much of the machine idle: a
135M model's matrices are small, and the quantizer, the allocator and the cache bookkeeping
run on one thread anyway. N processes of T / N threads each, every one with its own copy of
the model, keep the cores busy. Measured on the study's 2-core machine (1k needle prompts,
FP16 + INT3 + SmartKV forked from one prefill): two processes of one thread did the work in
20.3 s that one process of two threads did in 31.2 s, 1.54x the throughput.

Work is handed out in chunks of a few samples, longest first (by prompt plus scored tokens),
from one queue: a worker that finishes takes the next chunk, so the workers end together.
Every sample is evaluated on its own (its own prefill and forks), so the results do not
depend on which worker took it; they depend on each worker's thread count, as any float
reduction does (README, "Determinism"). The caller orders the rows.
"""

from __future__ import annotations

import traceback
from typing import Callable

CHUNK = 4  # samples per piece of work: small enough to balance, large enough to amortise the hand-off


def chunks(groups: list[tuple], size: int = CHUNK) -> list[tuple[int, tuple]]:
    """(group index, (seed, samples, extra, runs)) pieces of at most `size` samples, costliest first
    (longest-processing-time first: the last pieces handed out are the short ones)."""
    pieces = []
    for gi, (seed, samples, extra, runs) in enumerate(groups):
        for i in range(0, len(samples), size):
            pieces.append((gi, (seed, samples[i:i + size], extra, runs)))

    def cost(piece) -> float:
        # prompt tokens, plus the scored continuation (~4 characters a token) at several times the
        # price: it is fed in chunks through every run's cache, which re-allocates as it goes
        _, (_, samples, _, runs) = piece
        return len(runs) * sum(int(s.context_length) + 8 * len(getattr(s, "target", "") or "") / 4 for s in samples)

    return sorted(pieces, key=cost, reverse=True)


def evaluate_piece(model, tokenizer, piece: tuple):
    """One piece of a SmartKV model stage: `smartkv.evaluate.evaluate` on (seed, samples, decay, runs)."""
    from smartkv.evaluate import evaluate

    seed, samples, decay, runs = piece
    return evaluate(model, tokenizer, samples, runs, seed=seed, decay=decay, progress=False)


def _worker(load: Callable, load_kwargs: dict, work: Callable, threads: int, tasks, results) -> None:
    import torch

    try:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model, tokenizer = load(**load_kwargs)
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the worker's traceback
        results.put(("error", None, traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            return
        key, piece = item
        try:
            df = work(model, tokenizer, piece)
        except BaseException:  # noqa: BLE001
            results.put(("error", key, traceback.format_exc()))
            return
        results.put(("done", key, df))


def run_pool(groups: list[tuple], n_workers: int, load: Callable, load_kwargs: dict, total_threads: int,
             on_done: Callable[[int], None] | None = None, work: Callable = evaluate_piece) -> list:
    """Evaluate `groups` ((seed, samples, extra, runs) each) over `n_workers` spawned processes;
    the frames in (group, chunk) order.

    `load(**load_kwargs)` -> (model, tokenizer) runs once in each worker and `work(model, tokenizer,
    piece)` -> DataFrame on each piece (top-level functions, so that they pickle; the default is
    SmartKV's `evaluate`). `on_done(n)` is called with the sample x run count of each finished piece."""
    import multiprocessing as mp

    pieces = chunks(groups)
    ctx = mp.get_context("spawn")  # a forked torch with live threads can deadlock
    tasks, results = ctx.Queue(), ctx.Queue()
    threads = max(1, total_threads // n_workers)
    procs = [ctx.Process(target=_worker, args=(load, load_kwargs, work, threads, tasks, results), daemon=True)
             for _ in range(min(n_workers, len(pieces)))]
    for i, (gi, work) in enumerate(pieces):
        tasks.put(((gi, i), work))
    for _ in procs:
        tasks.put(None)
    for p in procs:
        p.start()
    frames: dict[tuple, object] = {}
    try:
        while len(frames) < len(pieces):
            kind, key, payload = results.get()
            if kind == "error":
                raise RuntimeError(f"an evaluation worker failed:\n{payload}")
            frames[key] = payload
            if on_done is not None:
                _, (_, samples, _, runs) = pieces[key[1]]
                on_done(len(samples) * len(runs))
    finally:
        for p in procs:
            p.join(timeout=5 if len(frames) == len(pieces) else 0)
            if p.is_alive():
                p.terminate()
    return [frames[k] for k in sorted(frames)]


def effective_workers(requested: int, device: str) -> int:
    """Worker processes for `device`: one GPU is shared by one process (each worker would hold its
    own copy of the model and contend for the same device)."""
    return 1 if not device.startswith("cpu") else max(1, int(requested))


__all__ = ["CHUNK", "chunks", "evaluate_piece", "run_pool", "effective_workers"]
