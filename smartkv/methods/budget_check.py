"""Refuse, before any work, a budget that cannot be met at the length a user asked for.

A SmartKV cache holds its floor (sinks in FP16, every other token at the lowest width) while
the context is too short for its budget, and meets the budget from `budget_holds_from`
tokens on (see smartkv/cache/layer_budget.py). When even the longest context a request can reach
(prompt + max_new_tokens) stays below that length, the budget is never met: that is the
user's to fix (raise the budget, lower `sink_tokens` or the lowest width, or ask for more),
so the CLI and the pipeline raise `BudgetError` here instead of generating.
"""

from __future__ import annotations

import torch

from smartkv.allocate import BudgetError
from smartkv.methods.registry import build_cache


def _kv_geometry(model_config) -> tuple[int, int]:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(heads), int(head_dim)


def _probe_layer(method: str, params: dict, model_config, dtype: torch.dtype):
    """A fresh layer of `method` shaped like the model's (None: the method has no floor to check)."""
    cache = build_cache(method, model_config, **params)
    layers = getattr(cache, "layers", [])
    if not layers or not hasattr(layers[0], "floor_bytes"):
        return None
    heads, head_dim = _kv_geometry(model_config)
    probe = torch.zeros(1, heads, 0, head_dim, dtype=dtype)  # geometry only; the batch cancels out of ratios
    layers[0].lazy_initialization(probe, probe)
    return layers[0]


def budget_holds_from(method: str, params: dict, model_config, dtype: torch.dtype = torch.float32) -> int | None:
    """Fewest tokens from which `method`'s budget can be met (0: no budget; None: at no length)."""
    layer = _probe_layer(method, params, model_config, dtype)
    return 0 if layer is None else layer.budget_holds_from()


def check_budget_reachable(method: str, params: dict, model_config, n_tokens: int,
                           dtype: torch.dtype = torch.float32) -> None:
    """Raise `BudgetError` when the budget cannot be met by `n_tokens` tokens (prompt + new tokens)."""
    layer = _probe_layer(method, params, model_config, dtype)
    frm = 0 if layer is None else layer.budget_holds_from()
    if frm is not None and frm <= n_tokens:
        return
    when = (f"it holds from {frm} tokens on" if frm is not None
            else "it holds at no length: the budget is below the lowest width's cost per token")
    raise BudgetError(
        f"{method}: {layer.floor_message(n_tokens)}, the most this request can reach; {when}. "
        "Raise the budget, lower sink_tokens or the lowest bit width, or generate more tokens"
    )
