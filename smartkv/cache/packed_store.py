"""Packed store: quantized units, each at its own bit width, addressed by unit number.

A *unit* is a row of `unit_len` values that shares one precision (what a unit covers, a
token's K and V or one head of it, is the owning layer's business). Units are numbered
0, 1, 2, ... in the order the layer hands them over. For each width the store holds one
`QuantizedRows` with the units at that width and an int32 index of which units they are.
A store with a single width holds its units in order and needs no index (uniform INTk).

Width 0 is eviction: a unit at 0 bits keeps nothing at all (no codes, no scale, no index:
it is the unit that no other width's index names). Readers get zeros for it, and the layer
masks it out of attention. A store without a 0-bit width can still drop a unit that is no
context (a left-padding pad): its level is `GONE`, held the same way, by no width. A store of
one width holds its units in order without an index, so it drops none.

Scales and zero-points are stored in `scale_format` (FP16, BF16, or 8-bit codes with FP16
constants shared per unit: smartkv/scale_format.py); `costs` prices each width with it, so
the allocator spends what cheaper metadata saves.

Every tensor held is counted by `nbytes`, index and shared constants included.
"""

from __future__ import annotations

import itertools

import torch

from smartkv.quantize import QuantizedRows, quantize_rows, row_nbytes

INDEX_BYTES = 4  # int32 unit index
GONE = -1  # the level of a unit no width holds in a store without a 0-bit width (a dropped pad)
_SERIALS = itertools.count()


class PackedStore:
    def __init__(self, bit_set: tuple[int, ...], unit_len: int, group: int, symmetric: bool,
                 scale_format: str = "fp16") -> None:
        self.bit_set, self.unit_len, self.group, self.symmetric = bit_set, unit_len, group, symmetric
        self.scale_format = scale_format
        self.single = len(bit_set) == 1
        self.rows: dict[int, QuantizedRows] = {}  # level -> rows at bit_set[level]
        self.index: dict[int, torch.Tensor | None] = {}  # level -> int32 unit ids (None: all units in order)
        self.n_units = 0
        # bytes one unit costs at each level, index included
        self.costs = [0 if b == 0 else row_nbytes(unit_len, b, group, symmetric, scale_format)
                      + (0 if self.single else INDEX_BYTES) for b in bit_set]
        self.evicts = bit_set[0] == 0  # level 0 is eviction
        # (serial, version) names the units held: `version` is bumped by every change and each store
        # gets its own serial, so readers can cache what they derive from the layout without holding the store
        self.serial = next(_SERIALS)
        self.version = 0

    @property
    def dropped(self) -> int:
        """Units at GONE: those no width holds, in a store without a 0-bit width (its dropped pads)."""
        return 0 if self.evicts else self.n_units - sum(rows.n_rows for rows in self.rows.values())

    @property
    def holds_gone(self) -> bool:
        """Whether some unit may be held by no width (evicted at 0 bits, or dropped at GONE): readers mask it."""
        return self.evicts or self.dropped > 0

    @property
    def can_drop(self) -> bool:
        """Whether units can be left out at GONE: every store but one of a single width (no index)."""
        return not self.single

    # --- write --------------------------------------------------------------------------
    def append(self, units: torch.Tensor, levels: torch.Tensor) -> None:
        """Quantize new units [n, unit_len] (numbered after the ones held) at `levels` [n] (GONE: drop it)."""
        if units.shape[0] == 0:
            return
        self.version += 1
        first = self.n_units
        for lvl, at in by_level(levels):
            if lvl == GONE and not self.can_drop:
                raise ValueError("a store of one width holds every unit in order: it cannot drop one")
            if lvl == GONE or self.bit_set[lvl] == 0:  # evicted: nothing is kept, so nothing is copied out either
                continue
            # one contiguous row gather per width (a boolean mask per width scans and gathers slower)
            self._add(lvl, self._quantize(units.index_select(0, at.to(units.device)), lvl), at + first)
        self.n_units += units.shape[0]

    def _add(self, lvl: int, rows: QuantizedRows | None, ids: torch.Tensor) -> None:
        if rows is None:  # evicted: nothing is kept
            return
        if lvl in self.rows:
            self.rows[lvl] = self.rows[lvl].cat_rows(rows)
            if not self.single:
                self.index[lvl] = torch.cat([self.index[lvl], ids.to(torch.int32)])
        else:
            self.rows[lvl] = rows
            self.index[lvl] = None if self.single else ids.to(torch.int32)

    def demote(self, new_levels: torch.Tensor) -> None:
        """Move units whose level dropped to their new width (never up).

        A demoted unit is re-quantized from its de-quantized values.
        """
        self.version += 1
        for lvl in sorted(self.rows):
            idx = self.ids(lvl)
            target = new_levels[idx]
            moving = target != lvl
            if not bool(moving.any()):
                continue
            if bool((target > lvl).any()):
                raise AssertionError("re-allocation raised a stored unit's precision")
            rows = self.rows[lvl]
            out, stay = moving.nonzero().squeeze(1), (~moving).nonzero().squeeze(1)
            on = rows.scale.device  # (the index of ids is on the CPU; the rows may be on a GPU)
            values = rows.select(out.to(on)).dequantize(torch.float32)
            self.rows[lvl] = rows.select(stay.to(on))
            self.index[lvl] = idx[stay].to(torch.int32)
            moved_ids, moved_to = idx[out], target[out]
            for new, at in by_level(moved_to):
                self._add(new, self._quantize(values.index_select(0, at.to(values.device)), new), moved_ids[at])

    def _quantize(self, units: torch.Tensor, lvl: int) -> QuantizedRows | None:
        bits = 0 if lvl == GONE else self.bit_set[lvl]
        return None if bits == 0 else quantize_rows(units, bits, self.group, self.symmetric, self.scale_format)

    # --- read ---------------------------------------------------------------------------
    def ids(self, lvl: int) -> torch.Tensor:
        """Unit numbers held at level `lvl`, int64."""
        idx = self.index[lvl]
        return torch.arange(self.rows[lvl].n_rows) if idx is None else idx.long()

    def levels(self) -> torch.Tensor:
        """Level of every unit, int64 [n_units]: a unit no width holds is at level 0 when that is
        eviction, else at GONE."""
        levels = torch.full((self.n_units,), 0 if self.evicts else GONE, dtype=torch.long)
        for lvl in self.index:
            levels[self.ids(lvl)] = lvl
        return levels

    def unit_bits(self) -> torch.Tensor:
        """Bit width of every unit held, float [n_units]."""
        out = torch.zeros(self.n_units)
        for lvl in self.rows:
            out[self.ids(lvl)] = float(self.bit_set[lvl])
        return out

    def range_sq(self) -> torch.Tensor:
        """Mean squared group range of every unit held, float64 [n_units], read from the scales
        (asymmetric: range = scale * (2**b - 1)): what the allocator's error model needs
        for units whose original values are gone."""
        out = torch.zeros(self.n_units, dtype=torch.float64)
        for lvl, rows in self.rows.items():
            if rows.n_rows:
                span = rows.scale_values().double() * (2 ** self.bit_set[lvl] - 1)
                out[self.ids(lvl)] = (span**2).mean(dim=-1)
        return out

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """De-quantize every unit into row `unit number` of `out` [n_units, unit_len] (evicted units: zeros)."""
        if self.holds_gone:
            out.zero_()
        for lvl, rows in self.rows.items():
            if rows.n_rows:
                rows.dequantize_into(out, self.index[lvl])  # fused unpack + scale + scatter
        return out

    # --- memory -------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes of the units held as the allocator counts them (`costs` per unit)."""
        return sum(self.costs[lvl] * rows.n_rows for lvl, rows in self.rows.items())

    @property
    def nbytes(self) -> int:
        total = sum(r.nbytes for r in self.rows.values())
        return total + sum(i.nbytes for i in self.index.values() if i is not None)

    def memory_breakdown(self) -> dict[str, int]:
        """`nbytes` split into packed codes, scales with zero-points (and int8's shared constants), and the unit index."""
        rows = list(self.rows.values())
        return {
            "codes": sum(p.nbytes for r in rows for p in r.planes),
            "scales": sum(r.metadata_nbytes for r in rows),
            "index": sum(i.nbytes for i in self.index.values() if i is not None),
        }

    def values_per_width(self) -> dict[int, int]:
        """Number of values held at each bit width (0: evicted)."""
        hist: dict[int, int] = {}
        if self.holds_gone:
            held = sum(rows.n_rows for rows in self.rows.values())
            hist[0] = (self.n_units - held) * self.unit_len
        for lvl, rows in self.rows.items():
            b = self.bit_set[lvl]
            hist[b] = hist.get(b, 0) + rows.n_rows * self.unit_len
        return hist

    # --- beam search / cropping ---------------------------------------------------------
    def gather(self, src: torch.Tensor) -> "PackedStore":
        """A store whose unit j is this store's unit `src[j]`, at its width (repeats allowed: beams)."""
        levels = self.levels()
        pos = torch.empty(self.n_units, dtype=torch.long)  # row of each unit within its width's rows
        for lvl, rows in self.rows.items():
            pos[self.ids(lvl)] = torch.arange(rows.n_rows)
        src = src.long().cpu()
        new_levels, new_pos = levels[src], pos[src]
        out = PackedStore(self.bit_set, self.unit_len, self.group, self.symmetric, self.scale_format)
        for lvl in new_levels.unique().tolist():
            if lvl not in self.rows:  # evicted units (width 0): nothing to carry over
                continue
            at = (new_levels == lvl).nonzero().squeeze(1)
            out.rows[lvl] = self.rows[lvl].select(new_pos[at].to(self.rows[lvl].scale.device))
            out.index[lvl] = None if self.single else at.to(torch.int32)
        out.n_units = int(src.numel())
        return out


def by_level(levels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(level, positions holding it) for each level present, levels ascending, positions ascending:
    what `levels == lvl` masks select, from one stable sort instead of one scan per level."""
    order = torch.sort(levels, stable=True)
    counts = torch.unique_consecutive(order.values, return_counts=True)
    return list(zip(counts[0].tolist(), order.indices.split(counts[1].tolist())))
