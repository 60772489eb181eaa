"""SmartKV's attention function, registered through `transformers`' `AttentionInterface`.

The output is `transformers`' own SDPA attention over the keys and values the cache returned,
so every method (FP16 included) computes attention the same way and differences come from the
cache alone. When the cache that produced those keys tracks importance, the function also hands
the query, keys and mask to the cache's tracker. No model code is copied or patched: any model
whose attention goes through the interface works (docs/DESIGN.md decision 1).

One exception, for speed: at a decode step (one query token) a mixed-precision layer returns
zero-cost placeholders and publishes its packed history; the function then computes attention
straight from the packed codes (`smartkv.packed_attention`, one C++ call per layer) and hands the
softmax weights of that same pass to the tracker (no second q.k). The kernel is tested against
the de-quantize + SDPA path. Attention it does not take (soft-capping, sliding window, position
bias, dropout) gets the layer's de-quantized history and goes through SDPA as before.

Left padding: the prompt's call hands its mask to the cache, which learns each row's pads
from it; a layer that has reordered its prompt sink-first (smartkv/cache/padding.py) gets the
mask's columns reordered the same way before anything reads it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from smartkv.cache.base import active_update
from smartkv.cache.padding import permute_columns
from smartkv.importance import may_attend

ATTN_IMPLEMENTATION = "smartkv"


def smartkv_attention(module: torch.nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    active = active_update()
    mine = active is not None and active.keys is key
    if mine:
        active.cache.attention_routed = True
        if not active.cache.padding_known:  # the prompt's call: learn its left padding (smartkv/cache/padding.py)
            active.cache.note_padding(attention_mask, key.shape[2])
        order = getattr(active.layer, "order", None)
        if order is not None and attention_mask is not None:
            # the layer holds its prompt in sink-first order: the mask's columns follow the tokens
            attention_mask = permute_columns(attention_mask, order)
        if active.history is not None:
            if _kernel_takes(query, active.history.length, dropout, kwargs):
                return _packed_attention(active, query, attention_mask, scaling)
            key, value = active.layer.materialize()
            active.keys, active.history = key, None
            active.cache.pending_packed = None
    if mine and active.drop is not None:
        # evicted tokens (0 bits) hold zeros: mask them out so they get no attention at all
        attention_mask = mask_evicted(attention_mask, active.drop, query.shape[1], query.shape[2])
        active.cache.pending_drop = None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if mine:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        active.cache.observe(active.layer_idx, query, key, attention_mask, scale)
    return out


def _kernel_takes(query, t: int, dropout: float, kwargs: dict) -> bool:
    """Whether this call is plain decode attention over `t` keys, which the packed-code kernel computes.
    A sliding window wider than the history changes nothing (Mistral passes its 4096 always)."""
    window = kwargs.get("sliding_window")
    return (query.shape[2] == 1 and not dropout and kwargs.get("softcap") is None
            and (window is None or t < window) and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def _packed_attention(active, query, attention_mask, scaling):
    """Attention of one decode query over the layer's packed history, and its weights to the tracker."""
    cache, layer = active.cache, active.layer
    t = active.history.length
    allowed = allowed_keys(attention_mask, query.shape[0], t)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, probs = layer.attend_packed(query, scale, allowed)  # evicted tokens get no attention in the kernel
    cache.pending_packed = cache.pending_drop = None
    if cache.tracker is not None:
        seen = allowed
        if active.drop is not None:
            # what `observe` counts behind `mask_evicted`: the first query head's visible keys
            seen = ~active.drop[:, 0] if seen is None else seen & ~active.drop[:, 0]
        cache.observe_weights(active.layer_idx, probs, layer.heads, seen)
    return out.transpose(1, 2).contiguous(), None


def allowed_keys(attention_mask, batch: int, t: int) -> torch.Tensor | None:
    """The keys [B, T] (bool, True = may attend) of the last query row of the model's mask; None: all."""
    if attention_mask is None:
        return None
    return may_attend(attention_mask[:, 0, -1, -t:]).expand(batch, t).contiguous()


def mask_evicted(attention_mask, drop: torch.Tensor, query_heads: int, q_len: int) -> torch.Tensor:
    """A boolean mask [B, H_q, q, T] (True = may attend): the model's mask (or plain causal when it
    passed none) minus the evicted positions `drop` [B, H_kv, T] of each KV head's query group."""
    b, hkv, t = drop.shape
    keep = ~drop.repeat_interleave(query_heads // hkv, dim=1)[:, :, None, :]  # [B, H_q, 1, T]
    if attention_mask is None:
        allowed = torch.ones(q_len, t, dtype=torch.bool, device=drop.device).tril(diagonal=t - q_len)[None, None]
    else:
        allowed = may_attend(attention_mask[..., -t:])
    return allowed & keep


_REGISTERED = False


def register() -> str:
    """Register the attention function and its mask builder (idempotent); returns the implementation name."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTN_IMPLEMENTATION, smartkv_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _REGISTERED = True
    return ATTN_IMPLEMENTATION


def use_smartkv_attention(model) -> None:
    """Route `model`'s attention through SmartKV's function (needed for importance tracking)."""
    model.set_attn_implementation(register())
