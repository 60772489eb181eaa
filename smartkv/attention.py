"""SmartKV's attention function, registered through `transformers`' `AttentionInterface`.

The output is always `transformers`' own SDPA attention over the keys and values the cache
returned, so every method (FP16 included) computes attention the same way and differences
come from the cache alone. When the cache that produced those keys tracks importance, the
function also hands the query, keys and mask to the cache's tracker. No model code is copied
or patched: any model whose attention goes through the interface works (docs/DESIGN.md decision 1).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from smartkv.cache.base import active_update

ATTN_IMPLEMENTATION = "smartkv"


def smartkv_attention(module: torch.nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    active = active_update()
    mine = active is not None and active.keys is key
    if mine and active.drop is not None:
        # evicted tokens (0 bits) hold zeros: mask them out so they get no attention at all
        attention_mask = mask_evicted(attention_mask, active.drop, query.shape[1], query.shape[2])
        active.cache.pending_drop = None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if mine:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        active.cache.observe(active.layer_idx, query, key, attention_mask, scale)
    return out


def mask_evicted(attention_mask, drop: torch.Tensor, query_heads: int, q_len: int) -> torch.Tensor:
    """A boolean mask [B, H_q, q, T] (True = may attend): the model's mask (or plain causal when it
    passed none) minus the evicted positions `drop` [B, H_kv, T] of each KV head's query group."""
    b, hkv, t = drop.shape
    keep = ~drop.repeat_interleave(query_heads // hkv, dim=1)[:, :, None, :]  # [B, H_q, 1, T]
    if attention_mask is None:
        allowed = torch.ones(q_len, t, dtype=torch.bool, device=drop.device).tril(diagonal=t - q_len)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., -t:]
    else:
        allowed = attention_mask[..., -t:] > torch.finfo(attention_mask.dtype).min / 2
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
