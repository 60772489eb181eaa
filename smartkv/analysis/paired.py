"""Paired statistics for within-prompt comparisons: bootstrap CI of a mean difference and
the exact McNemar test for two binary outcomes on the same prompts (McNemar 1947)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from smartkv.stats import bootstrap_ci


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact two-sided McNemar test of paired booleans `a`, `b`: a binomial test on the discordant pairs."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(sps.binomtest(only_a, n, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p_mcnemar": p}


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b over pairs with a percentile-bootstrap 95% CI (NaN pairs dropped)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[~np.isnan(d)]
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan, "ci_lo": lo, "ci_hi": hi}
