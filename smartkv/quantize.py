"""Group-wise integer quantization with real bit packing.

One quantizer serves every method (docs/DESIGN.md decision 4): uniform INTk, KIVI and SmartKV
differ only in how they lay a KV tensor out as rows, never in how a row is quantized.

A row of `length` values is cut into groups of `group_size` along the row (the last group
may be shorter). Each group gets a scale and, when asymmetric, a zero-point (the group
minimum, as in KIVI), stored as FP16 by default, or BF16, or 8-bit codes with a few FP16
constants shared by the row (`scale_format`; smartkv/scale_format.py). Codes are packed as *bit planes*: a b-bit code is split
into planes of 8, 4, 2 and 1 bits (3 = 2 + 1, 5 = 4 + 1, ...), and every plane is packed
densely into uint8. So a 3-bit code costs exactly 3 bits (not 4), and unpacking is a few
shift-and-mask passes over uint8, with no cross-byte arithmetic.

Shapes: `quantize_rows(x[N, L])` -> `QuantizedRows` holding `planes[i]: uint8[N, ceil(L*w_i/8)]`,
`scale: fp16[N, n_groups]`, `zero: fp16[N, n_groups] | None` (bf16 for "bf16"; uint8 codes plus
`shared: fp16[N, 1 or 3]` for "int8").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv import kernels
from smartkv import scale_format as meta

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
SCALE_FORMATS = meta.SCALE_FORMATS
_KERNEL_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Decompose a bit width into plane widths of 8/4/2/1 bits, most significant first."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits!r} is not supported; allowed: {SUPPORTED_BITS}")
    widths, rest = [], bits
    for w in (8, 4, 2, 1):
        if rest >= w:
            widths.append(w)
            rest -= w
    return tuple(widths)


def packed_row_bytes(length: int, bits: int) -> int:
    """Bytes of packed codes for one row of `length` values at `bits` bits."""
    return sum(-(-length * w // 8) for w in plane_widths(bits))


def n_groups(length: int, group_size: int) -> int:
    return -(-length // group_size)


def row_nbytes(length: int, bits: int, group_size: int, symmetric: bool = False, scale_format: str = "fp16") -> int:
    """Total bytes one quantized row holds: packed codes + scale (+ zero-point) per group in
    `scale_format` (+ int8's shared per-row constants)."""
    groups = n_groups(length, group_size)
    return packed_row_bytes(length, bits) + meta.row_metadata_bytes(groups, symmetric, scale_format)


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """codes: uint8 [N, L] with values < 2**width -> uint8 [N, ceil(L*width/8)]."""
    per_byte = 8 // width
    n, length = codes.shape
    pad = (-length) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * width
    grouped = codes.view(n, -1, per_byte) << shifts
    return grouped.sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: sum == bitwise or


def _unpack_plane(packed: torch.Tensor, width: int, length: int) -> torch.Tensor:
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * width
    mask = (1 << width) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.view(packed.shape[0], -1)[:, :length]


_TABLES: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def _code_table(width: int, shift: int, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8 // width] table: the `width`-bit fields of each byte value, times 2**shift."""
    key = (width, shift, dtype)
    if key not in _TABLES:
        per_byte = 8 // width
        byte = torch.arange(256).unsqueeze(1)
        fields = (byte >> (torch.arange(per_byte) * width)) & ((1 << width) - 1)
        _TABLES[key] = (fields << shift).to(dtype)
    return _TABLES[key]


@dataclass
class QuantizedRows:
    """Rows of `length` values quantized at `bits` bits in groups of `group_size`.

    `scale`/`zero` hold the metadata as stored in `scale_format` (FP16/BF16 values, or uint8
    codes for "int8", with the row's shared FP16 constants in `shared`); `scale_values()` and
    `zero_values()` give the values the codes were computed against.
    """

    planes: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    length: int
    group_size: int
    scale_format: str = "fp16"
    shared: torch.Tensor | None = None  # int8: per row [top] (symmetric) or [top, z0, dz], FP16

    @property
    def n_rows(self) -> int:
        return self.scale.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def metadata_nbytes(self) -> int:
        """Bytes of scales, zero-points and shared constants."""
        total = self.scale.nbytes + (self.zero.nbytes if self.zero is not None else 0)
        return total + (self.shared.nbytes if self.shared is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: packed planes, scales, zero-points, shared constants."""
        return sum(p.nbytes for p in self.planes) + self.metadata_nbytes

    def scale_values(self) -> torch.Tensor:
        """The scales the codes use, [N, n_groups] (FP16, or BF16 for "bf16")."""
        return meta.decode_scale(self.scale, self.shared, self.scale_format)

    def zero_values(self) -> torch.Tensor | None:
        """The zero-points the codes use, [N, n_groups], or None (symmetric)."""
        return meta.decode_zero(self.zero, self.shared, self.scale_format)

    def as_fp16(self) -> "QuantizedRows":
        """The same rows with FP16 metadata, exactly (same codes, same de-quantized values): what the
        kernels read for "int8" rows, whose decoded scales and zero-points are FP16 values by
        construction. A transient copy: nothing keeps it."""
        if self.scale_format == "fp16":
            return self
        if self.scale_format != "int8":
            raise ValueError(f"{self.scale_format} metadata does not convert to FP16 exactly")
        return QuantizedRows(self.planes, self.scale_values(), self.zero_values(), self.bits, self.length,
                             self.group_size)

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes, uint8 [N, length]."""
        widths = plane_widths(self.bits)
        out = None
        shift = self.bits
        for plane, w in zip(self.planes, widths):
            shift -= w
            part = _unpack_plane(plane, w, self.length)
            part = part << shift if shift else part
            out = part if out is None else out | part
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """De-quantized values, [N, length] in `dtype`.

        Codes go straight from packed bytes to floats through a 256-entry table per plane
        (one embedding look-up), then scale and zero-point are applied in place: on CPU this
        is about 3x faster than shift/mask/convert followed by a broadcasting addcmul.
        """
        n, length, g = self.n_rows, self.length, self.group_size
        groups = self.scale.shape[1]
        work = torch.float32  # bf16 arithmetic would add errors of ~1% of the zero-point
        c = None
        shift = self.bits
        for plane, w in zip(self.planes, plane_widths(self.bits)):
            shift -= w
            part = torch.nn.functional.embedding(plane.int(), _code_table(w, shift, work)).view(n, -1)
            if part.shape[1] != length:  # planes pad to whole bytes, each by its own amount
                part = part[:, :length]
            c = part if c is None else c.add_(part)
        padded = groups * g
        if padded != length:
            c = torch.nn.functional.pad(c, (0, padded - length))
        c = c.view(n, groups, g)
        scale = self.scale_values()
        if self.zero is None:
            offset = float(2 ** (self.bits - 1) - 1) if self.bits > 1 else 0.0
            c.sub_(offset).mul_(scale.to(work).unsqueeze(-1))
        else:
            c.mul_(scale.to(work).unsqueeze(-1)).add_(self.zero_values().to(work).unsqueeze(-1))
        out = c.view(n, padded)
        if padded != length:
            out = out[:, :length]
        return out if out.dtype == dtype else out.to(dtype)

    def dequantize_into(self, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Write the de-quantized rows into `out[index[i]]` (or `out[i]` when `index` is None); returns `out`.

        `out` is [M, length]; `index` holds `n_rows` distinct row numbers (int32 or int64) or is
        None. The result equals `out.index_copy_(0, index.long(), self.dequantize(out.dtype))`
        exactly. A float32/bfloat16/float16 CPU `out` with contiguous rows goes through the fused
        C++ kernel (`smartkv.kernels`; a failed build raises KernelBuildError unless
        SMARTKV_NO_KERNEL=1); other devices and dtypes, or SMARTKV_NO_KERNEL=1, take the PyTorch path.
        "int8" metadata is decoded to a transient FP16 copy for the kernel; "bf16" takes the PyTorch path.
        """
        if out.dim() != 2 or out.shape[1] != self.length:
            raise ValueError(f"out must be [M, {self.length}], got shape {tuple(out.shape)}")
        if index is not None and (index.dim() != 1 or index.shape[0] != self.n_rows):
            raise ValueError(f"index must hold {self.n_rows} row numbers, got shape {tuple(index.shape)}")
        if self.scale_format == "int8":
            return self.as_fp16().dequantize_into(out, index)
        # Device and dtype first: a CUDA run never builds the CPU extension.
        module = kernels.kernel_module() if self._kernel_can_write(out, index) else None
        if module is None:
            return self._dequantize_into_reference(out, index)
        planes = [p if p.stride(-1) == 1 else p.contiguous() for p in self.planes]
        scale = self.scale if self.scale.stride(-1) == 1 else self.scale.contiguous()
        zero = self.zero
        if zero is not None and zero.stride(-1) != 1:
            zero = zero.contiguous()
        if index is not None and not index.is_contiguous():
            index = index.contiguous()
        module.dequantize_into(planes, list(plane_widths(self.bits)), scale, zero, self.bits, self.length,
                               self.group_size, out, index)
        return out

    def _kernel_can_write(self, out: torch.Tensor, index: torch.Tensor | None) -> bool:
        if out.device.type != "cpu" or out.dtype not in _KERNEL_OUT_DTYPES or out.stride(1) != 1:
            return False
        if self.scale.device.type != "cpu" or self.scale.dtype != torch.float16:
            return False
        return index is None or (index.device.type == "cpu" and index.dtype in (torch.int32, torch.int64))

    def _dequantize_into_reference(self, out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The PyTorch path of `dequantize_into`."""
        deq = self.dequantize(out.dtype)
        if index is None:
            out[: self.n_rows] = deq
        else:
            out.index_copy_(0, index.long(), deq)
        return out

    def select(self, index: torch.Tensor) -> "QuantizedRows":
        """The rows at `index` (a bool mask or integer indices)."""
        return QuantizedRows(
            tuple(p[index] for p in self.planes),
            self.scale[index],
            None if self.zero is None else self.zero[index],
            self.bits,
            self.length,
            self.group_size,
            self.scale_format,
            None if self.shared is None else self.shared[index],
        )

    def cat_rows(self, other: "QuantizedRows") -> "QuantizedRows":
        """Rows of `self` followed by the rows of `other` (same bits, length and grouping)."""
        self._check_compatible(other)
        return QuantizedRows(
            tuple(torch.cat([a, b]) for a, b in zip(self.planes, other.planes)),
            torch.cat([self.scale, other.scale]),
            None if self.zero is None else torch.cat([self.zero, other.zero]),
            self.bits,
            self.length,
            self.group_size,
            self.scale_format,
            None if self.shared is None else torch.cat([self.shared, other.shared]),
        )

    def cat_length(self, other: "QuantizedRows") -> "QuantizedRows":
        """Each row extended by the same row of `other` (KIVI's per-channel keys grow along tokens).

        Needs `self.length` to be a multiple of the group size and of 8 values, so that the
        packed bytes and groups of both parts line up.
        """
        if self.length % self.group_size or self.length % 8:
            raise ValueError(
                f"cannot extend rows of length {self.length}: it must be a multiple of the group size "
                f"{self.group_size} and of 8"
            )
        if other.bits != self.bits or other.group_size != self.group_size or other.symmetric != self.symmetric:
            raise ValueError("cannot extend rows with rows of another bit width or grouping")
        if self.scale_format != "fp16" or other.scale_format != "fp16":
            raise ValueError("only rows with FP16 metadata can be extended: int8 constants are shared by a whole row")
        return QuantizedRows(
            tuple(torch.cat([a, b], dim=1) for a, b in zip(self.planes, other.planes)),
            torch.cat([self.scale, other.scale], dim=1),
            None if self.zero is None else torch.cat([self.zero, other.zero], dim=1),
            self.bits,
            self.length + other.length,
            self.group_size,
        )

    def _check_compatible(self, other: "QuantizedRows") -> None:
        if (other.bits, other.length, other.group_size, other.symmetric, other.scale_format) != (
            self.bits,
            self.length,
            self.group_size,
            self.symmetric,
            self.scale_format,
        ):
            raise ValueError("cannot concatenate rows of another bit width, length, grouping or scale format")


def quantize_rows(x: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  scale_format: str = "fp16") -> QuantizedRows:
    """Quantize each row of `x` [N, L] in groups of `group_size` values along the row.

    Asymmetric: code = round((x - min) / scale), scale = (max - min) / (2**bits - 1), so that
    every value comes back within half a step. The stored zero-point is rounded down and the
    scale up, so that storing the metadata never pushes a code out of range; the codes are
    computed against the metadata as stored (for "int8": as decoded, smartkv/scale_format.py).
    Symmetric: code = round(x / scale) + 2**(bits-1) - 1, scale = absmax / (2**(bits-1) - 1).

    CPU tensors with FP16 metadata go through one fused C++ pass (`smartkv/csrc/quantize.cpp`,
    bit-identical for finite values; a failed build raises KernelBuildError unless
    SMARTKV_NO_KERNEL=1); the PyTorch code below serves other devices, the other scale formats and
    SMARTKV_NO_KERNEL=1, and is what the kernel is tested against.
    """
    plane_widths(bits)  # validates
    meta.check_format(scale_format)
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor [rows, length], got shape {tuple(x.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs at least 2 bits")
    n, length = x.shape
    fused = scale_format == "fp16" and x.device.type == "cpu" and x.is_floating_point()
    module = kernels.kernel_module() if fused else None
    if module is not None:  # the fused C++ pass (smartkv/csrc/quantize.cpp), bit-identical to the code below
        parts = module.quantize_rows(x.float().contiguous(), bits, group_size, symmetric)  # planes, scale[, zero]
        zero = None if symmetric else parts.pop()
        scale = parts.pop()
        return QuantizedRows(tuple(parts), scale, zero, bits, length, group_size)
    groups = n_groups(length, group_size)
    xf = x.float()
    pad = groups * group_size - length
    if pad:
        # Repeat the row's last value: it cannot change the last group's min, max or absmax.
        xf = torch.cat([xf, xf[:, -1:].expand(n, pad)], dim=1)
    xg = xf.view(n, groups, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale, shared, step = meta.encode_symmetric(xg.abs().amax(dim=-1), qmax, scale_format)
        codes = torch.round(xg / step.unsqueeze(-1)).clamp(-qmax, qmax) + qmax
        zero = None
    else:
        qmax = 2**bits - 1
        scale, zero, shared, step, low = meta.encode_asymmetric(xg.amin(dim=-1), xg.amax(dim=-1), qmax, scale_format)
        codes = torch.round((xg - low.unsqueeze(-1)) / step.unsqueeze(-1)).clamp(0, qmax)
    codes = codes.to(torch.uint8).view(n, groups * group_size)[:, :length]
    planes = []
    shift = bits
    for w in plane_widths(bits):
        shift -= w
        planes.append(_pack_plane(((codes >> shift) & ((1 << w) - 1)).contiguous(), w))
    return QuantizedRows(tuple(planes), scale, zero, bits, length, group_size, scale_format, shared)


@dataclass
class QuantizedTensor:
    """A tensor of any shape quantized in groups along one axis (a thin wrapper for callers and tests)."""

    rows: QuantizedRows
    shape: tuple[int, ...]
    axis: int

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        moved = list(self.shape)
        moved.append(moved.pop(self.axis))
        return self.rows.dequantize(dtype).view(moved).movedim(-1, self.axis)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1, symmetric: bool = False,
             scale_format: str = "fp16") -> QuantizedTensor:
    """Quantize `x` in groups of `group_size` consecutive values along `axis`.

    axis=-1 on a [B, H, T, D] KV tensor is per-token grouping (over head_dim); axis=-2 is
    per-channel grouping (over tokens), as KIVI does for keys.
    """
    axis = axis % x.dim()
    moved = x.movedim(axis, -1).contiguous()
    rows = quantize_rows(moved.view(-1, moved.shape[-1]), bits, group_size, symmetric, scale_format)
    return QuantizedTensor(rows, tuple(x.shape), axis)
