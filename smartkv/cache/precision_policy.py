"""The allocation policy of a mixed-precision layer: importance -> a width per unit, under its budget.

Tokens wait in the FP16 window and get their bits when they leave it (docs/DESIGN.md
decision 3: precision only goes down). Three moves, all through `smartkv.allocate`:

- `_reallocate`: every quantized unit (capped at its current width: demotions only) plus the
  tokens leaving the window, once when the prompt is allocated and then every `realloc_freq`
  decoded tokens; it reserves room for the tokens that will wait in the window until the next one.
- `_release_window`: between re-allocations, tokens leave the window at the widths the slack affords.
- `_hold_floor`: a context too short for the budget holds the floor (lowest width) and says so.

Importance comes from the cache's `ImportanceTracker` (SnapKV-style observation window or an
EMA over queries, `spec.signal`), summed per unit and mixed with a uniform `prior`. The
allocator's value model is each width's squared error measured on the unit's group ranges
(`error_model="range"`), or the 4**-b model of a uniform quantizer (`"bits"`).

`PrecisionPolicy` is a mixin of `MixedPrecisionLayer` (smartkv/cache/mixed.py): each move
rewrites the layer's window and packed store, and reads its byte model (smartkv/cache/layer_budget.py).
"""

from __future__ import annotations

import torch

from smartkv import allocate as alloc
from smartkv.cache.packed_store import GONE


class PrecisionPolicy:
    """When and at which widths a `MixedPrecisionLayer`'s tokens are stored."""

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

    def _pad_levels(self, levels: torch.Tensor, pads: torch.Tensor | None) -> torch.Tensor:
        """`levels` with left-padding pads held by no width: level 0 where that is eviction, else GONE
        (dropped: a pad is no context, so it costs no bytes either way)."""
        if pads is not None and self.store.can_drop:
            levels[pads] = 0 if self.store.evicts else GONE
        return levels

    def _allocate(self, imp: torch.Tensor, caps: torch.Tensor, pads: torch.Tensor | None, available: int,
                  errors: torch.Tensor | None) -> torch.Tensor:
        """Widths (levels) of units under `available` bytes, pads held by no width. Where level 0 is
        eviction, a pad is capped there and costs nothing; where it is a width, the pads are taken out
        of the allocation (they would cost its bytes) and dropped."""
        s = self.spec
        if pads is not None and bool(pads.any()) and self.store.can_drop and not self.store.evicts:
            real = ~pads
            levels = torch.zeros(imp.shape[0], dtype=torch.long)
            levels[real] = alloc.allocate(s.allocation, imp[real], self.costs, caps[real], available, s.bit_set,
                                          self.generator, None if errors is None else errors[real])
            return self._pad_levels(levels, pads)
        if pads is not None:
            caps[pads] = 0  # level 0: eviction (or a single width's only level)
        return alloc.allocate(s.allocation, imp, self.costs, caps, available, s.bit_set, self.generator, errors)

    def _hold_floor(self) -> None:
        """Too short a context for the budget: hold the least this layer can, and say so once per cache."""
        self.store.demote(self._pad_levels(torch.zeros(self.store.n_units, dtype=torch.long), self._pad_units(0, self.n_quant)))
        pads = self._pad_units(self.n_quant, self.win_k.shape[-2])
        units = self._leaving(0)
        self.store.append(units, self._pad_levels(torch.zeros(units.shape[0], dtype=torch.long), pads))
        if self.cache is not None:
            frm = self.budget_holds_from()
            self.cache.warn_once(
                "short_context",
                f"smartkv: {self.floor_message(self.seq_len)}; holding that floor instead (sinks in FP16, the rest at "
                f"{self.spec.bit_set[0]} bits) " + (f"until the context reaches {frm} tokens, from which the budget holds"
                                                    if frm is not None else "at every length: the budget is below the lowest width")
                + "; memory_report()['budget_met'] says whether it holds now",
            )

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
        pads = self._pad_units(self.n_quant, n_out)  # left padding: no context, held by no width
        available = budget - held - self._fixed_bytes(keep)
        units = self._leaving(keep)
        self.store.append(units, self._allocate(imp, caps, pads, available, self._errors(None, units)))

    def _reallocate(self) -> None:
        """Re-allocate every quantized unit (caps: current width) plus the tokens leaving the window."""
        s = self.spec
        if s.budget is None:
            self._release_window()
            return
        # Leave room for the tokens that will wait in the window until the next re-allocation, so
        # that the steps in between need no work at all (and the budget still holds at each one).
        # The reserve is capped at 1% of the FP16 bytes, so short contexts do not pay for it.
        committed = (self.n_quant * self.units_per_row - self.store.dropped) * self.costs[0]
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
        pads = self._pad_units(0, self.n_quant + n_out)  # left padding: no context, held by no width
        available = budget - self._fixed_bytes(keep)
        units = self._leaving(keep)
        levels = self._allocate(imp, caps, pads, available, self._errors(self.store.range_sq() if n_old else None, units))
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

    def _back_under_budget(self) -> None:
        """Rows share one budget: copying the rows that hold wider units (beams), or dropping cheap
        tokens (crop), can pass it. Demote at once, so that the budget holds after every call."""
        if self.allocated and self._over_budget():
            self._reallocate()
