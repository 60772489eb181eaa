"""Precision allocation: bits per unit (a token's K/V vector, per layer or per head) under a byte budget.

Every unit holds `U` values and may be stored at any width of `bit_set`; its cost at each
width is the same for all units (packed codes + FP16 scale/zero per group + its index), so
costs are a vector over levels. The value of giving unit i width b is its importance times
the reduction of squared error. The error of each width is *measured* on the tensor being
stored (`errors`: one row per level, or one per unit and level); without a measurement it
falls back to the model of a uniform quantizer, 4**-b (the step halves with each extra bit).
Policies maximise that value under the budget:

- `greedy`: take the upgrade steps with the best value per byte first. Each unit's steps
  are made to come in decreasing value per byte (exact for 4**-b, which is convex in b;
  enforced by a running minimum for measured errors), so a single sort of all steps
  respects every unit's chain of levels. The prefix of steps that fits is taken at once;
  then cheaper steps further down the order still fill what is left (a step that does not
  fit does not end the allocation). O(n log n).
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
    return torch.tensor([4.0 ** (-b) for b in bit_set], dtype=torch.float64)  # b = 0 (evicted): 1, the whole unit


def range_errors(range_sq: torch.Tensor, bit_set) -> torch.Tensor:
    """Expected squared error per (unit, level) of a uniform quantizer: step**2 / 12 with
    step = range / (2**b - 1), averaged over a unit's groups. `range_sq`: [n] mean squared
    group range of each unit. Units with outliers (a wide range) lose more per dropped bit."""
    # Width 0 (eviction) loses the unit outright: charged as its energy, ~ (range / 2)**2.
    levels = torch.tensor([0.25 if b == 0 else 1.0 / (12.0 * (2.0**b - 1.0) ** 2) for b in bit_set],
                          dtype=torch.float64)
    return range_sq.double()[:, None] * levels[None, :]


def _errors(errors, bit_set, n: int) -> torch.Tensor:
    """Squared error per (unit, level) as float64 [n, levels]."""
    err = error_weights(tuple(bit_set)) if errors is None else torch.as_tensor(errors, dtype=torch.float64)
    return err.expand(n, -1) if err.dim() == 1 else err


def _check(importance, costs, caps, available):
    n = importance.shape[0]
    base = n * int(costs[0])
    if base > available:
        raise BudgetError(f"{n} units need {base} bytes at the lowest precision, but only {available} are available")
    return n, base


def greedy(importance: torch.Tensor, costs: list[int], caps: torch.Tensor, available: int, bit_set,
           errors: torch.Tensor | None = None) -> torch.Tensor:
    """Level index (into `bit_set`) per unit. importance: [n] >= 0; caps: [n] highest level allowed."""
    n, base = _check(importance, costs, caps, available)
    levels = len(costs)
    if n == 0 or levels == 1:
        return torch.zeros(n, dtype=torch.long)
    err = _errors(errors, bit_set, n)  # [n, levels]
    imp = importance.double().clamp_min(0.0)
    dcost = torch.tensor([costs[k + 1] - costs[k] for k in range(levels - 1)], dtype=torch.float64)
    gain = imp[None, :] * (err[:, :-1] - err[:, 1:]).clamp_min(0.0).t()  # [levels-1, n], step k: level k -> k+1
    # A unit's later steps may not be worth more per byte than its earlier ones (chain order).
    ratio = torch.cummin(gain / dcost[:, None], dim=0).values
    valid = caps[None, :] > torch.arange(levels - 1)[:, None]
    # Stable sort over a level-major flattening: among equal ratios, lower steps come first. Only
    # the steps under the caps are sorted (a stable sort keeps their order among themselves), so a
    # re-allocation, where most held units are capped below the top, sorts far fewer.
    steps = valid.flatten().nonzero().squeeze(1)
    order = steps[torch.sort(ratio.flatten()[steps], descending=True, stable=True).indices]
    step_cost = dcost[order // n]
    spend = torch.cumsum(step_cost, 0)
    fits = spend <= (available - base)
    # The prefix that fits is a valid chain for every unit; take it at once.
    cut = int(fits.sum()) if bool(fits.all()) else int(torch.argmin(fits.to(torch.uint8)))
    level = torch.bincount(order[:cut] % n, minlength=n)
    left = (available - base) - (float(spend[cut - 1]) if cut else 0.0)
    rest = order[cut:]
    cheapest = float(dcost.min())
    # Fill what is left with cheaper steps further down the order, still one chain step at a time.
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


def dp(importance: torch.Tensor, costs: list[int], caps: torch.Tensor, available: int, bit_set,
       errors: torch.Tensor | None = None, max_cells: int = 60_000_000) -> torch.Tensor:
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
    err = _errors(errors, bit_set, n)
    gains = importance.double().clamp_min(0.0)[:, None] * (err[:, :1] - err)  # [n, levels]
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
             bit_set, generator: torch.Generator | None = None, errors: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by policy name (a table look-up, no if/elif ladder over strings)."""
    if policy not in _SOLVERS:
        raise ValueError(f"unknown allocation policy {policy!r}; allowed: {POLICIES}")
    return _SOLVERS[policy](importance, costs, caps, available, bit_set, generator, errors)


_SOLVERS = {
    "greedy": lambda imp, c, cap, a, bs, g, e: greedy(imp, c, cap, a, bs, e),
    "dp": lambda imp, c, cap, a, bs, g, e: dp(imp, c, cap, a, bs, e),
    "random": lambda imp, c, cap, a, bs, g, e: greedy(torch.rand(imp.shape, generator=g, dtype=torch.float64),
                                                      c, cap, a, bs, e),
    "fixed": lambda imp, c, cap, a, bs, g, e: greedy(torch.ones_like(imp, dtype=torch.float64), c, cap, a, bs, e),
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
