"""Left padding: which prompt positions of a batch are pads, and the sink-first order of a row.

A batch of prompts of different lengths reaches the cache left-padded: row b holds p_b pad
tokens at positions [0, p_b), then its real tokens. Kept as they are, the pads would be the
row's FP16 "sinks", be stored and charged as context, and stretch the key-smoothing ranges.

The cache learns the pads from the prompt's attention mask (SmartKV's attention function hands
it over, `KVCache.note_padding`): a pad is a key that no query of the prompt may attend. When a
mixed-precision layer first allocates, it reorders each row's prompt tokens into *sink-first*
order (`sink_first_order`): the row's first `sinks` real tokens, then its pads, then the rest.
The pads then sit at the start of the quantized region, where no width holds them: evicted at
width 0 when the bit set has a 0-bit tier, dropped by the store (level GONE) when it does not; the
budget counts real tokens only. A store of a single width has no index to leave a unit out of, so
it holds its pads at that width and counts them as context (smartkv/cache/mixed.py warns).

Keys are stored after the rotary embedding, so where a token sits in the cache does not change
q.k; what must follow the reorder is the attention mask, whose columns are the model's
positions (`permute_columns`), and every per-token statistic (the importance tracker's).
"""

from __future__ import annotations

import torch

from smartkv.importance import may_attend


def left_pads(attention_mask: torch.Tensor | None, t: int) -> tuple[torch.Tensor | None, str]:
    """(pad counts [B] int64 or None, why not) from the mask the prompt's attention was given
    ([B, 1, q, T] bool or additive float; None: no padding). None with a reason where the
    masked positions are not a prefix of each row (right padding, or a mask of another kind)."""
    if attention_mask is None:
        return None, ""
    seen = may_attend(attention_mask[:, 0, :, -t:]).any(dim=-2)  # [B, T]: some query may attend it
    pads = ~seen
    if not bool(pads.any()):
        return None, ""
    counts = pads.sum(dim=-1)
    prefix = torch.arange(t, device=pads.device)[None, :] < counts[:, None]
    if not torch.equal(prefix, pads):
        return None, "the positions no query attends are not a prefix of each row (only left padding is handled)"
    return counts.cpu(), ""


def sink_first_order(pads: torch.Tensor, sinks: int, t: int) -> torch.Tensor:
    """[B, t] int64: new position j of row b holds old position order[b, j]. Each row's first
    `sinks` real tokens come first, then its pads, then its other real tokens, in order. A row
    with fewer than `sinks` real tokens keeps all of them first and some pads in the sink slots."""
    rows = []
    for p in pads.tolist():
        s = min(sinks, t - p)
        rows.append(torch.cat([torch.arange(p, p + s), torch.arange(0, p), torch.arange(p + s, t)]))
    return torch.stack(rows)


def pad_positions(pads: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[B, t] bool, True where the reordered row holds a pad."""
    return order < pads[:, None]


def permute_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`x` [B, ..., T] with its first order.shape[1] columns reordered per row by `order` [B, t]
    (the columns after them, tokens that came later, stay where they are)."""
    b, t = order.shape
    head = order.to(x.device).view(b, *([1] * (x.dim() - 2)), t).expand(*x.shape[:-1], t)
    if x.shape[-1] == t:
        return x.gather(-1, head)
    return torch.cat([x[..., :t].gather(-1, head), x[..., t:]], dim=-1)
