"""An orthogonal rotation of keys over head_dim, applied before quantization and undone on read.

Keys have a few outlier channels (KIVI, KVQuant): per-token groups then spend their range on
them and the other channels fall to one or two levels. Multiplying each key by an orthogonal
matrix spreads every channel's energy over all channels (QuaRot, SpinQuant use a Hadamard
matrix for this), so a group's range is set by the whole vector, not by its outliers. Because
the matrix is orthogonal, q·k is unchanged by rotating both, and undoing it on read is a
multiply by its transpose. Nothing is stored per token: the matrix is a function of head_dim.

head_dim a power of two: the normalised Walsh-Hadamard matrix (Sylvester's construction).
Otherwise: a random orthogonal matrix from a fixed seed (QR of a Gaussian), the same every time.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _rotation(dim: int) -> torch.Tensor:
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return (h / dim**0.5).float()
    g = torch.Generator().manual_seed(dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotation(dim: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """[dim, dim] orthogonal matrix R: rotate with x @ R, undo with y @ R.T."""
    return _rotation(dim).to(dtype=dtype, device=device)
