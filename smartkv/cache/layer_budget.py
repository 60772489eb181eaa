"""The byte model of a mixed-precision layer's budget: what it may hold, and its floor.

The budget is a fraction of the FP16 bytes of the same tokens, with everything the method
keeps per token counted (docs/DESIGN.md, "What it is"): codes, scales, zero-points and
index of the quantized region (`PackedStore.costs`), the FP16 sinks and window, the key
statistics and the importance tracker. A layer's fraction is the spec's `budget`, or its
entropy-weighted share when `layer_budgets="entropy"` (`KVCache.layer_fraction`).

The floor: sinks in FP16, every other token at the lowest width. Short contexts: below
`budget_holds_from()` tokens no layout meets the budget (the sinks alone may weigh more);
the layer then holds its floor, and from that length on the budget holds again.

`LayerBudget` is a mixin of `MixedPrecisionLayer` (smartkv/cache/mixed.py): these are the
layer's own questions (the cache and `smartkv.methods.budget_check` ask them of a layer), and
they read its live counts (`seq_len`, `batch`, the sinks, window and quantized region).
Nothing here changes the layer.
"""

from __future__ import annotations

import math


class LayerBudget:
    """Bytes of a `MixedPrecisionLayer`: allowed, held, fixed, and the floor."""

    def _fp16_token_bytes(self) -> int:
        return 2 * 2 * self.batch * self.heads * self.head_dim

    def _fraction(self, fix: bool = True) -> float:
        """This layer's share of FP16 bytes. Layer-aware shares are fixed at their first use, so
        a report (`fix=False`) reads them only once allocation has fixed them."""
        frac = self.spec.budget
        if self.spec.layer_budgets == "entropy" and self.cache is not None:
            if fix or self.cache._layer_fractions is not None:
                frac = self.cache.layer_fraction(self.layer_idx)
        return frac

    def budget_bytes(self, ahead: int = 0, fix: bool = True) -> int | None:
        """Bytes allowed now; with `ahead`, what is left now if `ahead` more FP16 tokens must still fit later."""
        if self.spec.budget is None:
            return None
        tok = self._fp16_token_bytes()
        if not self.evicted_pads:
            return int(math.floor(self._fraction(fix) * (self.seq_len + ahead) * tok)) - ahead * tok
        # left padding: a fraction of the FP16 bytes of the real tokens (pads are no context)
        real = (self.seq_len + ahead) * self.batch - self.evicted_pads
        return int(math.floor(self._fraction(fix) * real * (tok // self.batch))) - ahead * tok

    def _held_quant_bytes(self) -> int:
        return self.store.held_bytes()

    def _over_budget(self) -> bool:
        if self.spec.budget is None:
            return False
        return self._held_quant_bytes() + self._fixed_bytes(self.win_k.shape[-2]) > self.budget_bytes()

    def _tracker_token_bytes(self) -> int:
        """Bytes the importance tracker keeps per cached token of this layer (part of the budget)."""
        tracker = self.cache.tracker if self.cache is not None else None
        return tracker.bytes_per_token(self.batch, self.heads) if tracker is not None else 0

    def _fixed_bytes(self, window_tokens: int) -> int:
        """Bytes that do not depend on the allocation: sinks and window in FP16, key statistics, tracker."""
        scale = self.k_scale.nbytes + self.k_shift.nbytes if self.k_scale is not None else 0
        return ((self.sink_k.shape[-2] + window_tokens) * self._fp16_token_bytes() + scale
                + self.seq_len * self._tracker_token_bytes())

    def floor_bytes(self, seq_len: int) -> int:
        """Least bytes this layer can hold `seq_len` tokens in: its floor.

        Sinks in FP16, every other token at the lowest width, plus the per-channel key centre
        and scale when key smoothing is on and the tracker's statistics. Computed from the
        geometry, so it is known before the sinks are split off (layer-aware budgets need every
        layer's floor up front).
        """
        n = seq_len
        sinks = min(self.spec.sink_tokens, n)
        key_stats = 2 * self.batch * self.heads * self.head_dim * self.store_dtype.itemsize if self.spec.key_smoothing else 0
        return (sinks * self._fp16_token_bytes() + key_stats + (n - sinks) * self.units_per_row * self.costs[0]
                + n * self._tracker_token_bytes())

    def floor_ratio(self, seq_len: int | None = None) -> float:
        """Lowest budget this layer can meet with `seq_len` tokens (default: now)."""
        n = self.seq_len if seq_len is None else seq_len
        return self.floor_bytes(n) / (n * self._fp16_token_bytes())

    def budget_holds_from(self, fix: bool = False) -> int | None:
        """Fewest tokens from which this layer's budget can be met (and is, from then on); None: at no length."""
        if self.spec.budget is None:
            return 0
        tok = self._fp16_token_bytes()
        per_token = self.units_per_row * self.costs[0] + self._tracker_token_bytes()
        frac = self._fraction(fix)
        slope = frac * tok - per_token  # what the budget gains over the floor with each token
        if slope < 1:  # rounding bytes down eats less than a byte per token
            return None
        sinks = self.spec.sink_tokens
        n = max(1, int((self.floor_bytes(sinks) - sinks * per_token) // slope) - 2)
        while self.floor_bytes(n) > math.floor(frac * n * tok):
            n += 1
        return n

    def budget_met(self) -> bool:
        """Whether the bytes held now are within this layer's budget (always, without a budget)."""
        if self.spec.budget is None or not self.is_initialized:
            return True
        return self.nbytes() <= self.budget_bytes(fix=False)

    def floor_message(self, seq_len: int) -> str:
        return (
            f"budget {self.spec.budget} cannot be met with {seq_len} tokens: the floor there is "
            f"{self.floor_ratio(seq_len):.4f} of FP16 ({min(self.spec.sink_tokens, seq_len)} sink tokens in FP16, every "
            f"other token at {self.spec.bit_set[0]} bits + {self.spec.scale_format} scale/zero per group of {self.group} + index, plus the "
            "per-channel key scale when key smoothing is on)"
        )

    def window_cap(self, budget: int) -> int:
        """Most FP16 window tokens for `budget` bytes: `window`, or fewer where the window
        would take more than `window_share` of the budget."""
        share_tokens = int(self.spec.window_share * budget // self._fp16_token_bytes()) if budget > 0 else 0
        return min(self.spec.window, share_tokens) if self.spec.window_share < 1.0 else self.spec.window

    def _window_that_fits(self, budget: int, committed: int) -> int | None:
        """Largest window (<= spec.window) that leaves every token outside it room at the lowest width;
        None where not even an empty window fits (too short a context for the budget).

        `committed`: bytes of the units already in the quantized region, as they will be held.
        """
        w_now = self.win_k.shape[-2]
        per_token = self.units_per_row * self.costs[0]
        for w in range(min(self.window_cap(budget), w_now), -1, -1):
            if self._fixed_bytes(w) + committed + (w_now - w) * per_token <= budget:
                return w
        return None
