"""KIVI (Liu et al., ICML 2024): keys per-channel, values per-token, asymmetric, with an FP16 residual.

Keys are quantized along tokens (each channel of each head is a row; groups of `group_size`
consecutive tokens share a scale and zero-point), values along head_dim (each token's
vector is a row). The newest tokens wait in an FP16 residual; whenever it holds
`residual_length` tokens, all of them are quantized and the residual starts again empty,
so between 0 and `residual_length - 1` tokens are at full precision (as in KIVI's code).
At prefill, the largest multiple of `residual_length` is quantized and the rest waits.
Both use SmartKV's one quantizer (`quantize_rows`): only the grouping axis differs.
"""

from __future__ import annotations

import torch

from smartkv.cache.base import KVLayer
from smartkv.quantize import QuantizedRows, quantize_rows


class KIVILayer(KVLayer):
    def __init__(self, bits: int, group_size: int = 32, residual_length: int = 128) -> None:
        super().__init__()
        if residual_length % group_size:
            raise ValueError(f"residual_length {residual_length} must be a multiple of group_size {group_size}")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.qkeys: QuantizedRows | None = None  # rows: B*H*D channels, length: quantized tokens
        self.qvalues: QuantizedRows | None = None  # rows: quantized tokens * B * H, length: D
        self.n_quant = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = torch.empty(self.batch, self.heads, 0, self.head_dim, dtype=self.store_dtype, device=self.device)
        self.keys, self.values = empty, empty.clone()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=-2)
        self.seq_len += key_states.shape[-2]
        n_flush = (self.keys.shape[-2] // self.residual_length) * self.residual_length
        if n_flush:
            self._flush(n_flush)
        return self._assemble()

    def _flush(self, n: int) -> None:
        b, h, d = self.batch, self.heads, self.head_dim
        k, v = self.keys[:, :, :n].float(), self.values[:, :, :n].float()
        qk = quantize_rows(k.transpose(2, 3).reshape(b * h * d, n), self.bits, self.group_size)
        qv = quantize_rows(v.permute(2, 0, 1, 3).reshape(n * b * h, d), self.bits, min(self.group_size, d))
        self.qkeys = qk if self.qkeys is None else self.qkeys.cat_length(qk)
        self.qvalues = qv if self.qvalues is None else self.qvalues.cat_rows(qv)
        self.n_quant += n
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()

    def _assemble(self):
        b, h, d, n = self.batch, self.heads, self.head_dim, self.n_quant
        if n == 0:
            return self.keys.to(self.dtype), self.values.to(self.dtype)
        k = self.qkeys.dequantize_into(torch.empty(b * h * d, n, dtype=self.dtype, device=self.device))
        v = self.qvalues.dequantize_into(torch.empty(n * b * h, d, dtype=self.dtype, device=self.device))
        k = k.view(b, h, d, n).transpose(2, 3)
        v = v.view(n, b, h, d).permute(1, 2, 0, 3)
        return (torch.cat([k, self.keys.to(self.dtype)], dim=-2), torch.cat([v, self.values.to(self.dtype)], dim=-2))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        total = self.keys.nbytes + self.values.nbytes
        return total + sum(q.nbytes for q in (self.qkeys, self.qvalues) if q is not None)

    def bits_histogram(self) -> dict[int, int]:
        if not self.is_initialized:
            return {}
        hist = {16: self.keys.numel() + self.values.numel()}
        if self.n_quant:
            hist[self.bits] = 2 * self.n_quant * self.batch * self.heads * self.head_dim
        return hist
