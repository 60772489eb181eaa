"""The re-allocation path (and the tracker's per-step update) as it was before it was made cheaper (commit 6d849f8), kept verbatim as
the reference that the faster one must match decision for decision (tests/test_realloc_identity.py),
and that a same-process timing can switch back to (`reference_path`).

Only the bodies that changed are here; `reference_path()` swaps them in for the current ones."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from smartkv import allocate as alloc
from smartkv.cache import packed_store
from smartkv.importance import LayerImportance
from smartkv.allocate import _check, _errors as _alloc_errors


def append(self, units: torch.Tensor, levels: torch.Tensor) -> None:
    if units.shape[0] == 0:
        return
    self.version += 1
    ids = torch.arange(self.n_units, self.n_units + units.shape[0])
    for lvl in levels.unique().tolist():
        sel = levels == lvl
        self._add(lvl, self._quantize(units[sel], lvl), ids[sel])
    self.n_units += units.shape[0]


def demote(self, new_levels: torch.Tensor) -> None:
    self.version += 1
    for lvl in sorted(self.rows):
        idx = self.ids(lvl)
        target = new_levels[idx]
        moving = target != lvl
        if not bool(moving.any()):
            continue
        if bool((target > lvl).any()):
            raise AssertionError("re-allocation raised a stored unit's precision")
        values = self.rows[lvl].select(moving).dequantize(torch.float32)
        keep = ~moving
        self.rows[lvl] = self.rows[lvl].select(keep)
        self.index[lvl] = idx[keep].to(torch.int32)
        for new in target[moving].unique().tolist():
            sel = target[moving] == new
            self._add(new, self._quantize(values[sel], new), idx[moving][sel])


def greedy(importance, costs, caps, available, bit_set, errors=None):
    n, base = _check(importance, costs, caps, available)
    levels = len(costs)
    if n == 0 or levels == 1:
        return torch.zeros(n, dtype=torch.long)
    err = _alloc_errors(errors, bit_set, n)
    imp = importance.double().clamp_min(0.0)
    dcost = torch.tensor([costs[k + 1] - costs[k] for k in range(levels - 1)], dtype=torch.float64)
    gain = imp[None, :] * (err[:, :-1] - err[:, 1:]).clamp_min(0.0).t()
    ratio = torch.cummin(gain / dcost[:, None], dim=0).values
    valid = caps[None, :] > torch.arange(levels - 1)[:, None]
    ratio = torch.where(valid, ratio, torch.full_like(ratio, -1.0))
    order = torch.sort(ratio.flatten(), descending=True, stable=True).indices
    order = order[valid.flatten()[order]]
    step_cost = dcost[order // n]
    spend = torch.cumsum(step_cost, 0)
    fits = spend <= (available - base)
    cut = int(fits.sum()) if bool(fits.all()) else int(torch.argmin(fits.to(torch.uint8)))
    level = torch.bincount(order[:cut] % n, minlength=n)
    left = (available - base) - (float(spend[cut - 1]) if cut else 0.0)
    rest = order[cut:]
    cheapest = float(dcost.min())
    while rest.numel() and left >= cheapest:
        k, unit = rest // n, rest % n
        ok = (level[unit] == k) & (dcost[k] <= left)
        if not bool(ok.any()):
            break
        j = int(torch.argmax(ok.to(torch.uint8)))
        level[unit[j]] += 1
        left -= float(dcost[k[j]])
        rest = rest[j + 1 :]
    return level


def tracker_add(self, name, value, decay=None):
    if name not in self.keep:
        return
    t = getattr(self, name)
    n = value.shape[-1]
    keep_share = 1.0 if decay is None else decay
    merged = (t[..., :n].float() * keep_share + value).to(self.dtype)
    if n == t.shape[-1]:
        setattr(self, name, merged)
    else:
        rest = t[..., n:].float() * keep_share
        setattr(self, name, torch.cat([merged, rest.to(self.dtype)], dim=-1))


# (owner, attribute, reference body)
REFERENCE = [
    (packed_store.PackedStore, "append", append),
    (packed_store.PackedStore, "demote", demote),
    (alloc, "greedy", greedy),
    (LayerImportance, "_add", tracker_add),
]


@contextmanager
def reference_path():
    """Run the block on the reference bodies; the current ones are restored on exit."""
    saved = [(owner, name, owner.__dict__[name])
             for owner, name, _ in REFERENCE]
    try:
        for owner, name, body in REFERENCE:
            setattr(owner, name, body)
        yield
    finally:
        for owner, name, body in saved:
            setattr(owner, name, body)
