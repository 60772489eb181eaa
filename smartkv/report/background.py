"""The report's fixed prose: related work and the method with its pseudocode.

Nothing here depends on a result; the parameter values quoted in the method section are
filled in from params by `method_section`.
"""

from __future__ import annotations

from typing import Mapping

RELATED_WORK = [
    ("KIVI (Liu et al., 2024)", "Tuning-free 2-bit KV quantization: keys are quantized per channel, values "
     "per token, and the most recent tokens stay in full precision until a group fills. Every token gets "
     "the same width."),
    ("KVQuant (Hooper et al., 2024)", "Pushes KV quantization to 2–3 bits with per-channel keys quantized "
     "before RoPE, non-uniform codebooks calibrated offline and a few dense-and-sparse outliers kept exact."),
    ("ZipCache (He et al., 2024)", "Mixed precision driven by a normalized attention score (accumulated "
     "attention divided by how many queries could see the token), so early tokens are not favoured just "
     "for being old; salient tokens get more bits."),
    ("MiKV (Yang et al., 2024)", "Keeps evicted-looking tokens at low precision instead of dropping them, "
     "and the important ones at high precision: the closest published idea to a 0/low/high-bit policy."),
    ("H2O (Zhang et al., 2023)", "Evicts by accumulated attention, keeping heavy-hitter tokens plus a recent "
     "window under a fixed cache size."),
    ("SnapKV (Li et al., 2024)", "Scores the prompt's tokens by the attention of an observation window at "
     "the end of the prompt (the question), pooled over neighbours, and keeps only the top ones before "
     "decoding starts."),
    ("kvpress (NVIDIA)", "A library of KV-cache compression 'presses' (SnapKV, StreamingLLM, expected "
     "attention, ...) for Hugging Face models; this study runs its presses as the eviction peers."),
    ("transformers' QuantizedCache", "Hugging Face's built-in quantized cache (quanto or HQQ backends): a "
     "uniform width for every token with a full-precision residual of recent tokens."),
]

PSEUDOCODE = """\
for each layer ℓ, on prefill and every `realloc_freq` decoded tokens:
    I[t]   ← (1 − prior) · EMA_decay(attention received by token t) + prior · uniform     # or the SnapKV window
    keys   ← (keys − centre_c) / halfrange_c                   # per-channel key smoothing (FP16 stats kept)
    for each token t outside the sinks and the recent window, each width b ∈ {0, 2, 3, 4, 8}:
        E[t, b] ← mean over groups of range(t)² / (12 (2^b − 1)²)   # measured; b = 0 (evicted): range²/4
        C[b]    ← packed codes + FP16 scale/zero per group + index bytes
    budget_ℓ ← budget · FP16 bytes − sinks (FP16) − window (FP16, ≤ window_share of it) − tracker bytes
    steps   ← every upgrade (t: b → b'), value = I[t] · (E[t, b] − E[t, b']) / (C[b'] − C[b])
    take steps in decreasing value per byte while they fit budget_ℓ            # greedy knapsack
    a token already stored at width c may only stay at c or go down (re-allocation demotes, never promotes)
    quantize each token to its width; width 0 drops it from attention
on decode: tokens leaving the window get their width at the next allocation; the tracker updates I
"""


def _smartkv_settings(params: Mapping) -> dict:
    """params' `smartkv` section over SmartKVConfig's defaults: what the runs actually used."""
    from dataclasses import fields

    from smartkv.methods.smartkv import SmartKVConfig

    defaults = {f.name: f.default for f in fields(SmartKVConfig)}
    return {**defaults, **(params.get("smartkv", {}) or {})}


def method_section(params: Mapping) -> list[str]:
    s = _smartkv_settings(params)
    bits = ", ".join(str(b) for b in s["bits"])
    return [
        "SmartKV gives each cached token its own precision under a byte budget (a fraction of the FP16 "
        "KV bytes for the same tokens). It has four parts:",
        "",
        f"1. **Importance from attention.** An `ImportanceTracker` records the attention each cached token "
        f"receives; the default signal is an exponential moving average over queries (decay "
        f"{params.get('decay')}), mixed with a uniform prior ({s.get('prior')}) so a token that has not been "
        "read yet is not written off. The SnapKV-style window signal and H2O's cumulative sum are ablations. "
        "The tracker's FP16 statistics count against the budget.",
        "2. **A measured error model.** Instead of assuming error ∝ 4^−b, the error of each width is computed "
        f"from the range of the values being stored (`error_model: {s.get('error_model')}`), so tokens with "
        "outliers are charged more for losing bits.",
        f"3. **Greedy value-per-byte allocation** over the widths {{{bits}}}; width 0 evicts, so one policy "
        "spans quantization and eviction. Each upgrade step's value is importance × error reduction; the "
        "steps are sorted once by value per byte and taken while they fit (an exact DP is an ablation).",
        f"4. **Protection and storage.** The first {s.get('sink_tokens')} tokens (attention sinks) and the "
        f"last {s.get('window')} (at most {s.get('window_share')} of the budget) stay in FP16; keys are "
        f"smoothed per channel (`key_smoothing: {s.get('key_smoothing')}`) before quantization, group size "
        f"{s.get('group_size')}. Every {params.get('realloc_freq')} decoded tokens the allocation is "
        "recomputed, but a stored token can only be demoted: precision once discarded is not restored.",
        "",
        "```text",
        PSEUDOCODE.rstrip(),
        "```",
        "",
        "Memory is measured, not modelled: the bytes of every tensor the cache holds (codes, scales, "
        "indices, sinks, window, key statistics, tracker) over the FP16 bytes of the same tokens.",
        "",
    ]


def related_work_section() -> list[str]:
    lines = ["SmartKV sits between uniform KV quantization and attention-guided eviction:", ""]
    lines += [f"- **{name}.** {text}" for name, text in RELATED_WORK]
    lines += ["", "Unlike KIVI and QuantizedCache, SmartKV varies the width per token; unlike H2O and SnapKV "
              "it can keep a low-importance token at 2 bits instead of dropping it; unlike ZipCache and "
              "MiKV it allocates by a measured error per byte under an exact byte budget that counts every "
              "tensor it keeps.", ""]
    return lines
