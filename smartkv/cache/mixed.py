"""Mixed-precision layer: each stored unit at its own bit width, under a byte budget.

Layout of one layer's tokens, oldest first:

    [ sinks: FP16 ][ quantized region: units at 0..8 bits ][ recent window: FP16 ]

This file is the layer's orchestration: `update` (when to allocate and how to be read), sinks
and window, beam search / cropping and memory accounting. The concepts it composes, one file each:

- `MixedSpec` (smartkv/cache/mixed_spec.py): the layer's settings;
- `UnitLayout` (smartkv/cache/units.py): which values share one precision (a *unit*), and the
  key smoothing / rotation applied before quantization;
- `PackedStore` (smartkv/cache/packed_store.py): the quantized region, per width the packed
  rows and an int32 index of which units they are;
- `LayerBudget` (smartkv/cache/layer_budget.py): the byte model: bytes allowed, held and the floor;
- `PrecisionPolicy` (smartkv/cache/precision_policy.py): importance -> widths, re-allocation;
- `LayerReads` (smartkv/cache/mixed_reads.py): the history for attention, de-quantized or packed;
- left padding (smartkv/cache/padding.py): a padded row's prompt is held sink-first and its pads
  are held by no width (evicted at 0 bits, or dropped where the bit set has no 0) and left out of
  the budget; a store of one width (uniform INTk) holds them.

The budget, policy and reads are mixins: each reads and rewrites this layer's live state (sinks,
window, store, `seq_len`, `batch`), and the cache asks the layer itself (`budget_met`,
`floor_ratio`, `attend_packed`, ...). Unit layout and storage are objects the layer holds.

Tokens wait in the window at full precision and get their bits when they leave it; a
re-allocation every `realloc_freq` decoded tokens may demote stored units to make room
(docs/DESIGN.md decision 3). With `budget=None` nothing is allocated: every unit gets the
single width in `bit_set` (uniform INTk).

Reads: prefill and multi-token chunks get the de-quantized history; a single-token decode step
gets zero-cost placeholders where a kernel can read the packed codes (`PackedHistory`).

Short contexts: below `budget_holds_from()` tokens no layout meets the budget; the layer holds
its floor, warns once per cache, and reports `budget_met: False`. Beam search and cropping
(`reorder_cache`, `batch_*`, `crop`) move the packed units with their tokens.
"""

from __future__ import annotations

import torch

from smartkv.cache.base import KVLayer
from smartkv.cache.fp16 import crop_length
from smartkv.cache.layer_budget import LayerBudget
from smartkv.cache.mixed_reads import LayerReads
from smartkv.cache.mixed_spec import MixedSpec
from smartkv.cache.packed_store import PackedStore
from smartkv.cache.padding import pad_positions, permute_columns, sink_first_order
from smartkv.cache.precision_policy import PrecisionPolicy
from smartkv.cache.units import UnitLayout
from smartkv.packed_attention import PackedHistory

__all__ = ["MixedPrecisionLayer", "MixedSpec"]


class MixedPrecisionLayer(LayerBudget, PrecisionPolicy, LayerReads, KVLayer):
    """One model layer's KV cache: FP16 sinks, a packed quantized region, an FP16 window."""

    def __init__(self, spec: MixedSpec) -> None:
        super().__init__()
        self.spec = spec
        self.sink_k = self.sink_v = None
        self.win_k = self.win_v = None
        # key_smoothing: per-channel FP16 centre and half-range of the keys, [B, H, 1, D], counted in nbytes
        self.k_scale = self.k_shift = None
        self.layout: UnitLayout | None = None  # unit geometry, key rotation: known with the first update
        self.store: PackedStore | None = None  # the quantized region, built once the geometry is known
        self.allocated = spec.budget is None
        self.decode_steps = 0
        self.reallocations = 0  # allocations of the whole quantized region (the first one included)
        self.drop: torch.Tensor | None = None  # [B, H, T] evicted positions of the last read, for the attention mask
        # The packed history of the last decode step when `update` returned placeholders (else None)
        self.history: PackedHistory | None = None
        # What a decode step derives from the quantized region's layout, kept until the store changes
        # (`PackedStore.serial` and `.version`): whether the kernel takes it, which quantized tokens are evicted.
        self._layout_key: tuple | None = None
        self._kernel_ok = False
        self._gone_key: tuple | None = None
        self._gone: torch.Tensor | None = None
        self._zero: torch.Tensor | None = None  # the 0-dim zero the placeholders expand
        self.generator = torch.Generator().manual_seed(spec.seed)
        # Left padding (smartkv/cache/padding.py): the prompt's length, and once the layer has reordered
        # its prompt sink-first, the order [B, T0], where the pads now sit [B, T0] and how many are evicted
        self.prompt_len = 0
        self.order: torch.Tensor | None = None
        self.pad_at: torch.Tensor | None = None
        self.evicted_pads = 0

    def attach(self, cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx
        self.generator.manual_seed(self.spec.seed * 1000003 + layer_idx)

    # --- geometry ---------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        s = self.spec
        self.layout = UnitLayout(s, self.heads, self.head_dim, self.device)
        self.store = PackedStore(s.bit_set, self.unit_len, self.group, s.symmetric, s.scale_format)
        self.costs = self.store.costs
        empty = torch.empty(self.batch, self.heads, 0, self.head_dim, dtype=self.store_dtype, device=self.device)
        self.sink_k, self.sink_v, self.win_k, self.win_v = empty, empty.clone(), empty.clone(), empty.clone()

    @property
    def group(self) -> int:
        return self.layout.group

    @property
    def units_per_token(self) -> int:
        return self.layout.units_per_token

    @property
    def unit_len(self) -> int:
        return self.layout.unit_len

    @property
    def units_per_row(self) -> int:
        return self.units_per_token * self.batch

    @property
    def n_quant(self) -> int:
        """Tokens in the quantized region."""
        return self.store.n_units // self.units_per_row if self.store is not None else 0

    def _to_units(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, H, n, D] K and V -> [n * units_per_row, unit_len], token-major (keys smoothed, rotated)."""
        return self.layout.to_units(k, v, self.k_shift, self.k_scale)

    def _from_units(self, units: torch.Tensor, n: int, restore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `_to_units` for this layer's rows (`restore=False`: labels, not values)."""
        return self.layout.from_units(units, self.batch, n, self.k_shift, self.k_scale, restore)

    # --- update -----------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.win_k = torch.cat([self.win_k, key_states.to(self.store_dtype)], dim=-2)
        self.win_v = torch.cat([self.win_v, value_states.to(self.store_dtype)], dim=-2)
        self.seq_len += key_states.shape[-2]
        # The first update is the prompt; allocation happens at the next one, whatever its length
        # (one decode token, or a teacher-forced / assisted-decoding chunk of several).
        prefill = not self.allocated and self.seq_len == key_states.shape[-2]
        if prefill:
            self.prompt_len = self.seq_len
        if not prefill:
            if not self.allocated:
                self._split_sinks()
                self._reallocate()
                self.allocated = True
            else:
                # Count tokens, not calls: a teacher-forced chunk of q tokens is q decode steps.
                before = self.decode_steps
                self.decode_steps += key_states.shape[-2]
                f = self.spec.realloc_freq
                if f and self.decode_steps // f > before // f:
                    self._reallocate()
                elif self.spec.budget is None or self._over_budget() or self.win_k.shape[-2] > self.spec.window + f:
                    self._release_window()
        if not prefill and key_states.shape[-2] == 1:
            history = self._packed_history()
            if history is not None:
                return self._placeholders(history)
        self.history = None
        return self._assemble()

    # --- sinks and window -------------------------------------------------------------
    def _split_sinks(self) -> None:
        pads = self.cache.pads if self.cache is not None else None
        compresses = self.spec.budget is None or self.spec.budget < 1.0  # budget 1.0: the prompt stays as given
        if pads is not None and pads.shape[0] == self.batch and bool(pads.any()) and compresses:
            self._reorder_sink_first(pads)
        if self.spec.key_smoothing:
            # Keys have outlier channels with large offsets (KIVI, KVQuant): per-token groups would
            # spend their range on them. Centering each channel on its prefill mid-range and dividing
            # by its half-range balances the channels before per-token quantization (undone on read).
            kf = self.win_k.float()
            if self.pad_at is None:
                hi, lo = kf.amax(dim=-2, keepdim=True), kf.amin(dim=-2, keepdim=True)
            else:  # the ranges of real tokens only: a pad's key is no part of the context
                pad = self._pad_mask(kf.shape[-2])[:, None, :, None]
                hi = kf.masked_fill(pad, float("-inf")).amax(dim=-2, keepdim=True)
                lo = kf.masked_fill(pad, float("inf")).amin(dim=-2, keepdim=True)
            self.k_shift = ((hi + lo) / 2).to(self.store_dtype)
            self.k_scale = ((hi - lo) / 2).clamp_min(1e-4).to(self.store_dtype)
        s = min(self.spec.sink_tokens, self.win_k.shape[-2])
        self.sink_k, self.win_k = _own(self.win_k[:, :, :s]), _own(self.win_k[:, :, s:])
        self.sink_v, self.win_v = _own(self.win_v[:, :, :s]), _own(self.win_v[:, :, s:])

    def _reorder_sink_first(self, pads: torch.Tensor) -> None:
        """Hold each row's prompt sink-first (its first real tokens, then its pads, then the rest), with the
        tracker's statistics, so that the sinks are real tokens and the pads open the quantized region."""
        t0 = self.prompt_len
        order = sink_first_order(pads, self.spec.sink_tokens, t0)
        self.win_k, self.win_v = (permute_columns(t.transpose(-1, -2), order).transpose(-1, -2).contiguous()
                                  for t in (self.win_k, self.win_v))
        tracker = self.cache.tracker
        if tracker is not None and self.layer_idx in tracker.layers:
            tracker.layers[self.layer_idx].reorder_tokens(order)
        self.order = order.to(self.device)
        self.pad_at = pad_positions(pads, order)
        # Pads cost nothing and are no context: evicted at 0 bits, or dropped (level GONE) by a store
        # without a 0-bit width. A store of one width (uniform INTk) holds every unit in order, so it
        # holds its pads too and counts them as context.
        self.evicted_pads = int(pads.sum()) if self.store.can_drop else 0
        if not self.store.can_drop:
            self.cache.warn_once("padding_held", (
                f"{self.cache.method}: left padding: this cache stores one width, so its {int(pads.sum())} pad "
                f"tokens are held at {self.spec.bit_set[0]} bits, masked out of attention and counted as "
                "context (in kv_bytes and fp16_kv_bytes); a cache of several widths drops them"))

    def _pad_mask(self, n: int, start: int = 0) -> torch.Tensor:
        """[B, n] bool: which of positions [start, start + n) of each row hold a pad."""
        out = torch.zeros(self.batch, n, dtype=torch.bool)
        t0 = self.pad_at.shape[1]
        if start < t0:
            stop = min(t0, start + n)
            out[:, : stop - start] = self.pad_at[:, start:stop]
        return out.to(self.device)

    def _pad_units(self, first: int, n: int) -> torch.Tensor | None:
        """[n * units_per_row] bool: the units of quantized-region tokens [first, first + n) that are pads
        (None without padding); the allocator holds them at width 0."""
        if self.pad_at is None:
            return None
        at = self._pad_mask(n, self.sink_k.shape[-2] + first).cpu().t()  # [n, B]
        return at[:, :, None].expand(n, self.batch, self.units_per_token).reshape(-1)

    def awaiting_allocation(self) -> bool:
        return self.is_initialized and not self.allocated

    def _leaving(self, keep: int) -> torch.Tensor:
        """Pop the window's oldest tokens beyond `keep`; return their units."""
        n_out = max(0, self.win_k.shape[-2] - keep)
        units = self._to_units(self.win_k[:, :, :n_out], self.win_v[:, :, :n_out])
        self.win_k, self.win_v = _own(self.win_k[:, :, n_out:]), _own(self.win_v[:, :, n_out:])
        return units

    # --- beam search / cropping: every per-token tensor follows its tokens -----------------
    is_croppable = True

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Batch row j becomes old row `rows[j]` (beam search repeats and reorders rows)."""
        if not self.is_initialized:
            return
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        upt, upr = self.units_per_token, self.units_per_row
        src = (torch.arange(self.n_quant)[:, None, None] * upr + rows[None, :, None] * upt
               + torch.arange(upt)[None, None, :]).reshape(-1)
        self.store = self.store.gather(src)
        on = rows.to(self.device)
        self.sink_k, self.sink_v, self.win_k, self.win_v = (t.index_select(0, on) for t in
                                                            (self.sink_k, self.sink_v, self.win_k, self.win_v))
        if self.k_scale is not None:
            self.k_scale, self.k_shift = self.k_scale.index_select(0, on), self.k_shift.index_select(0, on)
        if self.order is not None:
            self.order, self.pad_at = self.order.index_select(0, on), self.pad_at.index_select(0, rows)
            self.evicted_pads = int(self.pad_at.sum()) if self.store.can_drop else 0
        self.batch = int(rows.numel())
        self._back_under_budget()

    def reorder_cache(self, beam_idx):
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices):
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats):
        self._select_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove):
        """Drop the newest tokens (assisted decoding rejects drafts): window first, then quantized units, then sinks."""
        n = crop_length(self.seq_len, tokens_to_remove)
        if not self.is_initialized or n >= self.seq_len:
            return
        if self.order is not None and n < self.order.shape[1]:
            raise ValueError(f"cannot crop a left-padded prompt of {self.order.shape[1]} tokens to {n}: "
                             "its tokens are held sink-first, so only tokens after the prompt can be cropped")
        s, q = self.sink_k.shape[-2], self.n_quant
        self.win_k, self.win_v = self.win_k[:, :, : max(0, n - s - q)], self.win_v[:, :, : max(0, n - s - q)]
        if n < s + q:
            self.store = self.store.gather(torch.arange(max(0, n - s) * self.units_per_row))
        if n < s:
            self.sink_k, self.sink_v = self.sink_k[:, :, :n], self.sink_v[:, :, :n]
        # storage of their own: a slice would keep the cropped tokens' bytes alive
        self.sink_k, self.sink_v, self.win_k, self.win_v = (_own(t) for t in
                                                            (self.sink_k, self.sink_v, self.win_k, self.win_v))
        self.seq_len = n
        self._back_under_budget()

    # --- memory -----------------------------------------------------------------------
    def fp16_nbytes(self) -> int:
        """FP16 bytes of the tokens held as context: evicted pads are none."""
        return super().fp16_nbytes() - 2 * 2 * self.heads * self.head_dim * self.evicted_pads

    def nbytes(self) -> int:
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes held by part: the quantized region's codes, scales and index, the FP16 sinks and
        window, the key-smoothing statistics, and this layer's importance-tracker state."""
        if not self.is_initialized:
            return {}
        # storage bytes, not view bytes: a slice would keep its whole base alive (`_own` prevents it)
        parts = self.store.memory_breakdown()
        parts["sinks"] = self.sink_k.untyped_storage().nbytes() + self.sink_v.untyped_storage().nbytes()
        parts["window"] = self.win_k.untyped_storage().nbytes() + self.win_v.untyped_storage().nbytes()
        parts["key_stats"] = self.k_scale.nbytes + self.k_shift.nbytes if self.k_scale is not None else 0
        tracker = self.cache.tracker if self.cache is not None else None
        # importance state is memory the method keeps
        parts["tracker"] = tracker.layers[self.layer_idx].nbytes if tracker is not None and self.layer_idx in tracker.layers else 0
        return parts

    def bits_histogram(self) -> dict[int, int]:
        if not self.is_initialized:
            return {}
        hist = {16: sum(t.numel() for t in (self.sink_k, self.sink_v, self.win_k, self.win_v))}
        for b, n in self.store.values_per_width().items():
            hist[b] = hist.get(b, 0) + n
        return hist

    def bits_map(self) -> torch.Tensor:
        """Bits of every K/V value position: float [B, H, seq_len, 2] (index -1: 0 = key, 1 = value)."""
        s = self.sink_k.shape[-2]
        out = torch.full((self.batch, self.heads, self.seq_len, 2), 16.0)
        if self.n_quant:
            per_unit = self.store.unit_bits()
            expanded = per_unit[:, None].expand(-1, self.unit_len)
            k, v = self._from_units(expanded, self.n_quant, restore=False)  # [B, H, n, D] each
            out[:, :, s : s + self.n_quant, 0] = k[..., 0]
            out[:, :, s : s + self.n_quant, 1] = v[..., 0]
        if self.order is not None:  # back to the model's positions (pads read 0 bits)
            t0 = self.order.shape[1]
            idx = self.order.cpu()[:, None, :, None].expand(self.batch, self.heads, t0, 2)
            out[:, :, :t0] = torch.empty_like(out[:, :, :t0]).scatter_(2, idx, out[:, :, :t0])
        return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage of its own: a slice of a larger tensor would keep all of it alive."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)
