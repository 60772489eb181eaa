"""Prefill once, fork the cache, decode with each method (docs/DESIGN.md decision 7).

Prefill attends at full precision, so it is the same for every KV method: it runs once per
prompt batch (with importance tracking on), and each method gets a copy of the prefilled
keys and values (and of the importance statistics, if it tracks attention). The last
prompt token is left out of the prefill, so that `model.generate` feeds it through the
method's own cache: from then on every step reads the method's (quantized) cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from smartkv.attention import use_smartkv_attention
from smartkv.cache.base import KVCache, clear_active_update
from smartkv.cache.fp16 import FP16Layer
from smartkv.importance import ImportanceTracker
from smartkv.methods.common import n_layers
from smartkv.methods.registry import build_cache, make_config


# Teacher-forced scoring feeds a long target in forwards of this many tokens, the default
# `realloc_freq` (`forced_logits`).
FORCED_CHUNK = 16


@dataclass(frozen=True)
class RunSpec:
    """One method with its params, under a label used in results (e.g. "kivi-2", "smartkv-b0.30")."""

    label: str
    method: str
    params: dict = field(default_factory=dict, hash=False)
    family: str = "baseline"  # baseline | peer | smartkv | ablation: how results group it
    # Oracle ablation: importance from the attention of the whole FP16 generation (future
    # queries included), known before the first decode step. An upper reference, not a method.
    oracle: bool = False
    # The prompt length (tokens, as the task grid names it) this spec applies to; None: every
    # length. A matched run is one spec per cell of the grid (task x length) under one label,
    # each at the bytes its baseline held there (KIVI's full-precision residual is a larger
    # share of a short prompt, so one budget for all lengths would match none of them).
    context_length: int | None = None
    # The task this spec applies to (None: every task): a perplexity row holds its scored
    # continuation too, so a baseline's share of FP16 bytes there differs from the needle rows'.
    task: str | None = None

    def applies_to(self, task: str, context_length: int) -> bool:
        """Whether this spec runs on a sample of `task` with a prompt of `context_length` tokens."""
        return self.context_length in (None, int(context_length)) and self.task in (None, task)

    def config(self):
        return make_config(self.method, **self.params)


@dataclass
class Prefill:
    cache: KVCache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    seconds: float


def encode(tokenizer, prompts: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask (decoder-only models generate from the right edge)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` numbers a left-padded row: from its first real token (pads get 1,
    which no real token attends). Unpadded rows get 0, 1, 2, ... as without them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, decay: float = 0.9,
            obs_window: int = 64, track: bool = True, keep: tuple[str, ...] | None = None) -> Prefill:
    """Run the prompt minus its last token through an FP16 cache that tracks importance (float32:
    each method's cache copies the statistics it keeps).

    `track=False` skips the importance statistics (a second pass over the attention scores)
    when no method forked from this prefill reads them (`needs_tracker`). `keep` names the
    statistics to track (default: all); `tracked_stats(runs)` gives what a set of runs reads.
    Without `cumulative` and `count` the pass scores only the prompt's last rows.
    """
    if input_ids.shape[1] < 3:
        raise ValueError(f"prompt too short to prefill: {input_ids.shape[1]} tokens (need at least 3)")
    use_smartkv_attention(model)
    tracker = ImportanceTracker(decay, obs_window, keep) if track else None
    cache = KVCache([FP16Layer() for _ in range(n_layers(model.config))], "prefill", None, tracker)
    start = time.perf_counter()
    # numbered as generate numbers the row, so a padded row's prefill is the row's own
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], past_key_values=cache, use_cache=True,
          position_ids=positions(attention_mask)[:, :-1], logits_to_keep=1)
    clear_active_update()
    return Prefill(cache, input_ids, attention_mask, time.perf_counter() - start)


def needs_tracker(run: RunSpec) -> bool:
    """Whether `run`'s cache reads the prefill's importance statistics."""
    return run.oracle or bool(getattr(run.config(), "tracks_attention", False))


def tracked_stats(runs: list[RunSpec]) -> tuple[str, ...]:
    """The importance statistics the runs forked from one prefill read (each run's signal; an
    oracle run reads its signal too, from the prefill's copy extended by the FP16 generation)."""
    from smartkv.importance import ALL_STATS, NEEDS

    out: set[str] = set()
    for run in runs:
        if needs_tracker(run):
            signal = getattr(run.config(), "signal", None)
            out.update(NEEDS.get(signal, ALL_STATS))
    return tuple(s for s in ALL_STATS if s in out)


def fork(pre: Prefill, run: RunSpec, model, copy: bool = False) -> tuple[object, float]:
    """A fresh cache of `run`'s method holding the prefilled tokens; returns it and the seconds spent.

    `copy=True` hands the cache copies of the prefilled tensors, one layer at a time, so that it
    owns every byte it keeps even where its dtype equals the prefill's (a cache may store the
    tensor it is given): a memory profile of the fork then sees the whole cache allocated."""
    start = time.perf_counter()
    cache = build_cache(run.method, model.config, **run.params)
    if hasattr(cache, "padding_known"):  # the prompt's left padding, learnt by the prefill's attention
        cache.pads, cache.padding_known = pre.cache.pads, pre.cache.padding_known
    for idx, layer in enumerate(pre.cache.layers):
        dtype = model.dtype
        cache.update(layer.keys.to(dtype, copy=copy), layer.values.to(dtype, copy=copy), idx)
    tracker = getattr(cache, "tracker", None)
    if tracker is not None:
        shared = pre.cache.tracker
        if shared is None:
            raise ValueError(f"run {run.label!r} reads attention importance but the prefill did not track it "
                             "(prefill with track=True)")
        if not shared.compatible(tracker):
            raise ValueError(
                f"run {run.label!r} tracks decay={tracker.decay}, obs_window={tracker.obs_window} but the shared "
                f"prefill tracked decay={shared.decay}, obs_window={shared.obs_window}; prefill separately for each"
            )
        cache.tracker = shared.copy(keep=tracker.keep, dtype=tracker.dtype, per_head=tracker.per_head)
    clear_active_update()
    return cache, time.perf_counter() - start


@torch.no_grad()
def oracle_tracker(model, pre: Prefill, max_new_tokens: int):
    """Importance seen by an FP16 generation from start to end: the prefill statistics plus decode's."""
    cache = KVCache([FP16Layer() for _ in range(n_layers(model.config))], "oracle", None, pre.cache.tracker.copy())
    for idx, layer in enumerate(pre.cache.layers):
        cache.update(layer.keys.to(model.dtype), layer.values.to(model.dtype), idx)
    decode(model, pre, cache, max_new_tokens)
    return cache.tracker


def memory_of(cache) -> dict:
    """kv_bytes / fp16_kv_bytes of any cache this project can build (SmartKV's or transformers' peers),
    and `breakdown`: kv_bytes by part (smartkv.cache.base.MEMORY_PARTS)."""
    if hasattr(cache, "memory_report"):
        rep = cache.memory_report()
        return {k: rep[k] for k in ("kv_bytes", "fp16_kv_bytes", "ratio", "tracker_bytes", "mean_bits", "breakdown",
                                    "reallocations")}
    from smartkv.methods.hf_quantized import hf_cache_nbytes

    rep = hf_cache_nbytes(cache)
    kv, fp16 = rep["kv_bytes"], rep["fp16_kv_bytes"]
    return {"kv_bytes": kv, "fp16_kv_bytes": fp16, "ratio": kv / fp16 if fp16 else float("nan"),
            "tracker_bytes": 0, "mean_bits": float("nan"),
            "breakdown": {"quantized": rep["quantized_bytes"], "window": rep["residual_bytes"]}}


@torch.no_grad()
def decode(model, pre: Prefill, cache, max_new_tokens: int, do_sample: bool = False, seed: int = 0,
           **sampling) -> tuple[torch.Tensor, float]:
    """Generate up to `max_new_tokens` with `cache`; returns the new token ids [B, n] and seconds."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(
        input_ids=pre.input_ids,
        attention_mask=pre.attention_mask,
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id,
        **({} if do_sample else {"temperature": None, "top_p": None, "top_k": None}),
        **sampling,
    )
    seconds = time.perf_counter() - start
    clear_active_update()
    return out[:, pre.input_ids.shape[1]:], seconds


@torch.no_grad()
def forced_logits(model, pre: Prefill, cache, target: torch.Tensor,
                  chunk: int = FORCED_CHUNK) -> tuple[torch.Tensor, float]:
    """Logits [n, vocab] (float32) predicting each token of `target` [1, n], teacher-forced through `cache`.

    The prompt's last token goes alone, as `generate`'s first step (a cache quantizes its
    prefilled tokens on its first single-token update). Then the gold target minus its last
    token goes in forwards of `chunk` tokens. A needle's answer (~8 tokens) is one forward.
    A 512-token perplexity continuation is 32 forwards: a cache that adapts while decoding
    (SmartKV re-allocates every `realloc_freq` tokens, KIVI flushes its residual every 128)
    then adapts within the continuation, as it would while generating it. A single
    511-token forward would freeze every cache in its state after the prompt. Token by token
    would be exact, at 16x the forwards.
    """
    if pre.input_ids.shape[0] != 1:
        raise ValueError(f"forced_logits scores one prompt at a time, got a batch of {pre.input_ids.shape[0]}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    mask = pre.attention_mask
    start = time.perf_counter()
    first = model(input_ids=pre.input_ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    out = [first[0, -1:].float()]
    rest = target[:, :-1]
    for i in range(0, rest.shape[1], chunk):
        piece = rest[:, i:i + chunk]
        mask = torch.cat([mask, torch.ones_like(piece, dtype=mask.dtype)], dim=1)
        out.append(model(input_ids=piece, attention_mask=mask, past_key_values=cache, use_cache=True).logits[0].float())
    clear_active_update()
    return torch.cat(out, dim=0), time.perf_counter() - start
