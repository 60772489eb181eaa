"""Reading a mixed-precision layer back for attention: de-quantized tensors, or the packed codes.

Two paths, chosen per `update` by `MixedPrecisionLayer` (smartkv/cache/mixed.py):

- `_assemble`: the whole history as full-size tensors (sinks, the quantized region through the
  fused C++ de-quantization, the window), then SDPA. Prefill, multi-token chunks, and any
  attention the kernel does not take (`materialize`).
- a single-token decode step where a kernel can take the layout: zero-cost placeholders
  (`_placeholders`), and SmartKV's attention function reads the `PackedHistory` straight from
  the packed codes (`attend_packed`; smartkv/packed_attention.py: the C++ kernel on CPU, Triton
  on CUDA), with the importance tracker's softmax weights from the same pass.

Evicted (0-bit) tokens are masked out of attention on both paths (`drop`, smartkv/attention.py).
`LayerReads` is a mixin of `MixedPrecisionLayer`: it reads the layer's sinks, window and store.
"""

from __future__ import annotations

import torch

from smartkv.packed_attention import PackedHistory, decode_kernel_ready, kernel_can_take, packed_decode_attention


class LayerReads:
    """The history a `MixedPrecisionLayer` hands to attention."""

    # --- decode from the packed codes ---------------------------------------------------------
    @property
    def attends_packed(self) -> bool:
        """Whether decode steps may attend on the packed codes (key rotation is not folded into the kernel)."""
        return self.spec.packed_decode and not self.spec.key_rotation

    def _packed_history(self) -> PackedHistory | None:
        """This layer's history as the kernel reads it, or None where the de-quantize + SDPA path must run:
        no kernel for this device (SMARTKV_NO_KERNEL=1; C++ on CPU, Triton on CUDA), a geometry it does not take, or attention
        not routed through SmartKV's function (placeholders would then be attended as they are)."""
        if not self.attends_packed or self.cache is None:
            return None
        if not self.cache.attention_routed or not decode_kernel_ready(self.device):
            return None
        levels = [(rows, self.store.index[lvl]) for lvl, rows in sorted(self.store.rows.items()) if rows.n_rows]
        history = PackedHistory(self.sink_k, self.sink_v, levels, self.n_quant, self.unit_len,
                                self.spec.granularity == "head", self.win_k, self.win_v, self.k_shift, self.k_scale,
                                evicts=self.store.holds_gone)
        key = (self.store.serial, self.store.version, self.batch)
        if self._layout_key != key:  # the layout changed (window release, re-allocation, beams, crop)
            # stands in for the query (the kernel checks its device, head_dim and length); uniform INTk has no window
            probe = torch.empty(self.batch, self.heads, 1, self.head_dim, dtype=self.dtype, device=self.device)
            self._kernel_ok, self._layout_key = kernel_can_take(probe, history), key
        return history if self._kernel_ok else None

    def _placeholders(self, history: PackedHistory) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-cost [B, H, T, D] stand-ins for the keys and values: SmartKV's attention function
        reads `history` (published on the active update) instead."""
        self.history = history
        self.drop = self._evicted_positions() if self.store.holds_gone and self.n_quant else None
        shape = (self.batch, self.heads, self.seq_len, self.head_dim)
        if self._zero is None or self._zero.dtype != self.dtype or self._zero.device != self.device:
            self._zero = torch.zeros((), dtype=self.dtype, device=self.device)  # one scalar, made once
        stand_in = self._zero.expand(shape)
        return stand_in, stand_in.expand(shape)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The de-quantized keys and values behind the placeholders (attention the kernel does not
        take: sliding window, soft-capping, position bias, dropout)."""
        self.history = None
        return self._assemble()

    def attend_packed(self, query: torch.Tensor, scaling: float, allowed: torch.Tensor | None):
        """(out [B, Hq, 1, D], softmax weights [B, Hq, T]) of one decode query over the packed history."""
        history, self.history = self.history, None
        return packed_decode_attention(query, history, scaling, allowed)

    # --- the de-quantized history -------------------------------------------------------
    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts_k, parts_v = [self.sink_k.to(self.dtype)], [self.sink_v.to(self.dtype)]
        self.drop = None
        if self.n_quant:
            buf = torch.empty(self.store.n_units, self.unit_len, dtype=self.dtype, device=self.device)
            k, v = self._from_units(self.store.dequantize_into(buf), self.n_quant)
            parts_k.append(k)
            parts_v.append(v)
            if self.store.holds_gone:
                self.drop = self._evicted_positions()
        parts_k.append(self.win_k.to(self.dtype))
        parts_v.append(self.win_v.to(self.dtype))
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    def _evicted_positions(self) -> torch.Tensor | None:
        """[B, H, seq_len] bool, True where no width holds a token's unit (evicted at 0 bits, or a dropped
        pad); None if none. The attention function masks these positions out (smartkv/attention.py). Which quantized
        tokens are evicted changes only with the store, so that part is kept until it does."""
        key = (self.store.serial, self.store.version, self.batch)
        if self._gone_key != key:
            gone = self.store.unit_bits() == 0
            self._gone = None
            if bool(gone.any()):
                flags = gone.float()[:, None].expand(-1, self.unit_len)
                k, _ = self._from_units(flags, self.n_quant, restore=False)  # [B, H, n, D]
                self._gone = k[..., 0] > 0.5
            self._gone_key = key
        if self._gone is None:
            return None
        s = self.sink_k.shape[-2]
        out = torch.zeros(self.batch, self.heads, self.seq_len, dtype=torch.bool, device=self.device)
        out[:, :, s : s + self.n_quant] = self._gone
        return out
