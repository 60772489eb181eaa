"""Precision allocation: bits per unit (a token's K/V vector, per layer or per head) under a byte budget.

Every unit holds `U` values and may be stored at any width of `bit_set`; its cost at each
width is the same for all units (packed codes + FP16 scale/zero per group + its index), so
costs are a vector over levels. The value of giving unit i width b is its importance times
the reduction of expected squared error, which for a uniform quantizer scales as 4**-b
(the step halves with each extra bit). Policies maximise that value under the budget:

- `greedy`: take the upgrade steps with the best value per byte first. Because 4**-b is
  convex in b and cost is linear in b, each unit's steps come in decreasing value per byte,
  so a single sort of all steps respects every unit's chain of levels. O(n log n).
- `dp`: the exact multiple-choice knapsack by dynamic programming (ablation: how far from
  optimal is greedy). O(n x budget / quantum).
- `random`: greedy on random importance (ablation: no attention signal).
- `fixed`: greedy on equal importance: every unit at the same width, the highest that
  fits, leftover budget to units in order (ablation: no importance at all).

Caps: a unit already stored at level c can only stay or go down (precision is never
restored once discarded), so its upgrades stop at c.
"""

from __future__ import annotations

import torch

POLICIES = ("greedy", "dp", "random", "fixed")


class BudgetError(ValueError):
    """The budget is below what the smallest precision (plus what must stay at full precision) needs."""


def error_weights(bit_set: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([4.0 ** (-b) for b in bit_set], dtype=torch.float64)


def _check(importance, costs, caps, available):
    n = importance.shape[0]
    base = n * int(costs[0])
    if base > available:
        raise BudgetError(f"{n} units need {base} bytes at the lowest precision, but only {available} are available")
    return n, base


def greedy(importance: torch.Tensor, costs: list[int], caps: torch.Tensor, available: int, bit_set) -> torch.Tensor:
    """Level index (into `bit_set`) per unit. importance: [n] >= 0; caps: [n] highest level allowed."""
    n, base = _check(importance, costs, caps, available)
    levels = len(costs)
    if n == 0 or levels == 1:
        return torch.zeros(n, dtype=torch.long)
    err = error_weights(bit_set)
    imp = importance.double().clamp_min(0.0)
    dcost = torch.tensor([costs[k + 1] - costs[k] for k in range(levels - 1)], dtype=torch.float64)
    gain = imp[None, :] * (err[:-1] - err[1:])[:, None]  # [levels-1, n], step k: level k -> k+1
    ratio = gain / dcost[:, None]
    valid = caps[None, :] > torch.arange(levels - 1)[:, None]
    ratio = torch.where(valid, ratio, torch.full_like(ratio, -1.0))
    # Stable sort over a level-major flattening: among equal ratios, lower steps come first.
    order = torch.sort(ratio.flatten(), descending=True, stable=True).indices
    step_cost = dcost[:, None].expand(levels - 1, n).flatten()[order]
    taken_valid = valid.flatten()[order]
    fits = torch.cumsum(step_cost * taken_valid, 0) <= (available - base)
    take = order[fits & taken_valid]
    return torch.bincount(take % n, minlength=n)


def dp(importance: torch.Tensor, costs: list[int], caps: torch.Tensor, available: int, bit_set,
       max_cells: int = 60_000_000) -> torch.Tensor:
    """Exact allocation by dynamic programming over (unit, budget quanta)."""
    n, base = _check(importance, costs, caps, available)
    levels = len(costs)
    if n == 0 or levels == 1:
        return torch.zeros(n, dtype=torch.long)
    import math

    quantum = 0
    for k in range(1, levels):
        quantum = math.gcd(quantum, costs[k] - costs[0])
    extra = [(costs[k] - costs[0]) // quantum for k in range(levels)]
    cap_q = (available - base) // quantum
    cap_q = min(cap_q, n * extra[-1])  # more than everyone at the top is never needed
    if n * (cap_q + 1) > max_cells:
        raise BudgetError(
            f"dp allocation over {n} units x {cap_q + 1} budget steps exceeds {max_cells} cells; "
            "use allocation='greedy' or a coarser granularity"
        )
    err = error_weights(bit_set)
    gains = importance.double().clamp_min(0.0)[:, None] * (err[0] - err)[None, :]  # [n, levels]
    best = torch.zeros(cap_q + 1, dtype=torch.float64)
    choice = torch.zeros(n, cap_q + 1, dtype=torch.uint8)
    neg = torch.tensor(-float("inf"), dtype=torch.float64)
    for i in range(n):
        new = best + gains[i, 0]
        pick = torch.zeros(cap_q + 1, dtype=torch.uint8)
        for k in range(1, int(caps[i]) + 1):
            e = extra[k]
            if e > cap_q:
                break
            cand = torch.full_like(best, neg)
            cand[e:] = best[: cap_q + 1 - e] + gains[i, k]
            better = cand > new
            new = torch.where(better, cand, new)
            pick[better] = k
        best = new
        choice[i] = pick
    out = torch.zeros(n, dtype=torch.long)
    c = cap_q
    for i in range(n - 1, -1, -1):
        k = int(choice[i, c])
        out[i] = k
        c -= extra[k]
    return out


def allocate(policy: str, importance: torch.Tensor, costs: list[int], caps: torch.Tensor, available: int,
             bit_set, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dispatch by policy name (a table look-up, no if/elif ladder over strings)."""
    if policy not in _SOLVERS:
        raise ValueError(f"unknown allocation policy {policy!r}; allowed: {POLICIES}")
    return _SOLVERS[policy](importance, costs, caps, available, bit_set, generator)


_SOLVERS = {
    "greedy": lambda imp, c, cap, a, bs, g: greedy(imp, c, cap, a, bs),
    "dp": lambda imp, c, cap, a, bs, g: dp(imp, c, cap, a, bs),
    "random": lambda imp, c, cap, a, bs, g: greedy(torch.rand(imp.shape, generator=g, dtype=torch.float64), c, cap, a, bs),
    "fixed": lambda imp, c, cap, a, bs, g: greedy(torch.ones_like(imp, dtype=torch.float64), c, cap, a, bs),
}


def entropy_budget_fractions(entropies: list[float], budget: float, skew: float,
                             floors: list[float] | None = None) -> list[float]:
    """Per-layer budgets whose mean is `budget`, tilted towards layers with higher attention entropy.

    A layer whose attention is spread over many tokens (high entropy) cannot protect a few
    tokens and let the rest go cheap, so it gets more of the budget; a layer that attends to
    a few tokens gets less (PyramidKV makes the same argument for per-layer cache sizes).

    Every layer first gets its `floors[l]` (the least it can hold: sinks in FP16, every
    other token at the lowest width); only the spare budget above the mean floor is tilted:
    weight w_l = 1 + skew * (e_l / mean(e) - 1), clipped to [1 - skew, 1 + skew] and
    normalised to mean 1, and f_l = floor_l + spare * w_l, capped at 1 with the excess shared
    among the uncapped layers. A budget at or below the mean floor is returned unchanged for
    every layer, so the layer that cannot meet it raises its own `BudgetError`.
    """
    import math as _m

    n = len(entropies)
    floors = [0.0] * n if floors is None else list(floors)
    if len(floors) != n:
        raise ValueError(f"floors has {len(floors)} entries for {n} layers")
    known = [e for e in entropies if not _m.isnan(e)]
    spare = budget * n - sum(floors)
    if not known or skew == 0 or spare <= 0:
        return [budget] * n
    mean = sum(known) / len(known)
    if mean <= 0:
        return [budget] * n
    w = [1.0 if _m.isnan(e) else min(1 + skew, max(1 - skew, 1 + skew * (e / mean - 1))) for e in entropies]
    out = [0.0] * n
    free = list(range(n))
    # Water-filling: layers whose share would pass 1 are pinned at 1, the rest share what is left.
    while free:
        total_w = sum(w[i] for i in free)
        left = spare - sum(out[i] - floors[i] for i in range(n) if i not in free)
        share = {i: floors[i] + left * w[i] / total_w for i in free}
        over = [i for i in free if share[i] > 1.0]
        if not over:
            for i in free:
                out[i] = share[i]
            break
        for i in over:
            out[i] = 1.0
        free = [i for i in free if i not in over]
    return out
