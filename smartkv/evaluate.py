"""Evaluate methods on task samples: one prefill per sample, one fork per method, one row per (sample, run).

Rows follow the per-sample results schema that `smartkv.stats` reads: the run and its
config, the sample, the prediction and its score (or the continuation's NLL for
perplexity samples), the measured KV bytes against FP16, and timings.
"""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import torch
from tqdm.auto import tqdm

from smartkv import scoring
from smartkv.allocate import BudgetError
from smartkv.methods.registry import config_dict
from smartkv.runner import RunSpec, continuation_nll, decode, encode, fork, memory_of, oracle_tracker, prefill
from smartkv.tasks.sample import Sample

log = logging.getLogger(__name__)


def _run_fields(run: RunSpec) -> dict:
    cfg = run.config()
    d = config_dict(cfg)
    return {
        "run": run.label,
        "method": run.method,
        "family": run.family,
        "budget": float(d["budget"]) if "budget" in d else math.nan,
        "bits": float(d["bits"]) if isinstance(d.get("bits"), int) else (float(d["nbits"]) if "nbits" in d else math.nan),
        "config": json.dumps(d, sort_keys=True, default=list),
    }


def _sample_fields(sample: Sample, seed: int, n_tokens: int) -> dict:
    return {
        "task": sample.task,
        "sample_id": sample.sample_id,
        "seed": seed,
        "context_length": sample.context_length,
        "n_tokens": n_tokens,
        "depth": math.nan if sample.depth is None else float(sample.depth),
        "answers": json.dumps(sample.answers),
        "metric": sample.metric,
    }


@torch.no_grad()
def evaluate(model, tokenizer, samples: list[Sample], runs: list[RunSpec], *, seed: int = 0,
             max_new_tokens: int = 16, decay: float = 0.9, progress: bool = True, desc: str = "evaluate") -> pd.DataFrame:
    """Every run on every sample; returns the per-sample results frame."""
    for run in runs:  # fail on a bad config before any model work
        run.config()
    rows = []
    bar = tqdm(total=len(samples) * len(runs), desc=desc, disable=not progress, unit="run")
    for sample in samples:
        ids, mask = encode(tokenizer, [sample.prompt], device=model.device)
        pre = prefill(model, ids, mask, decay)
        base = _sample_fields(sample, seed, ids.shape[1])
        cont = None
        if sample.metric == "perplexity":
            cont = tokenizer(sample.meta["continuation"], add_special_tokens=False,
                             return_tensors="pt")["input_ids"].to(model.device)
        limit = int(sample.meta.get("max_new_tokens", max_new_tokens))
        oracle = oracle_tracker(model, pre, limit) if any(r.oracle for r in runs) and cont is None else None
        for run in runs:
            row = {**_run_fields(run), **base, "prefill_s": pre.seconds, "error": ""}
            try:
                cache, fork_s = fork(pre, run, model)
                if run.oracle and oracle is not None and getattr(cache, "tracker", None) is not None:
                    cache.tracker = oracle.copy(keep=cache.tracker.keep, dtype=cache.tracker.dtype,
                                                 per_head=cache.tracker.per_head)
                if cont is not None:
                    nll, dec_s = continuation_nll(model, pre, cache, cont)
                    row.update(prediction="", score=math.nan, nll=nll, new_tokens=int(cont.shape[1]))
                else:
                    new, dec_s = decode(model, pre, cache, limit)
                    pred = tokenizer.decode(new[0], skip_special_tokens=True)
                    row.update(prediction=pred, nll=math.nan, new_tokens=int(new.shape[1]),
                               score=scoring.score(sample.metric, pred, sample.answers, sample.meta))
                mem = memory_of(cache)
                row.update(kv_bytes=int(mem["kv_bytes"]), fp16_kv_bytes=int(mem["fp16_kv_bytes"]),
                           kv_ratio=float(mem["ratio"]), mean_bits=float(mem["mean_bits"]),
                           tracker_bytes=int(mem["tracker_bytes"]), fork_s=fork_s, decode_s=dec_s,
                           tokens_per_s=row["new_tokens"] / dec_s if dec_s > 0 else math.nan)
            except BudgetError as err:  # a budget under this context's floor: recorded, not hidden
                log.warning("%s on %s: %s", run.label, sample.sample_id, err)
                row.update(prediction="", score=math.nan, nll=math.nan, new_tokens=0, kv_bytes=0, fp16_kv_bytes=0,
                           kv_ratio=math.nan, mean_bits=math.nan, tracker_bytes=0, fork_s=math.nan,
                           decode_s=math.nan, tokens_per_s=math.nan, error=str(err))
            rows.append(row)
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


@torch.no_grad()
def allocation_snapshot(model, tokenizer, sample: Sample, run: RunSpec, max_new_tokens: int = 8,
                        decay: float = 0.9) -> dict:
    """The bits every prompt token holds in every layer after decoding, for the allocation-map figure.

    Returns {"bits": float [layers, tokens] (mean over heads and K/V; 16 = full precision),
    "tokens": token strings, "needle": (first, last) token span of the needle or None, "prediction"}.
    """
    ids, mask = encode(tokenizer, [sample.prompt], device=model.device)
    pre = prefill(model, ids, mask, decay)
    cache, _ = fork(pre, run, model)
    new, _ = decode(model, pre, cache, max_new_tokens)
    n = ids.shape[1]
    bits = torch.stack([layer.bits_map()[0, :, :n].mean(dim=(0, 2)) for layer in cache.layers])
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    needle = None
    span = sample.meta.get("needle_char_span")
    if span:
        enc = tokenizer(sample.prompt, return_offsets_mapping=True, add_special_tokens=True)
        offs = enc["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offs) if b > span[0] and a < span[1]]
        if inside:
            needle = (inside[0], inside[-1])
    return {"bits": bits.numpy(), "tokens": tokens, "needle": needle,
            "prediction": tokenizer.decode(new[0], skip_special_tokens=True)}
