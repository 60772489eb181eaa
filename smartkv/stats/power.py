"""Power of the exact McNemar test, and the number of paired prompts it needs.

Model (Connor 1987, Biometrics 43(1); Lachin 1992, Stat. Med. 11(9)): each of n pairs is
discordant with probability psi (the discordance rate); a difference in accuracy of delta
means p10 - p01 = delta, so a discordant pair favours the better run with probability
pi = (psi + delta) / (2 psi). The number M of discordant pairs is Binomial(n, psi); given
M = m, the test rejects when the count favouring one side falls in the exact two-sided
binomial(m, 1/2) critical region. Power is exact, summed over m: no simulation and no
normal approximation (the normal formula is used only to start the search for n).

Pairs are assumed independent: prompts that share a haystack carry less information, so
with clusters these numbers are an upper bound on the real power.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

N_MAX = 200_000


def _check(discordance: float, effect: float, alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} must lie in (0, 1)")
    if not 0 < effect <= 1:
        raise ValueError(f"effect={effect!r} must lie in (0, 1]")
    if not effect <= discordance <= 1:
        raise ValueError(f"discordance={discordance!r} must lie in [effect={effect}, 1]: "
                         "a difference of `effect` needs at least that share of discordant pairs")


def critical_counts(m_max: int, alpha: float = 0.05) -> np.ndarray:
    """c[m] for m = 0..m_max: the largest count k < m/2 with exact two-sided binomial(m, 1/2)
    p = 2 P(K <= k) <= alpha, or -1 where even k = 0 does not reject."""
    m = np.arange(m_max + 1)
    k = sps.binom.ppf(alpha / 2, m, 0.5)  # smallest k with P(K <= k) >= alpha/2
    k = np.where(sps.binom.cdf(k, m, 0.5) <= alpha / 2, k, k - 1)
    return np.minimum(k, np.ceil(m / 2) - 1).astype(int)


def _reject_given_m(m_max: int, pi: float, alpha: float) -> np.ndarray:
    """P(reject | m discordant pairs) for m = 0..m_max, one side favoured with prob. pi."""
    m = np.arange(m_max + 1)
    c = critical_counts(m_max, alpha)
    r = sps.binom.cdf(c, m, pi) + sps.binom.sf(m - c - 1, m, pi)
    return np.where(c >= 0, r, 0.0)


def mcnemar_power(n: int, discordance: float, effect: float = 0.10, alpha: float = 0.05) -> float:
    """Exact power of the two-sided exact McNemar test at level alpha with n pairs, a
    discordance rate `discordance` and a true accuracy difference `effect`."""
    _check(discordance, effect, alpha)
    if n < 1:
        raise ValueError(f"n={n!r} must be a positive number of pairs")
    pi = (discordance + effect) / (2 * discordance)
    r = _reject_given_m(n, pi, alpha)
    return float(np.dot(sps.binom.pmf(np.arange(n + 1), n, discordance), r))


def normal_n(discordance: float, effect: float = 0.10, alpha: float = 0.05, power: float = 0.8) -> float:
    """Connor's (1987) normal-approximation sample size for McNemar's test."""
    za, zb = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    return (za * math.sqrt(discordance) + zb * math.sqrt(discordance - effect**2)) ** 2 / effect**2


def n_for_power(discordance: float, effect: float = 0.10, alpha: float = 0.05, power: float = 0.8,
                n_max: int = N_MAX) -> int:
    """Smallest n (searched from half Connor's normal n upward) whose exact power reaches
    `power`. Exact power saw-tooths in n, so a slightly larger n can dip below again."""
    _check(discordance, effect, alpha)
    pi = (discordance + effect) / (2 * discordance)
    n0 = normal_n(discordance, effect, alpha, power)
    start, limit = max(1, int(0.5 * n0)), min(n_max, int(4 * n0) + 100)
    while True:
        r = _reject_given_m(limit, pi, alpha)  # depends on m only, shared by every n
        for n in range(start, limit + 1):
            if np.dot(sps.binom.pmf(np.arange(n + 1), n, discordance), r[: n + 1]) >= power:
                return n
        if limit >= n_max:
            raise ValueError(f"more than n_max={n_max} pairs needed for power {power}")
        start, limit = limit + 1, min(n_max, 2 * limit)


def power_report(tests, effect: float = 0.10, alpha: float = 0.05, target_power: float = 0.8,
                 discordance_grid=(0.1, 0.2, 0.3, 0.5)) -> dict:
    """`metrics/power.json`: for every pooled (task = "all") 0/1 comparison, its n (and clusters),
    observed discordance rate, the power to detect `effect` at that n and rate (the rate
    raised to `effect` where lower: a smaller rate cannot hold such a difference), and the
    n of independent clusters that reaches `target_power`; the same for the median comparison ("design"), and the
    n needed across a grid of discordance rates for planning. Numbers only at the leaves."""
    binary = tests["test"].isin(["mcnemar_exact"]) | tests["test"].str.startswith("cluster_sign_flip") \
        if len(tests) else None
    rows = tests[(tests["task"] == "all") & binary & tests["n_target_only"].notna()] if len(tests) else tests
    out: dict = {"effect": effect, "alpha": alpha, "target_power": target_power, "comparisons": {}}

    def entry(n: int, observed: float, clusters: int | None = None) -> dict:
        rate = min(1.0, max(observed, effect))
        # Prompts that share a passage are not independent: the power is computed on the
        # clusters, as if each were one pair (the bound a fully correlated cluster sets).
        units = n if clusters is None else min(n, clusters)
        return {"n_pairs": n, "n_clusters": units, "discordance_observed": observed, "discordance_assumed": rate,
                "power": mcnemar_power(units, rate, effect, alpha),
                "n_for_target_power": n_for_power(rate, effect, alpha, target_power)}

    for t in rows.to_dict("records"):
        n = int(t["n_pairs"])
        if n < 1:
            continue
        key = f"{t['target']}_vs_{t['baseline']}"
        k = t.get("n_clusters")
        out["comparisons"][key] = entry(n, (t["n_target_only"] + t["n_baseline_only"]) / n,
                                        int(k) if k is not None and not np.isnan(k) else None)
    if out["comparisons"]:
        vals = list(out["comparisons"].values())
        out["design"] = entry(int(np.median([v["n_pairs"] for v in vals])),
                              float(np.median([v["discordance_observed"] for v in vals])),
                              int(np.median([v["n_clusters"] for v in vals])))
    out["n_for_target_power_by_discordance"] = {
        f"{r:.2f}": n_for_power(r, effect, alpha, target_power) for r in discordance_grid if r >= effect}
    return out
