"""Non-inferiority and equivalence from the confidence interval of a paired difference.

A claim "the target is no worse than the baseline by more than a margin" is supported
when the whole 95% CI of (target - baseline) lies on the good side of -margin (the
CI-inclusion form of a one-sided test at alpha = 2.5%; Piaggio et al. 2012, CONSORT
extension for non-inferiority trials, JAMA 308(24)). Equivalence needs both bounds inside
(-margin, +margin): the two one-sided tests of Schuirmann (1987, J. Pharmacokinet.
Biopharm. 15(6)), each at 2.5% here because the interval is a 95% one (conservative;
the textbook TOST at 5% uses a 90% interval). An interval that excludes 0 but not the
margin, or neither, is inconclusive about the claim; it never shows "no difference".
"""

from __future__ import annotations

import math


def noninferiority(ci_lo: float, ci_hi: float, margin: float | None, higher_is_better: bool = True) -> dict:
    """{"noninferior", "equivalent"} as 0/1 for the CI of d = target - baseline, NaN
    where no margin is set or the interval is undefined.

    For a lower-is-better measure (NLL, KL) "worse" is a positive difference, so the
    upper bound must stay below +margin.
    """
    if margin is None or math.isnan(margin) or math.isnan(ci_lo) or math.isnan(ci_hi):
        return {"noninferior": math.nan, "equivalent": math.nan}
    if margin <= 0:
        raise ValueError(f"margin={margin!r} must be positive")
    worst = ci_lo > -margin if higher_is_better else ci_hi < margin
    both = ci_lo > -margin and ci_hi < margin
    return {"noninferior": float(worst), "equivalent": float(both)}
