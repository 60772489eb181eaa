"""Eviction peers through NVIDIA kvpress itself, run in their own environment (`.venv-kvpress`).

kvpress 0.5.5 pins transformers<5.3 and pandas<3, so this module runs under another
transformers than the rest of SmartKV. It must therefore import nothing of `smartkv` that
touches transformers or torch at import time: only `scoring`, `io` and `tasks.sample` (pure
Python, pandas, pyarrow), which a test checks. torch, transformers and kvpress are imported
inside the functions, from whichever venv runs it.

The peers (kvpress presses, cited in their own docstrings):
- SnapKV (Li et al. 2024, arXiv:2404.14469): attention of an observation window of the last
  prompt queries, pooled over neighbouring tokens;
- StreamingLLM (Xiao et al. 2024, arXiv:2309.17453): attention sinks plus the most recent tokens;
- ExpectedAttention (Devoto et al. 2025, kvpress): the attention that future queries are
  expected to pay, from the statistics of the prompt's queries, scaled by value norms;
- Knorm (Devoto et al. 2024, arXiv:2406.11430): keep the keys of smallest L2 norm;
- TOVA (Oren et al. 2024, arXiv:2401.06104): the attention of the last query, averaged over heads.

kvpress's AdaKVPress is not among them: it evicts by masking keys inside kvpress's patched
attention function and keeps every tensor, so under this protocol it saves no byte that could be
measured, and its decode needs that patch active.

Protocol: the same as SmartKV's (`smartkv.runner`). The prompt minus its last token is
prefilled and compressed by the press, so the press sees a prompt that already holds the
question (question-aware); then the last prompt token and every new token are fed greedily
through that cache, at their true positions (the cache is shorter than the position after
eviction, as in kvpress's own pipeline). Memory is measured from the tensors the cache holds.

One prefill serves every press. kvpress compresses in a forward hook that runs after each
attention layer, and a prefill's attention reads the uncompressed keys, so the hook's inputs
(the layer's hidden states, RoPE, cache positions, the full keys and values) do not depend on
the press. `record_prefill` runs the prompt once and keeps each layer's hook inputs;
`compress_with` then calls the press's own `forward_hook` on them, layer by layer, on a copy of
the cache, exactly as `with press(model):` would during that prefill (a test pins the two equal).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from smartkv import scoring
from smartkv.tasks.sample import Sample

# press name in params -> kvpress class name (None: no press, the FP16 reference of this protocol)
PRESSES: dict[str, str | None] = {
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "none": None,
}
# The options a press may be given (kvpress's own dataclass fields), beyond compression_ratio.
OPTIONS: dict[str, tuple[str, ...]] = {
    "snapkv": ("window_size", "kernel_size"),
    "streaming_llm": ("n_sink",),
    "expected_attention": ("n_future_positions", "n_sink", "use_covariance", "use_vnorm"),
    "knorm": (),
    "tova": (),
    "none": (),
}

FP16_BYTES = 2  # memory is reported as FP16-equivalent bytes, whatever dtype the model runs in


@dataclass(frozen=True)
class PeerSpec:
    """One peer run: a kvpress press keeping `kept` of the prompt's KV pairs in every layer."""

    label: str
    press: str
    kept: float = 1.0
    options: tuple[tuple[str, object], ...] = ()  # kvpress's own fields, sorted by name (e.g. window_size)

    @property
    def compression_ratio(self) -> float:
        # kvpress's knob is the fraction removed
        return round(1.0 - self.kept, 12)

    def config(self) -> dict:
        out = {"press": self.press, "kvpress_class": PRESSES[self.press], "kept": self.kept,
               "compression_ratio": self.compression_ratio}
        return out | ({"options": dict(self.options)} if self.options else {})


def make_press(spec: PeerSpec):
    """The kvpress press of `spec`: its `options`, kvpress's own defaults for the rest (SnapKV
    window 64, pooling 5; n_sink 4)."""
    cls_name = PRESSES[spec.press]
    if cls_name is None:
        return None
    import kvpress

    return getattr(kvpress, cls_name)(compression_ratio=spec.compression_ratio, **dict(spec.options))


def load(model_dir: str, dtype: str = "float32", device: str = "cpu"):
    """Model and tokenizer from a local folder (the converted default model, or any HF folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar line per weight in a DVC log otherwise
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def cache_bytes(cache) -> int:
    """FP16-equivalent bytes of every key and value tensor the cache holds.

    Counted from each tensor's storage (a view cannot hide a larger base), converted to FP16
    per element so that a float32 model is charged what FP16 would take.
    """
    held = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            held += t.untyped_storage().nbytes() // t.element_size() * FP16_BYTES
    return held


def fp16_bytes(cache, n_positions: int) -> int:
    """What FP16 needs for `n_positions` tokens in every layer of `cache` (K and V)."""
    total = 0
    for layer in cache.layers:
        b, h, _, d = layer.keys.shape
        total += 2 * b * h * n_positions * d * FP16_BYTES
    return total


def _hooked_layers(model) -> list:
    """The attention modules kvpress's `press(model)` hooks (its own rule: every layer, but
    Gemma 3's sliding-window layers), each given the model's rotary embedding as kvpress does."""
    language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    try:
        from transformers import Gemma3ForConditionalGeneration
    except ImportError:  # pragma: no cover - every transformers kvpress supports has it
        Gemma3ForConditionalGeneration = ()
    out = []
    for layer in language_model.layers:
        if isinstance(model, Gemma3ForConditionalGeneration) and layer.self_attn.is_sliding:
            continue
        layer.self_attn.rotary_emb = language_model.rotary_emb
        out.append(layer.self_attn)
    return out


def record_prefill(model, ids):
    """Prefill `ids` once without a press: the full cache, and each hooked layer's
    (module, kwargs, output) as kvpress's forward hook would receive them."""
    import torch
    from transformers import DynamicCache

    records, hooks = [], []

    def keep(module, args, kwargs, output):
        records.append((module, dict(kwargs), output))

    cache = DynamicCache()
    try:
        for module in _hooked_layers(model):
            hooks.append(module.register_forward_hook(keep, with_kwargs=True))
        with torch.no_grad():
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return cache, records


def compress_with(press, model, cache, records):
    """A copy of the prefilled `cache`, compressed by `press` (None: the copy, uncompressed),
    through the press's own `forward_hook` on each recorded layer."""
    import copy

    import torch

    out = copy.deepcopy(cache)
    if press is None:
        return out
    press.post_init_from_model(model)
    with torch.no_grad():
        for module, kwargs, output in records:
            press.forward_hook(module, [], {**kwargs, "past_key_values": out}, output)
    return out


def _walk(model, cache, token: int, start: int, limit: int, next_token) -> int:
    """Feed `token` at position `start`, then each token `next_token(step, logits)` returns at the
    following positions, for at most `limit` steps (None stops early); returns the steps fed.

    Greedy decoding and teacher-forced NLL share this loop, so both feed at the same positions:
    the true ones, which after eviction lie beyond the cache's length.
    """
    import torch

    for step in range(limit):
        ids = torch.tensor([[token]], device=model.device)
        pos = torch.tensor([[start + step]], device=model.device)
        logits = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[0, -1]
        token = next_token(step, logits)
        if token is None:
            return step + 1
    return limit


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def prompt_ids(model, tokenizer, sample: Sample):
    ids = tokenizer([sample.prompt], return_tensors="pt", add_special_tokens=True)["input_ids"].to(model.device)
    if ids.shape[1] < 3:
        raise ValueError(f"prompt too short to prefill: {ids.shape[1]} tokens (need at least 3)")
    return ids


def run_sample(model, tokenizer, sample: Sample, spec: PeerSpec, max_new_tokens: int, prefilled=None) -> dict:
    """One sample under one press: prediction and score (or NLL), memory, timings.

    `prefilled` = (cache, records, seconds) from `record_prefill` of this sample's prompt minus
    its last token, shared by the presses of one sample; None prefills here."""
    import torch

    ids = prompt_ids(model, tokenizer, sample)
    n = ids.shape[1]
    if prefilled is None:
        start = time.perf_counter()
        base, records = record_prefill(model, ids[:, :-1])
        prefilled = (base, records, time.perf_counter() - start)
    base, records, prefill_s = prefilled
    start = time.perf_counter()
    cache = compress_with(make_press(spec), model, base, records)
    fork_s = time.perf_counter() - start
    prefill_ratio = cache_bytes(cache) / fp16_bytes(cache, n - 1)

    row: dict = {}
    start = time.perf_counter()
    with torch.no_grad():
        if sample.metric == "perplexity":
            cont = tokenizer(sample.meta["continuation"], add_special_tokens=False)["input_ids"]
            nll = []

            def teacher(step, logits):
                nll.append(-float(torch.log_softmax(logits.float(), -1)[cont[step]]))
                return cont[step]

            fed = _walk(model, cache, int(ids[0, -1]), n - 1, len(cont), teacher)
            row.update(prediction="", score=math.nan, nll=sum(nll) / len(cont), new_tokens=len(cont))
        elif getattr(sample, "target", None):
            # Teacher-forced, as SmartKV's rows are scored: the gold answer fed token by token
            # through the compressed cache; exact = greedy would write it (argmax = gold everywhere).
            from smartkv.answer_scores import target_ids

            gold = target_ids(tokenizer, sample.prompt, sample.target)
            hits, logp, argmax = [], [], []

            def forced(step, logits):
                lp = torch.log_softmax(logits.float(), -1)
                argmax.append(int(lp.argmax()))
                hits.append(argmax[-1] == gold[step])
                logp.append(float(lp[gold[step]]))
                return gold[step]

            fed = _walk(model, cache, int(ids[0, -1]), n - 1, len(gold), forced)
            exact = float(all(hits))
            row.update(prediction=tokenizer.decode(argmax, skip_special_tokens=True), nll=math.nan,
                       new_tokens=len(gold), score=exact, forced_exact=exact,
                       answer_logprob=sum(logp) / len(logp), answer_tokens=len(gold))
        else:
            eos, new = _eos_ids(model), []

            def greedy(step, logits):
                new.append(int(logits.argmax()))
                return None if new[-1] in eos else new[-1]

            # fed: the last prompt token and every new token but the last one
            fed = _walk(model, cache, int(ids[0, -1]), n - 1, max_new_tokens, greedy)
            pred = tokenizer.decode(new, skip_special_tokens=True)
            row.update(prediction=pred, nll=math.nan, new_tokens=len(new),
                       score=scoring.score(sample.metric, pred, sample.answers, sample.meta))
    decode_s = time.perf_counter() - start
    held, full = cache_bytes(cache), fp16_bytes(cache, n - 1 + fed)
    row.update(n_tokens=n, prefill_s=prefill_s, fork_s=fork_s, decode_s=decode_s, kv_bytes=held, fp16_kv_bytes=full,
               kv_ratio=held / full, prefill_kv_ratio=prefill_ratio, mean_bits=16.0 * held / full,
               tokens_per_s=row["new_tokens"] / decode_s if decode_s > 0 else math.nan)
    return row


def _run_fields(spec: PeerSpec) -> dict:
    return {"run": spec.label, "method": f"kvpress_{spec.press}", "family": "peer", "budget": spec.kept,
            "bits": math.nan, "config": json.dumps(spec.config(), sort_keys=True)}


def _sample_fields(sample: Sample, seed: int) -> dict:
    return {"task": sample.task, "sample_id": sample.sample_id, "seed": seed,
            "context_length": sample.context_length,
            "depth": math.nan if sample.depth is None else float(sample.depth),
            "answers": json.dumps(sample.answers), "metric": sample.metric}


def evaluate_peers(model, tokenizer, samples_by_seed: dict[int, list[Sample]], specs: list[PeerSpec], *,
                   max_new_tokens: int = 16, log=None):
    """Every peer on every sample; one row per (sample, peer), in the results schema of `smartkv.evaluate`."""
    import pandas as pd

    rows = []
    total = sum(len(s) for s in samples_by_seed.values()) * len(specs)
    for seed, samples in sorted(samples_by_seed.items()):
        for sample in samples:
            limit = int(sample.meta.get("max_new_tokens", max_new_tokens))
            start = time.perf_counter()  # one prefill, every press compresses a copy of it
            base, records = record_prefill(model, prompt_ids(model, tokenizer, sample)[:, :-1])
            prefilled = (base, records, time.perf_counter() - start)
            for spec in specs:
                row = {**_run_fields(spec), **_sample_fields(sample, seed), "error": "", "tracker_bytes": 0}
                row.update(run_sample(model, tokenizer, sample, spec, limit, prefilled))
                rows.append(row)
                if log is not None:
                    log.info("%d/%d seed %d %s %s: score %s kv_ratio %.3f (%.1f s)", len(rows), total, seed,
                             sample.sample_id, spec.label, row["score"], row["kv_ratio"],
                             row["fork_s"] + row["decode_s"])
    return pd.DataFrame(rows)
