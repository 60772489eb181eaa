"""Evaluate methods on task samples: one prefill per sample, one fork per method, one row per (sample, run).

Rows follow the per-sample results schema that `smartkv.stats` reads: the run and its
config, the sample (with its `cluster`), the prediction and its score (or the
continuation's NLL for perplexity samples), the measured KV bytes against FP16, and timings.

A sample with a `target` is scored teacher-forced (`smartkv.answer_scores`): the gold answer
goes through each method's cache in one forward, which gives `forced_exact`,
`answer_logprob` and `kl_fp16` against FP16 logits computed once per sample. With
`prediction="forced"` (default) that is all: `score` is `forced_exact` and the prediction is
the argmax text under teacher forcing. With `prediction="generate"` each method also
decodes greedily from a second fork, capped at the answer's length + `ANSWER_SLACK` tokens,
and `score` is the task's scorer on that text. Samples without a target (LongBench, task
sets prepared before targets existed) always generate.
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
from smartkv.answer_scores import answer_measures, target_ids
from smartkv.cache.base import MEMORY_PARTS
from smartkv.methods.registry import config_dict
from smartkv.last_query import attend_last_query
from smartkv.runner import (RunSpec, decode, encode, forced_logits, fork, memory_of, oracle_tracker, prefill,
                            tracked_stats)
from smartkv.tasks.sample import Sample
from smartkv.token_spans import char_span_tokens

log = logging.getLogger(__name__)

PREDICTION_MODES = ("forced", "generate")
ANSWER_SLACK = 4  # generated tokens allowed past the gold answer's length
FP16_REFERENCE = RunSpec("fp16-reference", "fp16")


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
        "cluster": sample.cluster,
        "seed": seed,
        "context_length": sample.context_length,
        "n_tokens": n_tokens,
        "depth": math.nan if sample.depth is None else float(sample.depth),
        "answers": json.dumps(sample.answers),
        "metric": sample.metric,
    }


_EMPTY = {"prediction": "", "score": math.nan, "nll": math.nan, "forced_exact": math.nan,
          "answer_logprob": math.nan, "kl_fp16": math.nan, "answer_tokens": 0, "new_tokens": 0,
          "kv_bytes": 0, "fp16_kv_bytes": 0, "kv_ratio": math.nan, "mean_bits": math.nan, "tracker_bytes": 0,
          "fork_s": math.nan, "forced_s": math.nan, "decode_s": math.nan, "tokens_per_s": math.nan,
          "reallocations": 0, "needle_bits": math.nan, "haystack_bits": math.nan}


def _target(tokenizer, sample: Sample, device) -> torch.Tensor | None:
    text = sample.target or (sample.meta.get("continuation", "") if sample.metric == "perplexity" else "")
    if not text:
        return None
    return torch.tensor([target_ids(tokenizer, sample.prompt, text)], device=device)


def _one_run(model, tokenizer, sample: Sample, pre, run: RunSpec, target, ref_logprobs, oracle,
             mode: str, limit: int) -> dict:
    row: dict = {}

    def new_cache():
        cache, seconds = fork(pre, run, model)
        if run.oracle and oracle is not None and getattr(cache, "tracker", None) is not None:
            cache.tracker = oracle.copy(keep=cache.tracker.keep, dtype=cache.tracker.dtype,
                                        per_head=cache.tracker.per_head)
        row["fork_s"] = row.get("fork_s", 0.0) + seconds
        return cache

    cache = new_cache()
    if target is not None:
        logits, row["forced_s"] = forced_logits(model, pre, cache, target)
        m = answer_measures(logits, target[0], ref_logprobs)
        row.update(forced_exact=m["forced_exact"], answer_logprob=m["answer_logprob"], kl_fp16=m["kl_fp16"],
                   answer_tokens=int(target.shape[1]))
        if sample.metric == "perplexity":
            row.update(nll=-m["answer_logprob"], prediction="", score=math.nan)
        elif mode == "forced":
            row.update(prediction=tokenizer.decode(m["argmax"], skip_special_tokens=True), score=m["forced_exact"])
        # tokens/s of the forwards that read the cache: the teacher-forced answer (forced mode);
        # generate mode overwrites it with greedy decoding's. Decode speed proper: `smartkv bench`.
        row["tokens_per_s"] = target.shape[1] / row["forced_s"] if row["forced_s"] > 0 else math.nan
    if "prediction" not in row:  # generate: from a fresh fork when the first one took the target
        mem_cache = cache
        if target is not None:
            cache = new_cache()
        new, row["decode_s"] = decode(model, pre, cache, limit)
        pred = tokenizer.decode(new[0], skip_special_tokens=True)
        row.update(prediction=pred, new_tokens=int(new.shape[1]),
                   score=scoring.score(sample.metric, pred, sample.answers, sample.meta),
                   tokens_per_s=new.shape[1] / row["decode_s"] if row["decode_s"] > 0 else math.nan)
        cache = mem_cache
    mem = memory_of(cache)
    row.update(kv_bytes=int(mem["kv_bytes"]), fp16_kv_bytes=int(mem["fp16_kv_bytes"]), kv_ratio=float(mem["ratio"]),
               mean_bits=float(mem["mean_bits"]), tracker_bytes=int(mem["tracker_bytes"]),
               reallocations=int(mem.get("reallocations", 0)))
    row.update(breakdown_columns(mem.get("breakdown", {})))
    row.update(needle_bits(tokenizer, sample, cache, int(pre.input_ids.shape[1])))
    return row


def breakdown_columns(breakdown: dict[str, int]) -> dict[str, int]:
    """`kv_<part>_bytes` for every part of `MEMORY_PARTS` (0 where the cache holds none): the
    results' itemized memory, which adds up to `kv_bytes` (the memory-breakdown figure)."""
    return {f"kv_{part}_bytes": int(breakdown.get(part, 0)) for part in MEMORY_PARTS}


def needle_token_span(tokenizer, sample: Sample) -> tuple[int, int] | None:
    """First and last prompt token (inclusive) that overlap the needle's characters, or None."""
    span = sample.meta.get("needle_char_span")
    if not span:
        return None
    tokens = char_span_tokens(tokenizer, sample.prompt, span)  # slow tokenizers too (no offsets there)
    return (tokens[0], tokens[1] - 1) if tokens else None


def needle_bits(tokenizer, sample: Sample, cache, n_prompt: int) -> dict:
    """Mean bits the needle's tokens hold (over layers, heads, K and V) against the median of the
    other prompt tokens: does the allocation find what the question will read? NaN where the
    sample has no needle or the cache holds no per-token widths."""
    span = needle_token_span(tokenizer, sample)
    layers = getattr(cache, "layers", [])
    if span is None or not layers or not all(hasattr(layer, "bits_map") for layer in layers):
        return {"needle_bits": math.nan, "haystack_bits": math.nan}
    per_token = torch.stack([layer.bits_map()[0, :, :n_prompt].mean(dim=(0, 2)) for layer in layers]).mean(0)
    inside = torch.zeros(n_prompt, dtype=torch.bool)
    inside[span[0] : span[1] + 1] = True
    return {"needle_bits": float(per_token[inside].mean()), "haystack_bits": float(per_token[~inside].median())}


@torch.no_grad()
def evaluate(model, tokenizer, samples: list[Sample], runs: list[RunSpec], *, seed: int = 0,
             max_new_tokens: int = 16, decay: float = 0.9, progress: bool = True, desc: str = "evaluate",
             prediction: str = "forced") -> pd.DataFrame:
    """Every run on every sample; returns the per-sample results frame."""
    if prediction not in PREDICTION_MODES:
        raise ValueError(f"prediction={prediction!r}; allowed: {', '.join(PREDICTION_MODES)}")
    for run in runs:  # fail on a bad config before any model work
        run.config()
    keep = tracked_stats(runs)
    track = bool(keep)
    windows = {getattr(r.config(), "obs_window", None) for r in runs} - {None}
    if len(windows) > 1:
        raise ValueError(f"runs that share one prefill must share obs_window; got {sorted(windows)}")
    obs_window = windows.pop() if windows else 64
    rows = []
    bar = tqdm(total=len(samples) * len(runs), desc=desc, disable=not progress, unit="run")
    for sample in samples:
        ids, mask = encode(tokenizer, [sample.prompt], device=model.device)
        pre = prefill(model, ids, mask, decay, obs_window, track=track, keep=keep)
        base = _sample_fields(sample, seed, ids.shape[1])
        target = _target(tokenizer, sample, model.device)
        ref_logprobs, ref_s = None, 0.0
        if target is not None:  # FP16's answer distribution, once per sample for every run
            ref_cache, _ = fork(pre, FP16_REFERENCE, model)
            ref_logits, ref_s = forced_logits(model, pre, ref_cache, target)
            ref_logprobs = torch.log_softmax(ref_logits, dim=-1)
            del ref_cache, ref_logits
        limit = int(sample.meta.get("max_new_tokens", max_new_tokens))
        if target is not None:
            limit = min(limit, int(target.shape[1]) + ANSWER_SLACK)
        wants_oracle = any(r.oracle for r in runs) and sample.metric != "perplexity"
        oracle = oracle_tracker(model, pre, limit) if wants_oracle else None  # it feeds the last token itself
        attend_last_query(model, pre)  # every fork ranks from every prompt query, as `generate` would
        # Runs of one spec under two labels (the headline at INT3's measured bytes is `smartkv@int3`)
        # compute the same rows: each spec runs once per sample, and its rows serve every label.
        done: dict[tuple, dict] = {}
        for run in runs:
            fields = _run_fields(run)
            row = {**fields, **base, "prefill_s": pre.seconds, "reference_s": ref_s, "error": ""}
            spec = (run.method, fields["config"], run.oracle)
            if spec not in done:
                try:
                    done[spec] = {**_EMPTY, **_one_run(model, tokenizer, sample, pre, run, target, ref_logprobs,
                                                       oracle, prediction, limit)}
                except BudgetError as err:  # a budget under this context's floor: recorded, not hidden
                    log.warning("%s on %s: %s", run.label, sample.sample_id, err)
                    done[spec] = {**_EMPTY, "error": str(err)}
            row.update(done[spec])
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
    pre = attend_last_query(model, prefill(model, ids, mask, decay))
    cache, _ = fork(pre, run, model)
    new, _ = decode(model, pre, cache, max_new_tokens)
    n = ids.shape[1]
    bits = torch.stack([layer.bits_map()[0, :, :n].mean(dim=(0, 2)) for layer in cache.layers])
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    needle = needle_token_span(tokenizer, sample)
    return {"bits": bits.numpy(), "tokens": tokens, "needle": needle,
            "prediction": tokenizer.decode(new[0], skip_special_tokens=True)}
