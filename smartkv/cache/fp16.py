"""FP16 baseline: every token kept in 16 bits (no quantization)."""

from __future__ import annotations

import torch

from smartkv.cache.base import KVLayer


class FP16Layer(KVLayer):
    """Holds K and V in 16 bits (fp16, or bf16 for a bf16 model) and returns them in the model's dtype."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states.to(self.store_dtype)
            self.values = value_states.to(self.store_dtype)
        else:
            self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=-2)
            self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=-2)
        self.seq_len += key_states.shape[-2]
        return self.keys.to(self.dtype), self.values.to(self.dtype)

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def bits_histogram(self) -> dict[int, int]:
        return {16: 0 if self.keys is None else self.keys.numel() + self.values.numel()}
