"""Decode attention read straight from a mixed-precision layer's packed codes.

`packed_decode_attention(query, history, scaling)` returns what SDPA over the de-quantized
history returns, and the softmax weights the importance tracker needs, in one C++ call per
layer and step (`smartkv/csrc/packed_attention.cpp`): the full-precision keys and values of
the quantized tokens are never materialised. Scale, zero-point and the per-channel key centre
are folded into the query (q.k per group on the integer codes); values accumulate the
weighted codes and the weighted zero-points per group separately. This is the "fold the
de-quantization into the matmul" idea of KIVI's decode kernels (Liu et al., 2024, "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache") and QServe/Atom-style group-wise
kernels, here for rows of mixed bit widths on CPU with OpenMP over pieces of 256 stored rows per
(batch row, KV head).

`reference_decode_attention` is the PyTorch path (de-quantize, assemble, SDPA, explicit
softmax for the weights): the kernels are tested against it, and it serves CUDA tensors without triton,
SMARTKV_NO_KERNEL=1 and geometries the kernel does not take.

The history is described by `PackedHistory`, which mirrors how `smartkv.cache.mixed` lays a
layer out (sinks, quantized units token-major as in smartkv/cache/units.py, recent window); see its docstring.

Wiring, for a decode step (one query token): `MixedPrecisionLayer.update` (smartkv/cache/mixed.py,
its reads in smartkv/cache/mixed_reads.py) returns zero-cost placeholders
(`torch.zeros(()).expand(B, H, T, D)`) and publishes its `PackedHistory` on the active update
(smartkv/cache/base.py); `smartkv_attention` (smartkv/attention.py) sees it, calls
`packed_decode_attention(query, history, scaling, allowed)` with `allowed` = the model mask's last
query row (None when transformers passes no mask), returns `out.transpose(1, 2)`, and hands the
weights to `ImportanceTracker.observe_weights` instead of `observe` (which would redo q.k). Evicted
(0-bit) units are held at no level and masked inside the kernel (`history.evicts`). Prefill,
multi-token chunks, SMARTKV_NO_KERNEL=1, key rotation, and soft-capped, sliding-window (shorter than
the history), position-bias or dropout attention keep the de-quantize + SDPA path
(`packed_decode=False` forces it).

Scale formats (smartkv/scale_format.py): the kernels read FP16 scales and zero-points. Rows with
"int8" metadata are decoded per call into a transient FP16 copy (`QuantizedRows.as_fp16`, exact:
the decoded values are FP16 by construction; the copy is dropped after the call, so it is no
storage the cache keeps); rows with "bf16" metadata, whose values need not fit FP16, take
`reference_decode_attention`.

On CUDA the same call runs the Triton kernel `smartkv/triton_kernels/packed_attention.py` (same
inputs and outputs, tested against `reference_decode_attention` under Triton's interpreter here and
on CUDA by `scripts/gpu_check.sh`); the CPU extension is never built then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from smartkv import kernels, triton_kernels
from smartkv.quantize import QuantizedRows

_KERNEL_FORMATS = ("fp16", "int8")  # scale formats the kernels read (int8 through `_fp16_metadata`)


@dataclass
class PackedHistory:
    """One layer's keys and values, oldest first: sinks, quantized units, window.

    - `sink_k`, `sink_v`, `win_k`, `win_v`: full-precision [B, Hkv, n, D] (any float dtype).
    - `levels`: (rows, index) per bit width; `rows` holds units of `unit_len` values, `index`
      the int32 unit number of each row, or None when the rows are every unit in order.
    - Units: the quantized tokens' values in token-major order, [n_quant, B, 2, Hkv, D] when
      `head_major` is False (granularity "layer": a unit is a token's K and V over all heads,
      or its K or its V alone with kv_split) and [n_quant, B, Hkv, 2, D] when True
      (granularity "head"), cut into consecutive units of `unit_len` values.
    - `k_shift`, `k_scale`: key smoothing's per-channel centre and half-range [B, Hkv, 1, D]
      (keys = shift + scale * de-quantized), or None.
    - `evicts`: a unit that no level holds was evicted (0 bits): the (batch row, KV head) whose
      slice it held gives that token no attention. False: every unit must be held.
    """

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    levels: list[tuple[QuantizedRows, torch.Tensor | None]]
    n_quant: int
    unit_len: int
    head_major: bool
    win_k: torch.Tensor
    win_v: torch.Tensor
    k_shift: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    evicts: bool = False

    @property
    def length(self) -> int:
        return self.sink_k.shape[-2] + self.n_quant + self.win_k.shape[-2]


def kernel_can_take(query: torch.Tensor, history: PackedHistory) -> bool:
    """Whether a kernel handles this geometry (else the reference path is used): the C++ kernel for
    CPU tensors, the Triton kernel (`smartkv.triton_kernels`) for CUDA tensors when triton imports.
    Rows with BF16 metadata take the reference path; int8 rows are read through their FP16 copy."""
    if query.device.type == "cuda":
        return triton_kernels.can_take(query, history)
    d = query.shape[-1]
    if query.device.type != "cpu" or query.dim() != 4 or query.shape[2] != 1 or d % 8:
        return False
    if query.shape[1] % history.sink_k.shape[1]:
        return False
    for rows, _ in history.levels:
        if rows.scale_format not in _KERNEL_FORMATS or rows.scale.device.type != "cpu" or d % rows.group_size:
            return False
        if rows.length != history.unit_len:
            return False
    return True


def packed_decode_attention(
    query: torch.Tensor, history: PackedHistory, scaling: float, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one decode query per head over `history`.

    query: [B, Hq, 1, D] (Hq a multiple of the KV heads); allowed: bool [B, T] (True = may attend,
    T = history.length) or None. Returns (out [B, Hq, 1, D] in the query's dtype, probs [B, Hq, T]
    float32), as SDPA and softmax(q.k * scaling) over the de-quantized history would; a row with
    nothing allowed gets zeros. CPU tensors go through the C++ kernel (a failed build raises
    KernelBuildError unless SMARTKV_NO_KERNEL=1), CUDA tensors through the Triton kernel when triton
    imports (`smartkv.triton_kernels`; never a CPU build); anything else takes `reference_decode_attention`.
    """
    _check(query, history, allowed)
    takes = kernel_can_take(query, history)
    if takes:
        history = _fp16_metadata(history)  # int8 metadata: a transient FP16 copy, dropped after this call
    if takes and query.device.type == "cuda":
        from smartkv.triton_kernels.packed_attention import triton_decode_attention

        return triton_decode_attention(query, history, scaling, allowed)
    module = kernels.kernel_module() if takes else None
    if module is None:
        return reference_decode_attention(query, history, scaling, allowed)
    b, hq, _, d = query.shape
    planes, bits, scales, zeros, indices = [], [], [], [], []
    symmetric = None
    for rows, index in history.levels:
        if symmetric is None:
            symmetric = rows.symmetric
        elif symmetric != rows.symmetric:
            raise ValueError("every level must be symmetric, or none")
        planes.extend(p if p.stride(-1) == 1 else p.contiguous() for p in rows.planes)
        bits.append(rows.bits)
        scales.append(rows.scale if rows.scale.stride(-1) == 1 else rows.scale.contiguous())
        if not rows.symmetric:
            zeros.append(rows.zero if rows.zero.stride(-1) == 1 else rows.zero.contiguous())
        indices.append(_EMPTY_INDEX if index is None else
                       index if index.dtype == torch.int32 and index.is_contiguous() else index.to(torch.int32).contiguous())
    group = history.levels[0][0].group_size if history.levels else d
    if any(rows.group_size != group for rows, _ in history.levels):
        raise ValueError("every level must share one group size")
    if allowed is not None and not (allowed.dtype == torch.bool and allowed.is_contiguous()):
        allowed = allowed.to(torch.bool).contiguous()
    # the C++ side takes the cache's FP16 sinks, window and key statistics and any float query as they
    # are, and converts them itself: a decode step runs this for every layer, and each op here costs
    out, probs = module.packed_decode_attention(
        query, history.sink_k, history.sink_v, history.win_k, history.win_v,
        planes, bits, scales, zeros, indices, history.n_quant, history.unit_len, history.head_major, group,
        history.k_shift, history.k_scale, allowed, float(scaling), history.evicts,
    )
    out = out.view(b, hq, 1, d)
    return (out if out.dtype == query.dtype else out.to(query.dtype)), probs


_EMPTY_INDEX = torch.empty(0, dtype=torch.int32)


def _fp16_metadata(history: PackedHistory) -> PackedHistory:
    """`history` with every int8-metadata level as its exact FP16 copy (itself when there is none)."""
    if all(rows.scale_format == "fp16" for rows, _ in history.levels):
        return history
    return dataclasses.replace(history, levels=[(rows.as_fp16(), index) for rows, index in history.levels])


def _check(query: torch.Tensor, history: PackedHistory, allowed: torch.Tensor | None) -> None:
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be [B, Hq, 1, D] (one decode query), got shape {tuple(query.shape)}")
    b, hkv, _, d = history.sink_k.shape
    if query.shape[0] != b or query.shape[-1] != d or query.shape[1] % hkv:
        raise ValueError(f"query {tuple(query.shape)} does not fit a history of [B={b}, Hkv={hkv}, D={d}]")
    if allowed is not None and tuple(allowed.shape) != (b, history.length):
        raise ValueError(f"allowed must be [B, T] = [{b}, {history.length}], got shape {tuple(allowed.shape)}")


def decode_kernel_ready(device: torch.device) -> bool:
    """Whether a packed-code kernel serves tensors on `device`: the C++ extension on CPU (built on
    first call; a failed build raises KernelBuildError unless SMARTKV_NO_KERNEL=1), Triton on CUDA."""
    if device.type == "cuda":
        return triton_kernels.available()
    return device.type == "cpu" and kernels.kernel_module() is not None


def dequantized_history(history: PackedHistory, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The full keys and values [B, Hkv, T, D] the history stands for (the PyTorch path)."""
    b, h, _, d = history.sink_k.shape
    n = history.n_quant
    parts_k, parts_v = [history.sink_k.to(dtype)], [history.sink_v.to(dtype)]
    if n:
        n_units = n * b * 2 * h * d // history.unit_len
        make = torch.zeros if history.evicts else torch.empty  # evicted units read as zeros
        buf = make(n_units, history.unit_len, dtype=dtype, device=history.sink_k.device)
        for rows, index in history.levels:
            if rows.n_rows:
                rows.dequantize_into(buf, index)
        shape = (n, b, h, 2, d) if history.head_major else (n, b, 2, h, d)
        kv = buf.view(shape)
        k, v = (kv[:, :, :, 0], kv[:, :, :, 1]) if history.head_major else (kv[:, :, 0], kv[:, :, 1])
        k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [B, H, n, D]
        if history.k_shift is not None:
            k = torch.addcmul(history.k_shift.to(dtype), k, history.k_scale.to(dtype))
        parts_k.append(k)
        parts_v.append(v)
    parts_k.append(history.win_k.to(dtype))
    parts_v.append(history.win_v.to(dtype))
    return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)


def evicted_positions(history: PackedHistory) -> torch.Tensor | None:
    """[B, Hkv, T] bool, True where a token's slice sits in a unit no level holds (evicted); None if none."""
    b, h, s, d = history.sink_k.shape
    n = history.n_quant
    if not history.evicts or n == 0:
        return None
    n_units = n * b * 2 * h * d // history.unit_len
    held = torch.zeros(n_units, dtype=torch.bool, device=history.sink_k.device)
    for rows, index in history.levels:
        held[torch.arange(rows.n_rows) if index is None else index.long()] = True
    if bool(held.all()):
        return None
    flags = (~held)[:, None].expand(n_units, history.unit_len)
    shape = (n, b, h, 2, d) if history.head_major else (n, b, 2, h, d)
    k = flags.reshape(shape)[:, :, :, 0, 0] if history.head_major else flags.reshape(shape)[:, :, 0, :, 0]
    out = torch.zeros(b, h, history.length, dtype=torch.bool, device=history.sink_k.device)
    out[:, :, s : s + n] = k.permute(1, 2, 0)
    return out


def reference_decode_attention(
    query: torch.Tensor, history: PackedHistory, scaling: float, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path: de-quantize the history, SDPA for the output, an explicit softmax for the weights."""
    _check(query, history, allowed)
    k, v = dequantized_history(history, query.dtype)
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)).squeeze(2) * scaling  # [B, Hq, T]
    keep = None if allowed is None else allowed.bool()[:, None, :].expand_as(scores)  # [B, Hq, T]
    gone = evicted_positions(history)
    if gone is not None:
        kept = ~gone.repeat_interleave(groups, dim=1)
        keep = kept if keep is None else keep & kept
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    live = torch.isfinite(scores.amax(dim=-1, keepdim=True))
    probs = torch.where(live, torch.softmax(scores, dim=-1), torch.zeros_like(scores)).nan_to_num_(0.0)
    mask = None if keep is None else keep[:, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    out = torch.where(live.unsqueeze(-1), out, torch.zeros_like(out))
    return out, probs


def tracker_mass(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-KV-head attention mass [B, Hkv, T] from per-query-head weights [B, Hq, T] (what the tracker adds)."""
    b, hq, t = probs.shape
    return probs.view(b, kv_heads, hq // kv_heads, t).sum(dim=2)
