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
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    active = active_update()
    if active is not None and active.keys is key:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        active.cache.observe(active.layer_idx, query, key, attention_mask, scale)
    return out


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
