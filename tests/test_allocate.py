"""Allocation policies: within budget, optimal where checkable, caps respected, clear errors."""

import pytest
import torch

from smartkv.allocate import BudgetError, allocate, dp, entropy_budget_fractions, error_weights, greedy

BITS = (2, 3, 4, 8)
COSTS = [28, 36, 44, 76]  # 64 values: codes + 8 bytes scale/zero + 4 bytes index


def cost_of(levels):
    return sum(COSTS[k] for k in levels.tolist())


def value_of(imp, levels):
    return float((imp.double() * error_weights(BITS)[levels]).sum())


@pytest.mark.parametrize("policy", ["greedy", "dp", "random", "fixed"])
@pytest.mark.parametrize("per_unit", [28, 31, 40, 60, 80])
def test_never_over_budget(policy, per_unit):
    torch.manual_seed(per_unit)
    imp = torch.rand(120) ** 3
    caps = torch.full((120,), 3)
    available = 120 * per_unit
    levels = allocate(policy, imp, COSTS, caps, available, BITS, torch.Generator().manual_seed(0))
    assert cost_of(levels) <= available
    # nearly all the budget is used (at most one 4->8 step left unspent), unless everything is at the top
    assert cost_of(levels) > available - (COSTS[3] - COSTS[2]) or bool((levels == 3).all())


def test_greedy_matches_exact_dp_on_small_problems():
    for seed in range(5):
        torch.manual_seed(seed)
        imp = torch.rand(40) ** 4
        caps = torch.randint(0, 4, (40,))
        available = 40 * 36
        g = greedy(imp, COSTS, caps, available, BITS)
        d = dp(imp, COSTS, caps, available, BITS)
        # dp is exact, so its expected error is never worse; greedy stays within 5 % of it here
        assert value_of(imp, d) <= value_of(imp, g) + 1e-12
        assert value_of(imp, g) <= value_of(imp, d) * 1.05 + 1e-12


def test_important_units_get_more_bits():
    imp = torch.tensor([0.0, 0.01, 0.5, 10.0])
    levels = greedy(imp, COSTS, torch.full((4,), 3), 28 + 28 + 44 + 76, BITS)
    assert levels.tolist() == [0, 0, 2, 3]


def test_caps_are_respected():
    imp = torch.tensor([5.0, 5.0, 5.0])
    caps = torch.tensor([0, 1, 3])
    for policy in ("greedy", "dp"):
        levels = allocate(policy, imp, COSTS, caps, 10_000, BITS)
        assert levels.tolist() == [0, 1, 3]


def test_fixed_is_uniform_when_budget_allows():
    levels = allocate("fixed", torch.rand(10), COSTS, torch.full((10,), 3), 10 * 36, BITS)
    assert levels.tolist() == [1] * 10


def test_budget_below_floor_is_a_clear_error():
    with pytest.raises(BudgetError, match="10 units need 280 bytes"):
        greedy(torch.ones(10), COSTS, torch.full((10,), 3), 279, BITS)


def test_unknown_policy_named():
    with pytest.raises(ValueError, match="'best'"):
        allocate("best", torch.ones(2), COSTS, torch.full((2,), 3), 1000, BITS)


def test_entropy_fractions_keep_the_mean():
    f = entropy_budget_fractions([1.0, 2.0, 3.0, float("nan")], 0.3, 0.5)
    assert abs(sum(f) / len(f) - 0.3) < 1e-9
    assert f[0] < f[1] < f[2]
    assert entropy_budget_fractions([1.0, 2.0], 0.3, 0.0) == [0.3, 0.3]


def test_entropy_fractions_give_each_layer_its_floor_first():
    ent, floors = [0.5, 1.0, 4.0, 2.0], [0.2, 0.2, 0.2, 0.2]
    f = entropy_budget_fractions(ent, 0.24, 0.5, floors)
    assert sum(f) / len(f) == pytest.approx(0.24)
    assert all(x >= 0.2 for x in f)  # the whole-budget tilt would give 0.24 * 0.5 = 0.12 to layer 0
    assert f[0] < f[1] < f[3] < f[2]
    # near 1, shares are capped at 1 and the rest goes to the other layers, mean kept
    g = entropy_budget_fractions([1.0, 1.0, 10.0], 0.9, 0.9, [0.2] * 3)
    assert max(g) == 1.0 and sum(g) / 3 == pytest.approx(0.9)
    # at or below the mean floor nothing is tilted: each layer meets (or fails) the budget itself
    assert entropy_budget_fractions(ent, 0.19, 0.5, floors) == [0.19] * 4
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        entropy_budget_fractions(ent, 0.3, 0.5, [0.2] * 3)


def test_greedy_fills_with_cheaper_steps_after_one_that_does_not_fit():
    # unit 0's 4->8 step (32 bytes) is worth most per byte but does not fit in what is left;
    # the cheaper 2->3 steps further down the order still do.
    imp = torch.tensor([100.0, 1.0, 1.0])
    caps = torch.full((3,), 3)
    available = 3 * 28 + 16 + 16  # unit 0 to 4 bits (16), then 16 bytes left: two 2->3 steps
    levels = greedy(imp, COSTS, caps, available, BITS)
    assert levels.tolist() == [2, 1, 1]
    assert cost_of(levels) == available


def test_measured_errors_steer_the_allocation():
    imp = torch.ones(2)
    caps = torch.full((2,), 3)
    # unit 1's error hardly drops above 2 bits (e.g. a flat vector), unit 0's drops a lot
    errors = torch.tensor([[1.0, 0.2, 0.05, 0.001], [0.01, 0.009, 0.008, 0.007]])
    for policy in ("greedy", "dp"):
        levels = allocate(policy, imp, COSTS, caps, 28 + 28 + 16, BITS, errors=errors)
        assert levels.tolist() == [2, 0]
    # with the 4**-b model the two equally important units would share the 16 bytes
    assert greedy(imp, COSTS, caps, 28 + 28 + 16, BITS).tolist() == [1, 1]
    # a shared per-level error vector works like the 4**-b model
    shared = error_weights(BITS)
    assert torch.equal(greedy(imp, COSTS, caps, 100, BITS, shared), greedy(imp, COSTS, caps, 100, BITS))


def test_greedy_keeps_chains_with_non_convex_measured_errors():
    # a measured error that drops more from 3 to 4 bits than from 2 to 3: the chain still holds
    torch.manual_seed(0)
    imp = torch.rand(50)
    errors = torch.tensor([1.0, 0.95, 0.1, 0.05])
    levels = greedy(imp, COSTS, torch.full((50,), 3), 50 * 34, BITS, errors)
    assert cost_of(levels) <= 50 * 34
    d = dp(imp, COSTS, torch.full((50,), 3), 50 * 34, BITS, errors)
    val = lambda lv: float((imp.double() * errors.double()[lv]).sum())
    assert val(d) <= val(levels) + 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_dp_equals_brute_force_on_small_instances(seed):
    """An independent reference: every assignment of widths to 6 units, the cheapest error within budget."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    n = 6
    imp = torch.rand(n, generator=g) ** 3
    caps = torch.randint(0, 4, (n,), generator=g)
    available = int(torch.randint(n * COSTS[0], n * COSTS[-1] + 1, (1,), generator=g))
    w = error_weights(BITS).double()
    best = min(float((imp.double() * w[list(c)]).sum())
               for c in itertools.product(range(len(BITS)), repeat=n)
               if all(k <= int(m) for k, m in zip(c, caps)) and sum(COSTS[k] for k in c) <= available)
    d = dp(imp, COSTS, caps, available, BITS)
    assert cost_of(d) <= available and all(int(k) <= int(m) for k, m in zip(d, caps))
    assert value_of(imp, d) == pytest.approx(best, rel=1e-12, abs=1e-15)
