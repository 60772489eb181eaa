"""Quantize-then-dequantize a prefilled KV cache in place: a *simulation*, for analysis only.

The measured methods hold bit-packed codes (DESIGN.md decision 2); here we only need to know
what a given precision pattern does to the model's outputs, so every token is quantized with
`smartkv.quantize`'s quantizer (per-token groups along head_dim, asymmetric, FP16 metadata)
and immediately de-quantized back into an ordinary FP16 cache. Nothing here saves memory.

Keys may be rotated over head_dim by a normalized Hadamard matrix H before quantization and
rotated back after (QuaRot, Ashkboos et al. 2024; QuIP#): H is orthogonal, so q·k is
unchanged, but the rotation spreads outlier channels over the group, so a 2-bit grid loses
far less of the key.
"""

from __future__ import annotations

import math

import torch

from smartkv.quantize import quantize_rows


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (orthogonal and symmetric); n a power of 2."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 size, got head_dim={n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def simulate_quantize(x: torch.Tensor, bits: torch.Tensor, group_size: int = 32, rotate: bool = False,
                      symmetric: bool = False) -> torch.Tensor:
    """`x` [B, H, T, D] with token t quantized at `bits[t]` bits and de-quantized (0 = left as is).

    Groups of `group_size` run along head_dim (per-token). With `rotate`, each token's
    head_dim vector is multiplied by a Hadamard matrix before and its inverse after.
    Returns a new tensor in `x`'s dtype.
    """
    if bits.dim() != 1 or bits.shape[0] != x.shape[-2]:
        raise ValueError(f"bits must be one width per token ({x.shape[-2]}), got shape {tuple(bits.shape)}")
    d = x.shape[-1]
    work = x.float()
    rot = hadamard(d) if rotate else None
    if rot is not None:
        work = work @ rot
    out = work.clone()
    for b in bits.unique().tolist():
        if b == 0:
            continue
        sel = bits == b
        part = work[:, :, sel]  # [B, H, n, D]
        rows = quantize_rows(part.reshape(-1, d), int(b), group_size, symmetric).dequantize(torch.float32)
        out[:, :, sel] = rows.view(part.shape)
    if rot is not None:
        out = out @ rot.t()
        # tokens left at full precision go back exactly, not through two float matmuls
        keep = bits == 0
        out[:, :, keep] = x.float()[:, :, keep]
    return out.to(x.dtype)
