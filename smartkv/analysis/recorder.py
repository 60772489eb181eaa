"""Record the prefill attention of a model through the tracker SmartKV's cache uses.

`record_prefill` runs the prompt (minus its last token, as `smartkv.runner.prefill` does)
through an FP16 cache whose `ImportanceTracker` sees every query, exactly as a SmartKV
cache's tracker would. A second tracker sees only the last `window` prompt queries: the
observation window of SnapKV (Li et al. 2024), whose summed attention is the score that
eviction work found to mark what the question will read. Both go through the same
`AttentionInterface` hook, so nothing here copies model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.attention import use_smartkv_attention
from smartkv.cache.base import KVCache, clear_active_update
from smartkv.cache.fp16 import FP16Layer
from smartkv.importance import ImportanceTracker
from smartkv.methods.common import n_layers


class RecordingCache(KVCache):
    """An FP16 cache that also feeds the last `window` prefill queries to `window_tracker`."""

    def __init__(self, n: int, tracker: ImportanceTracker, window_tracker: ImportanceTracker | None, window: int):
        super().__init__([FP16Layer() for _ in range(n)], "recording", None, tracker)
        self.window_tracker = window_tracker
        self.window = window

    def observe(self, layer_idx: int, query, key, attention_mask, scaling: float) -> None:
        super().observe(layer_idx, query, key, attention_mask, scaling)
        q = query.shape[-2]
        if self.window_tracker is not None and q > 1:  # prefill only: decode steps are not the window
            w = min(self.window, q)
            mask = attention_mask
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[:, :, -w:, :]
            self.window_tracker.observe(layer_idx, query[:, :, -w:], key, mask, scaling)


@dataclass
class Recording:
    cache: RecordingCache  # the prefilled FP16 keys and values (prompt minus its last token)
    tracker: ImportanceTracker  # every prefill query (cumulative, EMA, entropy)
    window_tracker: ImportanceTracker  # the last `window` prefill queries only
    input_ids: torch.Tensor  # the whole prompt [1, T + 1]


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, window: int = 32, decay: float = 0.9) -> Recording:
    """Prefill `input_ids` [1, T + 1] minus its last token, tracking all queries and the last `window`."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"record_prefill takes one prompt, got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] < 3:
        raise ValueError(f"prompt too short to prefill: {input_ids.shape[1]} tokens (need at least 3)")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 query")
    use_smartkv_attention(model)
    tracker, win = ImportanceTracker(decay), ImportanceTracker(decay)
    cache = RecordingCache(n_layers(model.config), tracker, win, window)
    model(input_ids=input_ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    clear_active_update()
    return Recording(cache, tracker, win, input_ids)


@torch.no_grad()
def record_decode(model, rec: Recording, steps: int) -> tuple[torch.Tensor, ImportanceTracker]:
    """Greedy-decode `steps` tokens on (a copy of) the recording's FP16 cache.

    Returns the new ids [steps] and a tracker of the decode queries' attention alone (over
    the T prompt tokens plus the tokens decoding added).
    """
    tracker = ImportanceTracker(rec.tracker.decay)
    cache = KVCache([FP16Layer() for _ in rec.cache.layers], "decode-recording", None, tracker)
    for idx, layer in enumerate(rec.cache.layers):
        cache.update(layer.keys.to(model.dtype), layer.values.to(model.dtype), idx)
    nxt = rec.input_ids[:, -1:]
    out = []
    for _ in range(steps):
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        nxt = logits[:, -1:].argmax(-1)
        out.append(int(nxt))
    clear_active_update()
    return torch.tensor(out), tracker
