"""FP16 baseline: every token kept in 16 bits (no quantization)."""

from __future__ import annotations

import torch

from smartkv.cache.base import KVLayer


class FP16Layer(KVLayer):
    """Holds K and V in 16 bits (fp16, or bf16 for a bf16 model) and returns them in the model's dtype."""

    is_croppable = True

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

    # --- beam search / cropping (as transformers' DynamicLayer) ---------------------------
    def _select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.keys.device)
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
            self.batch = self.keys.shape[0]

    def reorder_cache(self, beam_idx):
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices):
        self._select_rows(torch.as_tensor(indices, dtype=torch.long))

    def batch_repeat_interleave(self, repeats):
        if self.is_initialized:
            self._select_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove):
        n = crop_length(self.seq_len, tokens_to_remove)
        if self.is_initialized and n < self.seq_len:
            # clones: a slice would keep the cropped tokens' bytes alive
            self.keys, self.values = self.keys[:, :, :n].clone(), self.values[:, :, :n].clone()
            self.seq_len = n

    def nbytes(self) -> int:
        # storage bytes: what the tensors keep alive, not what a view shows
        return 0 if self.keys is None else self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def memory_breakdown(self) -> dict[str, int]:
        return {"fp16": self.nbytes()}

    def bits_histogram(self) -> dict[int, int]:
        return {16: 0 if self.keys is None else self.keys.numel() + self.values.numel()}


def crop_length(seq_len: int, tokens_to_remove: int) -> int:
    """Length left by `crop(tokens_to_remove)`: transformers passes minus the number of tokens to drop."""
    if tokens_to_remove > 0:
        raise ValueError(
            f"crop({tokens_to_remove}): pass minus the number of tokens to remove (as transformers' DynamicLayer)"
        )
    return max(0, seq_len + tokens_to_remove)
