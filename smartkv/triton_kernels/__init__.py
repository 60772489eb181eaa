"""Triton GPU kernels (PyPI `triton`, the `gpu` extra), used for CUDA tensors only.

`available()` says whether they may be used: `triton` imports and SMARTKV_NO_KERNEL is not set.
A CUDA run without `triton` falls back to the PyTorch path with one warning (the model still
runs, only slower); the kernel tests fail instead, unless SMARTKV_NO_KERNEL=1 is set on purpose.
Nothing here builds or loads the CPU extension (`smartkv.kernels`).
"""

from __future__ import annotations

import logging

import torch

from smartkv import kernels

log = logging.getLogger(__name__)

MAX_LEVELS = 16  # the unit map keeps the level in 4 bits
_IMPORT_ERROR: str | None = None
_CHECKED = False


def available() -> bool:
    """Whether the Triton kernels may run: `triton` imports and SMARTKV_NO_KERNEL is not set."""
    global _CHECKED, _IMPORT_ERROR
    if kernels.disabled():
        return False
    if not _CHECKED:
        _CHECKED = True
        try:
            import triton  # noqa: F401
        except Exception as exc:  # not installed, or no driver it can use
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
            log.warning("smartkv: triton does not import (%s); CUDA decode attention takes the PyTorch path "
                        "(pip install 'smartkv[gpu]')", _IMPORT_ERROR)
    return _IMPORT_ERROR is None


def can_take(query: torch.Tensor, history) -> bool:
    """Whether the Triton decode-attention kernel handles this query and `PackedHistory` (CUDA or not)."""
    if query.dim() != 4 or query.shape[2] != 1 or query.shape[1] % history.sink_k.shape[1]:
        return False
    if history.unit_len % 8 or len(history.levels) > MAX_LEVELS:
        return False
    groups = set()
    for rows, _ in history.levels:
        # int8 metadata is handed over as its exact FP16 copy (smartkv.packed_attention._fp16_metadata)
        if rows.scale_format not in ("fp16", "int8") or rows.scale.device != query.device or rows.length != history.unit_len:
            return False
        groups.add(rows.group_size)
    return len(groups) <= 1 and available()
