"""Mixed-precision layer: each stored unit at its own bit width, under a byte budget.

Layout of one layer's tokens, oldest first:

    [ sinks: FP16 ][ quantized region: units at 1..8 bits ][ recent window: FP16 ]

A *unit* is the block of values that shares one precision: a token's K and V over all KV
heads (`granularity="layer"`), or per KV head (`"head"`), with K and V together or apart
(`kv_split`). Units are numbered token-major, so numbers never change as tokens arrive.
The quantized region is a `PackedStore` (smartkv/cache/packed_store.py): per width, the
packed rows and an int32 index of which units they are. This file is the layer's policy:
sinks, window, budget, and when to allocate.

Tokens wait in the window at full precision and get their bits when they leave it; a
re-allocation every `realloc_freq` decoded tokens may demote stored units to make room.
Precision never goes up: a demoted unit is re-quantized from its de-quantized values.
With `budget=None` nothing is allocated: every unit gets the single width in `bit_set`.

Reads: prefill and multi-token chunks get the de-quantized history (fused C++ de-quantization,
then SDPA). A single-token decode step on CPU gets zero-cost placeholders instead, and SmartKV's
attention function reads the packed codes directly (`PackedHistory`, smartkv/packed_attention.py).

Short contexts: below `budget_holds_from()` tokens no layout meets the budget (the sinks
alone may weigh more). The layer then holds its floor (sinks in FP16, every other token at
the lowest width), warns once per cache, and reports `budget_met: False`; from that length
on the budget holds again. Beam search and cropping (`reorder_cache`, `batch_*`, `crop`)
move the packed units with their tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import warnings

import torch

from smartkv import allocate as alloc
from smartkv.cache.base import KVLayer
from smartkv.cache.fp16 import crop_length
from smartkv.cache.packed_store import PackedStore
from smartkv.packed_attention import PackedHistory, decode_kernel_ready, kernel_can_take, packed_decode_attention
from smartkv.rotation import rotation


@dataclass(frozen=True)
class MixedSpec:
    bit_set: tuple[int, ...]
    group_size: int = 32
    symmetric: bool = False
    budget: float | None = None
    window: int = 0
    # The FP16 window may hold at most this share of the layer's budget bytes: at short
    # contexts a fixed window would otherwise eat the budget the quantized tokens need.
    window_share: float = 1.0
    sink_tokens: int = 0
    allocation: str = "greedy"
    signal: str = "ema"
    granularity: str = "layer"
    kv_split: bool = False
    key_weight: float = 1.0
    realloc_freq: int = 16
    layer_budgets: str = "equal"
    layer_skew: float = 0.5
    seed: int = 0
    key_smoothing: bool = False
    # Rotate keys over head_dim by an orthogonal matrix before quantization (smartkv/rotation.py).
    key_rotation: bool = False
    prior: float = 0.0
    pool: int = 1  # average each token's importance with its neighbours (SnapKV pools over 5)
    # Squared error of each width for the allocator: "range" (measured: each unit's group
    # ranges, step**2 / 12) or "bits" (the 4**-b model of a uniform quantizer).
    error_model: str = "range"
    # Decode steps attend straight from the packed codes (smartkv/packed_attention.py) where
    # the C++ kernel can: no full-precision copy of the history, the tracker's weights from the same pass.
    packed_decode: bool = True


class MixedPrecisionLayer(KVLayer):
    def __init__(self, spec: MixedSpec) -> None:
        super().__init__()
        self.spec = spec
        self.sink_k = self.sink_v = None
        self.win_k = self.win_v = None
        # key_smoothing: per-channel FP16 centre and half-range of the keys, [B, H, 1, D], counted in nbytes
        self.k_scale = self.k_shift = None
        self.store: PackedStore | None = None  # the quantized region, built once the geometry is known
        self.allocated = spec.budget is None
        self.decode_steps = 0
        self.reallocations = 0  # allocations of the whole quantized region (the first one included)
        self.rot: torch.Tensor | None = None  # key rotation [D, D], a function of head_dim (not stored per token)
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

    def attach(self, cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx
        self.generator.manual_seed(self.spec.seed * 1000003 + layer_idx)

    # --- geometry ---------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        s = self.spec
        if self.head_dim % s.group_size and s.group_size < self.head_dim:
            raise ValueError(
                f"group_size {s.group_size} must divide head_dim {self.head_dim} (or be >= it), "
                "so that no group straddles two heads"
            )
        self.group = min(s.group_size, self.head_dim)
        per_head = 1 if s.kv_split else 2
        if s.granularity == "head":
            self.units_per_token = self.heads * (2 if s.kv_split else 1)
            self.unit_len = self.head_dim * per_head
        else:
            self.units_per_token = 2 if s.kv_split else 1
            self.unit_len = self.heads * self.head_dim * per_head
        # token-major permutation of a stacked [2, B, H, n, D] block of K and V
        self.perm = (3, 1, 2, 0, 4) if s.granularity == "head" else (3, 1, 0, 2, 4)
        self.store = PackedStore(s.bit_set, self.unit_len, self.group, s.symmetric)
        if s.key_rotation:
            self.rot = rotation(self.head_dim, torch.float32, self.device)
        self.costs = self.store.costs
        empty = torch.empty(self.batch, self.heads, 0, self.head_dim, dtype=self.store_dtype, device=self.device)
        self.sink_k, self.sink_v, self.win_k, self.win_v = empty, empty.clone(), empty.clone(), empty.clone()

    @property
    def units_per_row(self) -> int:
        return self.units_per_token * self.batch

    @property
    def n_quant(self) -> int:
        """Tokens in the quantized region."""
        return self.store.n_units // self.units_per_row if self.store is not None else 0

    def _to_units(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, H, n, D] K and V -> [n * units_per_row, unit_len], token-major (keys smoothed, rotated)."""
        if self.rot is None:
            return self._to_units_direct(k, v)
        if self.k_scale is not None:
            k = (k.float() - self.k_shift.float()) / self.k_scale.float()
        if self.rot is not None:
            k = k.float() @ self.rot
        if k.dtype != v.dtype:
            k, v = k.float(), v.float()
        return torch.stack([k, v]).permute(self.perm).reshape(-1, self.unit_len)

    def _to_units_direct(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`_to_units` without key rotation, written straight into the token-major layout: K and V
        are copied once each and the keys smoothed in place, the same float32 operations as
        `(k.float() - shift) / scale` then stack and reshape (bit-identical), with three fewer
        full-size temporaries (the first allocation passes the whole prompt through here)."""
        b, h, n, d = k.shape
        smooth = self.k_scale is not None
        dtype = torch.float32 if smooth or k.dtype != v.dtype else k.dtype
        shape = (n, b, h, 2, d) if self.spec.granularity == "head" else (n, b, 2, h, d)
        units = torch.empty(shape, dtype=dtype, device=k.device)
        kv = units.permute([self.perm.index(i) for i in range(5)])  # [2, B, H, n, D] view of `units`
        kv[0].copy_(k)
        kv[1].copy_(v)
        if smooth:
            kv[0].sub_(self.k_shift.float()).div_(self.k_scale.float())
        return units.view(-1, self.unit_len)

    def _from_units(self, units: torch.Tensor, n: int, restore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `_to_units`; `restore=False` skips undoing the key rotation and smoothing
        (for per-position labels such as bit widths, which are not values)."""
        b, h, d = self.batch, self.heads, self.head_dim
        shape = (n, b, h, 2, d) if self.spec.granularity == "head" else (n, b, 2, h, d)
        inverse = [self.perm.index(i) for i in range(5)]
        kv = units.reshape(shape).permute(inverse)
        k, v = kv[0], kv[1]
        if not restore:
            return k, v
        if self.rot is not None:
            k = k @ self.rot.t().to(k.dtype)
        if self.k_scale is not None:
            k = torch.addcmul(self.k_shift.to(k.dtype), k, self.k_scale.to(k.dtype))
        return k, v

    def _unit_importance(self, start: int, n: int) -> torch.Tensor:
        """Importance of the units of tokens [start, start + n), in unit order."""
        tracker = self.cache.tracker if self.cache is not None else None
        if tracker is None or self.layer_idx not in tracker.layers:
            if tracker is not None:
                self.cache.warn_unobserved()
            return torch.zeros(n * self.units_per_row, dtype=torch.float64)
        score = tracker.layer(self.layer_idx).score(self.spec.signal, self.spec.pool)
        if score.shape[-1] < start + n:  # the newest token has not been attended yet
            score = torch.nn.functional.pad(score, (0, start + n - score.shape[-1]))
        imp = score[:, :, start : start + n].double().permute(2, 0, 1)  # [n, B, H]
        if self.spec.granularity == "layer":
            imp = imp.sum(-1, keepdim=True)  # [n, B, 1]
        if self.spec.kv_split:
            imp = torch.stack([imp * self.spec.key_weight, imp], dim=-1)  # K unit, V unit
        imp = imp.reshape(-1)
        if self.spec.prior > 0 and imp.numel():
            # Attention seen so far is an estimate of what decoding will need: mix in a uniform
            # share so that no token is written off on the strength of the prompt alone.
            total = imp.sum()
            share = imp / total if total > 0 else torch.full_like(imp, 1.0 / imp.numel())
            imp = (1.0 - self.spec.prior) * share + self.spec.prior / imp.numel()
        return imp

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
                                evicts=self.store.evicts)
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
        self.drop = self._evicted_positions() if self.store.evicts and self.n_quant else None
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

    def _split_sinks(self) -> None:
        if self.spec.key_smoothing:
            # Keys have outlier channels with large offsets (KIVI, KVQuant): per-token groups would
            # spend their range on them. Centering each channel on its prefill mid-range and dividing
            # by its half-range balances the channels before per-token quantization (undone on read).
            kf = self.win_k.float()
            hi, lo = kf.amax(dim=-2, keepdim=True), kf.amin(dim=-2, keepdim=True)
            self.k_shift = ((hi + lo) / 2).to(self.store_dtype)
            self.k_scale = ((hi - lo) / 2).clamp_min(1e-4).to(self.store_dtype)
        s = min(self.spec.sink_tokens, self.win_k.shape[-2])
        self.sink_k, self.win_k = _own(self.win_k[:, :, :s]), _own(self.win_k[:, :, s:])
        self.sink_v, self.win_v = _own(self.win_v[:, :, :s]), _own(self.win_v[:, :, s:])

    # --- budget -------------------------------------------------------------------------
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
        return int(math.floor(self._fraction(fix) * (self.seq_len + ahead) * tok)) - ahead * tok

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

    def awaiting_allocation(self) -> bool:
        return self.is_initialized and not self.allocated

    def budget_met(self) -> bool:
        """Whether the bytes held now are within this layer's budget (always, without a budget)."""
        if self.spec.budget is None or not self.is_initialized:
            return True
        return self.nbytes() <= self.budget_bytes(fix=False)

    def floor_message(self, seq_len: int) -> str:
        return (
            f"budget {self.spec.budget} cannot be met with {seq_len} tokens: the floor there is "
            f"{self.floor_ratio(seq_len):.4f} of FP16 ({min(self.spec.sink_tokens, seq_len)} sink tokens in FP16, every "
            f"other token at {self.spec.bit_set[0]} bits + FP16 scale/zero per group of {self.group} + index, plus the "
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

    def _hold_floor(self) -> None:
        """Too short a context for the budget: hold the least this layer can, and say so once per cache."""
        self.store.demote(torch.zeros(self.store.n_units, dtype=torch.long))
        units = self._leaving(0)
        self.store.append(units, torch.zeros(units.shape[0], dtype=torch.long))
        if self.cache is not None:
            frm = self.budget_holds_from()
            self.cache.warn_once(
                "short_context",
                f"smartkv: {self.floor_message(self.seq_len)}; holding that floor instead (sinks in FP16, the rest at "
                f"{self.spec.bit_set[0]} bits) " + (f"until the context reaches {frm} tokens, from which the budget holds"
                                                    if frm is not None else "at every length: the budget is below the lowest width")
                + "; memory_report()['budget_met'] says whether it holds now",
            )

    # --- allocation ---------------------------------------------------------------------
    def _held_quant_bytes(self) -> int:
        return self.store.held_bytes()

    def _leaving(self, keep: int) -> torch.Tensor:
        """Pop the window's oldest tokens beyond `keep`; return their units."""
        n_out = max(0, self.win_k.shape[-2] - keep)
        units = self._to_units(self.win_k[:, :, :n_out], self.win_v[:, :, :n_out])
        self.win_k, self.win_v = _own(self.win_k[:, :, n_out:]), _own(self.win_v[:, :, n_out:])
        return units

    def _release_window(self) -> None:
        """Between re-allocations: move tokens out of the window at the widths the slack affords."""
        s = self.spec
        if s.budget is None:
            units = self._leaving(s.window)
            self.store.append(units, torch.zeros(units.shape[0], dtype=torch.long))
            return
        budget = self.budget_bytes()
        held = self._held_quant_bytes()
        keep = self._window_that_fits(budget, held)
        if keep is None:
            self._reallocate()  # only demotions can make room
            return
        n_out = self.win_k.shape[-2] - keep
        if n_out <= 0:
            return
        imp = self._unit_importance(self.sink_k.shape[-2] + self.n_quant, n_out)
        caps = torch.full((imp.shape[0],), len(s.bit_set) - 1)
        available = budget - held - self._fixed_bytes(keep)
        units = self._leaving(keep)
        levels = alloc.allocate(s.allocation, imp, self.costs, caps, available, s.bit_set, self.generator,
                                self._errors(None, units))
        self.store.append(units, levels)

    def _reallocate(self) -> None:
        """Re-allocate every quantized unit (caps: current width) plus the tokens leaving the window."""
        s = self.spec
        if s.budget is None:
            self._release_window()
            return
        # Leave room for the tokens that will wait in the window until the next re-allocation, so
        # that the steps in between need no work at all (and the budget still holds at each one).
        # The reserve is capped at 1% of the FP16 bytes, so short contexts do not pay for it.
        committed = self.n_quant * self.units_per_row * self.costs[0]
        ahead = min(self.spec.realloc_freq, int(0.01 * self.seq_len / max(1e-9, 1.0 - s.budget)))
        budget = self.budget_bytes(ahead=ahead)
        keep = self._window_that_fits(budget, committed)
        if keep is None:  # too short a context to plan ahead: meet today's budget
            budget = self.budget_bytes()
            keep = self._window_that_fits(budget, committed)
        if keep is None:  # too short a context for the budget at all
            self._hold_floor()
            return
        first = self.sink_k.shape[-2]
        n_old = self.n_quant * self.units_per_row
        n_out = self.win_k.shape[-2] - keep
        imp = self._unit_importance(first, self.n_quant + n_out)
        top = len(s.bit_set) - 1
        caps = torch.full((imp.shape[0],), top)
        caps[:n_old] = self.store.levels()
        available = budget - self._fixed_bytes(keep)
        units = self._leaving(keep)
        levels = alloc.allocate(s.allocation, imp, self.costs, caps, available, s.bit_set, self.generator,
                                self._errors(self.store.range_sq() if n_old else None, units))
        self.store.demote(levels[:n_old])
        self.store.append(units, levels[n_old:])
        self.reallocations += 1

    def _errors(self, held_range_sq: torch.Tensor | None, new_units: torch.Tensor) -> torch.Tensor | None:
        """Squared error per (unit, level) for the held units (ranges read from their scales) then
        the new ones (ranges of their values); None under the 4**-b model."""
        if self.spec.error_model == "bits":
            return None
        g = self.group
        n, length = new_units.shape
        groups = new_units.float().view(n, length // g, g) if length % g == 0 else None
        if groups is None:  # a last, shorter group: pad with the row's last value (no change to its range)
            pad = (-length) % g
            x = torch.cat([new_units.float(), new_units[:, -1:].float().expand(n, pad)], dim=1)
            groups = x.view(n, -1, g)
        new_sq = ((groups.amax(-1) - groups.amin(-1)).double() ** 2).mean(-1)
        range_sq = new_sq if held_range_sq is None else torch.cat([held_range_sq, new_sq])
        return alloc.range_errors(range_sq, self.spec.bit_set)

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
        self.batch = int(rows.numel())
        self._back_under_budget()

    def _back_under_budget(self) -> None:
        """Rows share one budget: copying the rows that hold wider units (beams), or dropping cheap
        tokens (crop), can pass it. Demote at once, so that the budget holds after every call."""
        if self.allocated and self._over_budget():
            self._reallocate()

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

    # --- read -------------------------------------------------------------------------
    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts_k, parts_v = [self.sink_k.to(self.dtype)], [self.sink_v.to(self.dtype)]
        self.drop = None
        if self.n_quant:
            buf = torch.empty(self.store.n_units, self.unit_len, dtype=self.dtype, device=self.device)
            k, v = self._from_units(self.store.dequantize_into(buf), self.n_quant)
            parts_k.append(k)
            parts_v.append(v)
            if self.store.evicts:
                self.drop = self._evicted_positions()
        parts_k.append(self.win_k.to(self.dtype))
        parts_v.append(self.win_v.to(self.dtype))
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    def _evicted_positions(self) -> torch.Tensor | None:
        """[B, H, seq_len] bool, True where a token's unit was evicted (0 bits); None if none was.
        The attention function masks these positions out (smartkv/attention.py). Which quantized
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

    # --- memory -----------------------------------------------------------------------
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
        return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage of its own: a slice of a larger tensor would keep all of it alive."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)
