"""Unit layout: how a layer's K and V become the rows the packed store quantizes, and back.

A *unit* is the block of values that shares one precision: a token's K and V over all KV
heads (`granularity="layer"`), or per KV head (`"head"`), with K and V together or apart
(`kv_split`). Units are numbered token-major, so numbers never change as tokens arrive.
A unit's values are split into groups of `group` values (one scale and zero each); a group
never straddles two heads.

Keys may be transformed before quantization and restored on read, both undone exactly in
`from_units`: smoothed per channel (centre and half-range from the prefill, held by the layer
as `k_shift` / `k_scale`; KIVI and KVQuant find outlier key channels) and rotated over head_dim
by an orthogonal matrix (smartkv/rotation.py; QuaRot). docs/DESIGN.md, "Lessons": the 2-bit
tier with per-token keys collapses unless keys are treated first.
"""

from __future__ import annotations

import torch

from smartkv.cache.mixed_spec import MixedSpec
from smartkv.rotation import rotation


class UnitLayout:
    """The unit geometry of one layer (fixed once its heads and head_dim are known)."""

    def __init__(self, spec: MixedSpec, heads: int, head_dim: int, device) -> None:
        if head_dim % spec.group_size and spec.group_size < head_dim:
            raise ValueError(
                f"group_size {spec.group_size} must divide head_dim {head_dim} (or be >= it), "
                "so that no group straddles two heads"
            )
        self.heads, self.head_dim = heads, head_dim
        self.by_head = spec.granularity == "head"
        self.group = min(spec.group_size, head_dim)
        per_head = 1 if spec.kv_split else 2
        if self.by_head:
            self.units_per_token = heads * (2 if spec.kv_split else 1)
            self.unit_len = head_dim * per_head
        else:
            self.units_per_token = 2 if spec.kv_split else 1
            self.unit_len = heads * head_dim * per_head
        # token-major permutation of a stacked [2, B, H, n, D] block of K and V
        self.perm = (3, 1, 2, 0, 4) if self.by_head else (3, 1, 0, 2, 4)
        # key rotation [D, D], a function of head_dim (not stored per token)
        self.rot: torch.Tensor | None = rotation(head_dim, torch.float32, device) if spec.key_rotation else None

    def to_units(self, k: torch.Tensor, v: torch.Tensor, k_shift: torch.Tensor | None,
                 k_scale: torch.Tensor | None) -> torch.Tensor:
        """[B, H, n, D] K and V -> [n * units_per_row, unit_len], token-major (keys smoothed, rotated)."""
        if self.rot is None:
            return self._to_units_direct(k, v, k_shift, k_scale)
        if k_scale is not None:
            k = (k.float() - k_shift.float()) / k_scale.float()
        k = k.float() @ self.rot
        if k.dtype != v.dtype:
            k, v = k.float(), v.float()
        return torch.stack([k, v]).permute(self.perm).reshape(-1, self.unit_len)

    def _to_units_direct(self, k: torch.Tensor, v: torch.Tensor, k_shift: torch.Tensor | None,
                         k_scale: torch.Tensor | None) -> torch.Tensor:
        """`to_units` without key rotation, written straight into the token-major layout: K and V
        are copied once each and the keys smoothed in place, the same float32 operations as
        `(k.float() - shift) / scale` then stack and reshape (bit-identical), with three fewer
        full-size temporaries (the first allocation passes the whole prompt through here)."""
        b, h, n, d = k.shape
        smooth = k_scale is not None
        dtype = torch.float32 if smooth or k.dtype != v.dtype else k.dtype
        shape = (n, b, h, 2, d) if self.by_head else (n, b, 2, h, d)
        units = torch.empty(shape, dtype=dtype, device=k.device)
        kv = units.permute([self.perm.index(i) for i in range(5)])  # [2, B, H, n, D] view of `units`
        kv[0].copy_(k)
        kv[1].copy_(v)
        if smooth:
            kv[0].sub_(k_shift.float()).div_(k_scale.float())
        return units.view(-1, self.unit_len)

    def from_units(self, units: torch.Tensor, batch: int, n: int, k_shift: torch.Tensor | None,
                   k_scale: torch.Tensor | None, restore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `to_units` for `n` tokens of `batch` rows; `restore=False` skips undoing the
        key rotation and smoothing (for per-position labels such as bit widths, which are not values)."""
        b, h, d = batch, self.heads, self.head_dim
        shape = (n, b, h, 2, d) if self.by_head else (n, b, 2, h, d)
        inverse = [self.perm.index(i) for i in range(5)]
        kv = units.reshape(shape).permute(inverse)
        k, v = kv[0], kv[1]
        if not restore:
            return k, v
        if self.rot is not None:
            k = k @ self.rot.t().to(k.dtype)
        if k_scale is not None:
            k = torch.addcmul(k_shift.to(k.dtype), k, k_scale.to(k.dtype))
        return k, v
