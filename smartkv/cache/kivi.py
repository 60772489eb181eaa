"""KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024).

Keys are quantized per channel (each channel of each head is a row; groups of `group_size`
consecutive tokens share an FP16 scale and zero-point), values per token (each token's
vector is a row, grouped along head_dim). As in the paper's Algorithm 1:

- keys wait in a full-precision residual and are quantized in blocks of `residual_length`
  (R): at prefill the largest multiple of R is quantized and T mod R keys wait; during
  decoding the residual grows to R and is then quantized as one block (0 to R - 1 keys wait);
- the newest R values always stay in full precision: prefill quantizes the oldest T - R,
  and each decode step quantizes the one value that falls out of the newest R;
- quantization happens *after* a step's attention: each step attends over its new tokens
  at full precision (with R + 1 full-precision values and up to R keys).

The quantization a step owes is applied lazily, at the start of the next `update` (or when
memory is read, so that `nbytes` reports the state the paper keeps between steps). The
result is the same either way: each block is quantized from the same values whenever it
runs. Keys and values use SmartKV's one quantizer (`quantize_rows`); only the axis differs.
"""

from __future__ import annotations

import torch

from smartkv.cache.base import KVLayer
from smartkv.quantize import QuantizedRows, quantize_rows


def storage_nbytes(t: torch.Tensor | None) -> int:
    """Bytes of the storage behind `t` (a view can keep a larger base alive)."""
    return 0 if t is None else t.untyped_storage().nbytes()


class KIVILayer(KVLayer):
    is_croppable = True

    def __init__(self, bits: int, group_size: int = 32, residual_length: int = 128) -> None:
        super().__init__()
        if residual_length % group_size or group_size % 8:
            raise ValueError(
                f"residual_length {residual_length} must be a multiple of group_size {group_size}, itself a multiple of 8"
            )
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.qkeys: QuantizedRows | None = None  # rows: B*H*D channels (b, h, d order), length: n_qkeys tokens
        self.qvalues: QuantizedRows | None = None  # rows: n_qvalues*B*H (token-major), length: D
        self.n_qkeys = 0
        self.n_qvalues = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = torch.empty(self.batch, self.heads, 0, self.head_dim, dtype=self.store_dtype, device=self.device)
        self.keys, self.values = empty, empty.clone()  # the full-precision residuals

    # --- the algorithm ------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._settle()
        self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=-2)
        self.seq_len += key_states.shape[-2]
        return self._assemble()

    def _settle(self) -> None:
        """Quantize what the last step owes: whole blocks of R keys, and every value but the newest R."""
        n_keys = (self.keys.shape[-2] // self.residual_length) * self.residual_length
        if n_keys:
            self._quantize_keys(n_keys)
        n_values = self.values.shape[-2] - self.residual_length
        if n_values > 0:
            self._quantize_values(n_values)

    def _quantize_keys(self, n: int) -> None:
        b, h, d = self.batch, self.heads, self.head_dim
        rows = self.keys[:, :, :n].float().transpose(2, 3).reshape(b * h * d, n)
        q = quantize_rows(rows, self.bits, self.group_size)
        self.qkeys = q if self.qkeys is None else self.qkeys.cat_length(q)
        self.n_qkeys += n
        self.keys = self.keys[:, :, n:].clone()  # clone: a slice would keep the flushed keys' storage

    def _quantize_values(self, n: int) -> None:
        b, h, d = self.batch, self.heads, self.head_dim
        rows = self.values[:, :, :n].float().permute(2, 0, 1, 3).reshape(n * b * h, d)
        q = quantize_rows(rows, self.bits, min(self.group_size, d))
        self.qvalues = q if self.qvalues is None else self.qvalues.cat_rows(q)
        self.n_qvalues += n
        self.values = self.values[:, :, n:].clone()

    def _assemble(self):
        b, h, d = self.batch, self.heads, self.head_dim
        keys, values = self.keys.to(self.dtype), self.values.to(self.dtype)
        if self.n_qkeys:
            k = self.qkeys.dequantize_into(torch.empty(b * h * d, self.n_qkeys, dtype=self.dtype, device=self.device))
            keys = torch.cat([k.view(b, h, d, self.n_qkeys).transpose(2, 3), keys], dim=-2)
        if self.n_qvalues:
            v = self.qvalues.dequantize_into(torch.empty(self.n_qvalues * b * h, d, dtype=self.dtype, device=self.device))
            values = torch.cat([v.view(self.n_qvalues, b, h, d).permute(1, 2, 0, 3), values], dim=-2)
        return keys, values

    # --- beam search and cropping -------------------------------------------------------
    def _select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the batch rows `index` of every tensor held."""
        index = index.to(device=self.device, dtype=torch.long)
        b, h, d = self.batch, self.heads, self.head_dim
        if self.qkeys is not None:
            rows = (index[:, None] * (h * d) + torch.arange(h * d, device=self.device)).flatten()
            self.qkeys = self.qkeys.select(rows)
        if self.qvalues is not None:
            tokens = torch.arange(self.n_qvalues, device=self.device)[:, None, None] * (b * h)
            rows = (tokens + index[None, :, None] * h + torch.arange(h, device=self.device)).flatten()
            self.qvalues = self.qvalues.select(rows)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.batch = int(index.numel())

    def reorder_cache(self, beam_idx) -> None:
        if self.is_initialized:
            self._select_batch(torch.as_tensor(beam_idx))

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized:
            indices = torch.as_tensor(indices)
            self._select_batch(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and repeats != 1:
            self._select_batch(torch.arange(self.batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest `-tokens_to_remove` tokens (transformers 5.x: a negative count, as `DynamicLayer`).

        Exact whenever the tokens that remain are held as KIVI would hold them after a run
        over just those tokens: at most every whole block of R keys quantized, and the newest
        R values at full precision. In practice that means the tokens added since the last
        step was settled (assisted decoding's rejected draft tokens). Cutting deeper would
        need the full precision of tokens already quantized, which is gone: that raises.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as transformers 5.x does"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.seq_len + tokens_to_remove, 0)
        shortest = max(self.n_qkeys, self.n_qvalues + self.residual_length if self.n_qvalues else 0)
        if keep < shortest:
            raise NotImplementedError(
                f"KIVI cannot crop to {keep} tokens: {self.n_qkeys} keys and {self.n_qvalues} values are already "
                f"quantized, and KIVI would hold some of them at full precision (the newest {self.residual_length} "
                f"values, keys short of a block), which is gone; it can remove at most {self.seq_len - shortest} "
                "tokens now (the tokens of the last step); use fp16 for deeper rollbacks"
            )
        self.keys = self.keys[:, :, : keep - self.n_qkeys].clone()
        self.values = self.values[:, :, : keep - self.n_qvalues].clone()
        self.seq_len = keep

    # --- memory -------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Storage bytes of every tensor held, after the quantization the last step owes."""
        if not self.is_initialized:
            return 0
        self._settle()
        total = storage_nbytes(self.keys) + storage_nbytes(self.values)
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                total += sum(storage_nbytes(p) for p in q.planes) + storage_nbytes(q.scale) + storage_nbytes(q.zero)
        return total

    def memory_breakdown(self) -> dict[str, int]:
        """Codes and scales of the quantized keys and values; the FP16 residuals as the window."""
        if not self.is_initialized:
            return {}
        self._settle()
        quantized = [q for q in (self.qkeys, self.qvalues) if q is not None]
        return {
            "codes": sum(storage_nbytes(p) for q in quantized for p in q.planes),
            "scales": sum(storage_nbytes(q.scale) + storage_nbytes(q.zero) for q in quantized),
            "window": storage_nbytes(self.keys) + storage_nbytes(self.values),
        }

    def bits_histogram(self) -> dict[int, int]:
        if not self.is_initialized:
            return {}
        self._settle()
        hist = {16: self.keys.numel() + self.values.numel()}
        if self.n_qkeys or self.n_qvalues:
            hist[self.bits] = (self.n_qkeys + self.n_qvalues) * self.batch * self.heads * self.head_dim
        return hist
