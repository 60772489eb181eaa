"""How a quantized row stores its per-group scales and zero-points: FP16, BF16 or 8-bit codes.

Every group of a quantized row needs a scale and (asymmetric) a zero-point. Stored as FP16
they cost 4 bytes per group: with groups of 64 over 2-bit codes that is a quarter of the
row. The format is a choice (`SmartKVConfig.scale_format`):

- `fp16` (default): one FP16 scale and zero-point per group, as KIVI stores them.
- `bf16`: the same bytes, BF16's range and 8-bit mantissa (no saving; for models whose
  values leave FP16's range).
- `int8`: *double quantization* (QLoRA, Dettmers et al. 2023, "QLoRA: Efficient Finetuning
  of Quantized LLMs", which quantizes its blockwise absmax constants to 8 bits with one FP32
  constant per 256 blocks). Here one row shares a few FP16 constants, and each group keeps
  8-bit codes:
    * scale: a shared FP16 top `t` (the row's largest scale, rounded up) and per group a code
      c in 0..255 on a logarithmic grid, scale = fp16_up(t * 2**(-c/16)): a relative step of
      4.4 % over a range of 2**16 below the top (a shared FP16 exponent, in effect, with
      1/16-octave resolution). Logarithmic because a row holds K and V groups whose ranges
      differ by an order of magnitude: a linear grid would round the small ones up by up to
      the top's 1/255 step, a large relative error where the range is small.
    * zero-point: a shared FP16 offset z0 (the row's lowest group minimum, rounded down) and
      step dz (the spread of the group minima / 255, rounded up), and per group a code c in
      0..255, zero = fp16_down(z0 + c * dz) <= the group minimum. The gap below the minimum
      (up to dz) widens that group's step by up to dz / qmax: a narrow group in a row whose
      minima spread widely pays for it. On SmolLM2's smoothed keys and values (1k tokens, units
      of a token's K and V over all heads) int8 metadata raised the squared error by 3-8 %.
  Bytes per row: 1 (scale) + 1 (zero) per group, plus 2 (symmetric: the top) or 6 (the top,
  z0, dz) shared. A row of fewer than 3 groups (asymmetric) costs more than FP16 this way.

The codes are computed against the metadata as stored (de-quantized), not the FP16 values it
approximates: the zero-point is fixed first (a code rounded down), the scale then covers
`max - zero` (a code rounded up), so every value still comes back within half of its own
group's step. The error the format causes is that looser step, and nothing else.

Every effective value is FP16-representable by construction (rounded to FP16 at decode), so
an int8 row converts exactly to an FP16 row (`QuantizedRows.as_fp16`): the C++ and Triton
kernels read that transient copy, which is rebuilt per call and never kept.
"""

from __future__ import annotations

import torch

SCALE_FORMATS = ("fp16", "bf16", "int8")
STORE_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.uint8}
SHARED_DTYPE = torch.float16  # int8's per-row constants
LOG_STEPS_PER_OCTAVE = 16
_CODES = 256
# 2**(-c/16) for c = 0..255, as float32 constants: one IEEE multiply by the top is the same on every device
_LOG_GRID = torch.exp2(-torch.arange(_CODES, dtype=torch.float64) / LOG_STEPS_PER_OCTAVE).float()
_MAX = {torch.float16: 65504.0, torch.bfloat16: float(torch.finfo(torch.bfloat16).max)}


def check_format(fmt: str) -> None:
    if fmt not in SCALE_FORMATS:
        raise ValueError(f"scale format {fmt!r} is not supported; allowed: {SCALE_FORMATS}")


def row_metadata_bytes(groups: int, symmetric: bool, fmt: str) -> int:
    """Bytes of scales and zero-points one row of `groups` groups holds in format `fmt`."""
    check_format(fmt)
    per_group = 1 if symmetric else 2
    if fmt == "int8":
        return groups * per_group + SHARED_DTYPE.itemsize * (1 if symmetric else 3)
    return groups * per_group * STORE_DTYPE[fmt].itemsize


def round_to(x: torch.Tensor, dtype: torch.dtype, direction: str) -> torch.Tensor:
    """Float32 `x` as the nearest `dtype` (fp16/bf16) value not above ("down") or below ("up") it."""
    big = _MAX[dtype]
    x = x.clamp(-big, big)
    h = x.to(dtype)
    if direction == "down":
        return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


# --- int8: decode -------------------------------------------------------------------------
def _scale_from_codes(codes: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """FP16 scales [N, G] from log-grid codes [N, G] and the row's FP16 top [N]."""
    grid = _LOG_GRID.to(codes.device)[codes.long()]
    return round_to(top.float().unsqueeze(-1) * grid, torch.float16, "up")


def _zero_from_codes(codes: torch.Tensor, z0: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """FP16 zero-points [N, G] from linear codes [N, G] and the row's FP16 offset and step [N]."""
    return round_to(z0.float().unsqueeze(-1) + codes.float() * dz.float().unsqueeze(-1), torch.float16, "down")


def decode_scale(scale: torch.Tensor, shared: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The scales a row really uses, in the FP16/BF16 dtype they are exact in ([N, G])."""
    return _scale_from_codes(scale, shared[:, 0]) if fmt == "int8" else scale


def decode_zero(zero: torch.Tensor | None, shared: torch.Tensor | None, fmt: str) -> torch.Tensor | None:
    if zero is None or fmt != "int8":
        return zero
    return _zero_from_codes(zero, shared[:, 1], shared[:, 2])


# --- encode -------------------------------------------------------------------------------
def _positive(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def _scale_codes(need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-grid codes whose scale is >= `need` [N, G] (float32, >= 0): (codes uint8, top fp16 [N], scales fp16)."""
    top = _positive(round_to(need.amax(dim=-1), torch.float16, "up"))
    ratio = top.float().unsqueeze(-1) / need.clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.floor(LOG_STEPS_PER_OCTAVE * torch.log2(ratio)).clamp(0, _CODES - 1).long()
    # log2 in float32 may land a code one off either way: step up where the next code still covers
    # `need`, then down until every scale does (code 0 is the top itself, which covers every group)
    up = (codes + 1).clamp_max(_CODES - 1)
    codes = torch.where(_scale_from_codes(up, top).float() >= need, up, codes)
    while True:
        short = _scale_from_codes(codes, top).float() < need
        if not bool(short.any()):
            break
        codes = torch.where(short, codes - 1, codes)
    return codes.to(torch.uint8), top, _scale_from_codes(codes, top)


def _zero_codes(lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear codes whose zero-point is <= the group minimum `lo` [N, G]: (codes uint8, z0, dz, zeros fp16)."""
    z0 = round_to(lo.amin(dim=-1), torch.float16, "down")
    dz = _positive(round_to((lo.amax(dim=-1) - z0.float()) / (_CODES - 1), torch.float16, "up"))
    codes = torch.floor((lo - z0.float().unsqueeze(-1)) / dz.float().unsqueeze(-1)).clamp(0, _CODES - 1).long()
    while True:  # rounding may put a zero-point above its minimum; code 0 is z0 itself, below all
        over = _zero_from_codes(codes, z0, dz).float() > lo
        if not bool(over.any()):
            break
        codes = torch.where(over, codes - 1, codes)
    return codes.to(torch.uint8), z0, dz, _zero_from_codes(codes, z0, dz)


def encode_asymmetric(lo: torch.Tensor, hi: torch.Tensor, qmax: int, fmt: str):
    """Metadata of groups with minima `lo` and maxima `hi` [N, G] (float32) for codes 0..qmax.

    Returns (scale, zero, shared, eff_scale, eff_zero): what the row stores (shared: int8's per-row
    constants, else None) and the float32 scale and zero-point the codes must be computed against.
    """
    if fmt == "int8":
        zcodes, z0, dz, zero = _zero_codes(lo)
        scodes, top, scale = _scale_codes((hi - zero.float()) / qmax)
        return scodes, zcodes, torch.stack([top, z0, dz], dim=-1), scale.float(), zero.float()
    dtype = STORE_DTYPE[fmt]
    zero = round_to(lo, dtype, "down")
    scale = _positive(round_to((hi - zero.float()) / qmax, dtype, "up"))
    return scale, zero, None, scale.float(), zero.float()


def encode_symmetric(absmax: torch.Tensor, qmax: int, fmt: str):
    """Metadata for codes -qmax..qmax: (scale, shared, eff_scale)."""
    if fmt == "int8":
        codes, top, scale = _scale_codes(absmax / qmax)
        return codes, top.unsqueeze(-1), scale.float()
    scale = _positive(round_to(absmax / qmax, STORE_DTYPE[fmt], "up"))
    return scale, None, scale.float()
