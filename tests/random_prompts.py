"""Random token prompts for the tiny test models (imported by test files; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def left_padded(lengths, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of `lengths` tokens (ids 3..249), left-padded to the longest with pad id 0;
    drawn from `generator`, so a caller can keep drawing from it afterwards."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 250, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


@torch.no_grad()
def decode_logits(model, cache, ids, mask, fed) -> torch.Tensor:
    """Prefill `ids`, then feed `fed` [B, steps] one token per forward pass through `cache`;
    the logits of every decode step [B, steps, V]."""
    model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits = []
    for step in range(fed.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=fed[:, step : step + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)
