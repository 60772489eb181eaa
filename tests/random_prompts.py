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
