"""The cache container and the layer contract every SmartKV layer follows.

A cache is a list of layers (as in `transformers.cache_utils`); a layer's one job is
`update(keys, values) -> (keys, values)` to attend over. What SmartKV adds:

- each layer reports the bytes of the tensors it actually holds (`nbytes`) and what the
  same tokens would take in FP16 (`fp16_nbytes`: 2 bytes per K and V value held);
- an optional `ImportanceTracker`: when set, `update` marks itself as the active update,
  and SmartKV's attention function (registered through `AttentionInterface`) feeds the
  attention that the layer's queries pay back to the tracker. The marker holds the very
  key tensor `update` returned, so the attention function only reports to the cache whose
  keys it is attending over;
- decode from packed codes: a layer that can (`attends_packed`) returns zero-cost placeholders
  for a decode step and publishes its packed history on the active update; the attention
  function computes attention and the tracker's weights from it in one pass. It does so only
  once SmartKV's attention function has been seen serving this cache (`attention_routed`), so
  another attention implementation never reads placeholders;
- beam search and cropping (`reorder_cache`, `batch_repeat_interleave`, `batch_select_indices`,
  `crop`, what `generate` calls): each layer moves its own tokens, the cache moves the
  tracker's per-token statistics with them.
"""

from __future__ import annotations

import contextvars
import warnings
from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from smartkv.importance import ImportanceTracker


@dataclass
class ActiveUpdate:
    cache: "KVCache"
    layer_idx: int
    keys: torch.Tensor
    # [B, H_kv, T] bool, True = evicted (0 bits): positions the attention function must mask out
    drop: torch.Tensor | None = None
    # The layer returned placeholders: the attention function reads this packed history instead
    # (smartkv.packed_attention.PackedHistory), through `layer.attend_packed`, or `layer.materialize()`.
    history: object | None = None
    layer: "KVLayer | None" = None


_ACTIVE: contextvars.ContextVar[ActiveUpdate | None] = contextvars.ContextVar("smartkv_active_update", default=None)


def active_update() -> ActiveUpdate | None:
    return _ACTIVE.get()


def clear_active_update() -> None:
    """Forget the last update, so that no later attention call reports to a finished cache."""
    _ACTIVE.set(None)


def storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Full-precision tokens are held in 16 bits whatever the model computes in (bf16 stays bf16)."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


# Where a cache's bytes go, the parts `KVLayer.memory_breakdown` names (one vocabulary for
# every method, so the figures stack them alike). Each layer's parts add up to its `nbytes()`.
MEMORY_PARTS = {
    "codes": "packed integer codes",
    "scales": "scales and zero-points",
    "index": "unit index (int32)",
    "sinks": "sink tokens (FP16)",
    "window": "recent window / residual (FP16)",
    "fp16": "every token in FP16",
    "key_stats": "key-smoothing centre and scale",
    "tracker": "importance tracker",
    "quantized": "codes + scales, not itemized",
    "other": "not itemized by the layer",
}


class BudgetWarning(UserWarning):
    """A cache holds more than its budget (too short a context for it); it says until when."""


class KVLayer(CacheLayerMixin):
    """Base of SmartKV's layers: lazy shape/dtype set-up and the memory contract."""

    is_sliding = False
    is_compileable = False
    attends_packed = False  # may return placeholders for a decode step (see the module docstring)
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.seq_len = 0
        self.batch = self.heads = self.head_dim = 0
        self.dtype = torch.float32
        self.store_dtype = torch.float16
        self.cache, self.layer_idx = None, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store_dtype = storage_dtype(key_states.dtype)
        self.is_initialized = True

    def attach(self, cache: "KVCache", layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # --- memory -------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds for its K/V (codes, scales, zero-points, indices, FP16 parts)."""
        raise NotImplementedError

    def memory_breakdown(self) -> dict[str, int]:
        """`nbytes()` split into the parts of `MEMORY_PARTS` (only the parts this layer holds);
        the values add up to `nbytes()` exactly. A layer that does not itemize says so."""
        return {"other": self.nbytes()}

    def fp16_nbytes(self) -> int:
        return 2 * 2 * self.batch * self.heads * self.seq_len * self.head_dim

    def bits_histogram(self) -> dict[int, int]:
        """Number of K/V values held at each bit width (16 = full precision)."""
        raise NotImplementedError

    def budget_met(self) -> bool:
        """Whether the bytes held are within the layer's budget (layers without one: always)."""
        return True

    def budget_holds_from(self) -> int | None:
        """Fewest tokens from which the budget can be met (0: no budget, None: at no length)."""
        return 0

    def awaiting_allocation(self) -> bool:
        """Whether the layer still holds its prompt as given, its budget not yet applied."""
        return False

    # --- beam search / cropping: a layer that cannot move its tokens says so -------------
    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"{type(self).__name__} does not support {what} (beam search / cache cropping); "
            "use greedy or sampled decoding, or the fp16, uniform or smartkv methods, which support both"
        )

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache")

    def crop(self, tokens_to_remove):
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats):
        if repeats != 1:
            self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    def reset(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be reset; build a new cache per generation")


class KVCache(Cache):
    """One SmartKV layer per model layer, plus the importance tracker when the method uses one."""

    def __init__(self, layers: list[KVLayer], method: str, config, tracker: ImportanceTracker | None = None):
        super().__init__(layers=layers)
        self.method = method
        self.config = config
        self.tracker = tracker
        self._layer_fractions: list[float] | None = None
        self.pending_drop: int | None = None  # a layer whose evictions the attention function has yet to mask
        self.pending_packed: int | None = None  # a layer whose placeholders the attention function has yet to replace
        self.attention_routed = False  # SmartKV's attention function has attended over this cache's keys
        # Left padding of the prompt (smartkv/cache/padding.py): pad tokens per row [B], learnt from
        # the prompt's attention mask by SmartKV's attention function; None: none, or not known.
        self.pads: torch.Tensor | None = None
        self.padding_known = False
        for idx, layer in enumerate(layers):
            layer.attach(self, idx)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.pending_drop is not None:
            raise RuntimeError(
                f"{self.method}: layer {self.pending_drop} evicted tokens (a 0-bit width) but its attention was not "
                "computed by SmartKV's attention function, so nothing masked them out; call "
                "smartkv.attention.use_smartkv_attention(model) before generate, or drop 0 from `bits`")
        if self.pending_packed is not None:
            raise RuntimeError(
                f"{self.method}: layer {self.pending_packed} returned placeholders for its packed history but its "
                "attention was not computed by SmartKV's attention function; keep the model on "
                "smartkv.attention.use_smartkv_attention(model) for the whole generation")
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        drop = getattr(layer, "drop", None)
        history = getattr(layer, "history", None)
        # the attention function must see this update: to track, mask evictions, attend packed codes,
        # learn the prompt's padding, or reorder the mask's columns after a sink-first reorder
        tracked = (self.tracker is not None or drop is not None or getattr(layer, "attends_packed", False)
                   or not self.padding_known or getattr(layer, "order", None) is not None)
        _ACTIVE.set(ActiveUpdate(self, layer_idx, keys, drop, history, layer) if tracked else None)
        self.pending_drop = layer_idx if drop is not None else None
        self.pending_packed = layer_idx if history is not None else None
        return keys, values

    def note_padding(self, attention_mask, t: int) -> None:
        """Learn the prompt's left padding from the mask its attention was given (once per cache)."""
        from smartkv.cache.padding import left_pads

        self.padding_known = True
        self.pads, why = left_pads(attention_mask, t)
        if why:
            self.warn_once("padding", f"{self.method}: {why}; pad tokens are kept and counted as context")

    def warn_once(self, key: str, message: str) -> None:
        """One warning per cache and kind (not one per layer and step)."""
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, BudgetWarning, stacklevel=3)

    # --- beam search / cropping: the tracker's per-token statistics follow the tokens ----
    # The tracker moves first: a layer that must re-allocate after the move reads its rows.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.tracker is not None:
            self.tracker.select_rows(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.tracker is not None and repeats != 1:
            self.tracker.repeat_rows(repeats)
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.tracker is not None:
            self.tracker.select_rows(torch.as_tensor(indices, dtype=torch.long))
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.tracker is not None:
            for idx, layer in enumerate(self.layers):
                self.tracker.crop(idx, layer.get_seq_length())

    def observe(self, layer_idx: int, query, key, attention_mask, scaling: float) -> None:
        if self.tracker is not None:
            self.tracker.observe(layer_idx, query, key, attention_mask, scaling)

    def observe_weights(self, layer_idx: int, probs: torch.Tensor, kv_heads: int, allowed: torch.Tensor | None) -> None:
        """Hand the tracker one decode query's softmax weights [B, Hq, T] from the attention pass itself."""
        if self.tracker is not None:
            self.tracker.observe_weights(layer_idx, probs, kv_heads, allowed)

    def warn_unobserved(self) -> None:
        """Once per cache: it allocates by attention but has seen none (attention not routed to it)."""
        if getattr(self, "_warned_unobserved", False):
            return
        self._warned_unobserved = True
        import warnings

        warnings.warn(
            f"{self.method}: allocating precision without having observed any attention, so every token "
            "looks equally important; call smartkv.attention.use_smartkv_attention(model) before generate",
            RuntimeWarning, stacklevel=3)

    def layer_fraction(self, layer_idx: int) -> float:
        """Per-layer budget fraction from attention entropy (layer-aware allocation), fixed at first use."""
        if self._layer_fractions is None:
            from smartkv.allocate import entropy_budget_fractions
            from smartkv.importance import layer_entropies

            me = self.layers[layer_idx]
            ent = layer_entropies(self.tracker, len(self.layers)) if self.tracker is not None else []
            # Each layer's floor at the current length (layers not yet initialised share the
            # caller's geometry), plus a hair for rounding bytes down, comes off the top.
            floors = [(layer if getattr(layer, "is_initialized", False) else me).floor_ratio(me.seq_len) + 1e-3
                      for layer in self.layers]
            self._layer_fractions = entropy_budget_fractions(ent or [float("nan")] * len(self.layers),
                                                             me.spec.budget, me.spec.layer_skew, floors)
        return self._layer_fractions[layer_idx]

    def memory_report(self) -> dict:
        """Bytes actually held, per layer and in total, against FP16 for the same tokens."""
        per_layer = []
        hist: dict[int, int] = {}
        parts: dict[str, int] = {}
        for layer in self.layers:
            for part, n in (layer.memory_breakdown() if layer.is_initialized else {}).items():
                parts[part] = parts.get(part, 0) + n
            h = layer.bits_histogram()
            for b, n in h.items():
                hist[b] = hist.get(b, 0) + n
            per_layer.append({"kv_bytes": layer.nbytes(), "fp16_kv_bytes": layer.fp16_nbytes(), "bits": h})
        kv = sum(p["kv_bytes"] for p in per_layer)
        fp16 = sum(p["fp16_kv_bytes"] for p in per_layer)
        values = sum(hist.values())
        budget = getattr(self.config, "budget", None)
        froms = [layer.budget_holds_from() for layer in self.layers if layer.is_initialized]
        met = all(layer.budget_met() for layer in self.layers)
        holds_from = None if any(f is None for f in froms) else max(froms, default=0)
        return {
            "method": self.method,
            "kv_bytes": kv,
            "fp16_kv_bytes": fp16,
            "ratio": kv / fp16 if fp16 else float("nan"),
            # part of kv_bytes (the method keeps it per token), shown apart
            "tracker_bytes": self.tracker.nbytes if self.tracker is not None else 0,
            # kv_bytes by part (MEMORY_PARTS): what the codes, scales, index, FP16 tokens... weigh
            "breakdown": {p: parts[p] for p in MEMORY_PARTS if p in parts},
            "reallocations": max((getattr(layer, "reallocations", 0) for layer in self.layers), default=0),
            "mean_bits": (sum(b * n for b, n in hist.items()) / values) if values else float("nan"),
            "bits_histogram": dict(sorted(hist.items())),
            "seq_len": self.get_seq_length(),
            "per_layer": per_layer,
            # Methods without a budget always meet it. A budget is not met while the context is
            # shorter than `budget_holds_from` tokens (the cache holds its floor meanwhile), or
            # before the first decode step (allocation runs there: a prompt answered by EOS at once).
            "budget": budget,
            "budget_met": met,
            "budget_holds_from": holds_from,
            "budget_note": _budget_note(met, holds_from, self.get_seq_length(),
                                        any(layer.awaiting_allocation() for layer in self.layers)),
        }


def _budget_note(met: bool, holds_from: int | None, seq_len: int, awaiting: bool) -> str:
    """Why a budget is not met, in a line ("" when it is)."""
    if met:
        return ""
    if awaiting:
        return ("allocation runs at the first decode step and generation stopped before it "
                "(the first new token ended it): every token is still in FP16")
    if holds_from is None:
        return "the budget is below what the lowest bit width costs per token: it is met at no length"
    if seq_len < holds_from:
        return (f"{seq_len} tokens are too few for the budget, which holds from {holds_from} tokens on; "
                "meanwhile the cache holds its floor (sinks in FP16, every other token at the lowest width)")
    return "the cache holds more than its budget"  # not reached by the layers here; said rather than hidden
