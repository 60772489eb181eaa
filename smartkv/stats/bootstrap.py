"""Percentile bootstrap of a mean, resampling whole clusters.

Prompts that share a haystack (or a pass key) are not independent: resampling them one by
one understates the spread. The cluster bootstrap (Davison & Hinkley 1997, "Bootstrap
Methods and their Application", sec. 3.8; Field & Welsh 2007, JRSS-B 69(3)) draws whole
clusters with replacement and recomputes the mean over every row of the drawn clusters.
With one row per cluster it is the ordinary (Efron) bootstrap.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

N_RESAMPLES = 2000


def cluster_bootstrap_ci(
    values: Sequence[float],
    clusters: Sequence | None = None,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    alpha: float = 0.05,
) -> tuple[float, float, int]:
    """(lo, hi, n_clusters): percentile CI of the mean of `values`, resampling clusters.

    `clusters[i]` labels the cluster of `values[i]` (any hashable; rows sharing a label are
    one cluster); None makes every value its own cluster. The statistic of a resample is the
    mean over all its rows (sum of cluster sums / sum of cluster sizes), so unequal cluster
    sizes weigh as they do in the point estimate. A NaN label makes its row a cluster of its
    own. Deterministic for a given seed.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, 0)
    if clusters is None:
        codes = np.arange(x.size)
    else:
        if len(clusters) != x.size:
            raise ValueError(f"clusters has {len(clusters)} labels for {x.size} values")
        codes = pd.factorize(pd.Series(list(clusters)))[0]
        # A row without a label (NaN) is its own cluster rather than one big "missing" one.
        missing = codes < 0
        codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.sum())
    sums = np.bincount(codes, weights=x)
    sizes = np.bincount(codes).astype(float)
    k = sums.size
    rng = np.random.default_rng(seed)
    # Chunks bound memory (2000 resamples x 10k clusters would be 160 MB of indices).
    chunk = max(1, 2_000_000 // k)
    means = np.concatenate([
        _resample_means(rng, sums, sizes, min(chunk, n_resamples - i))
        for i in range(0, n_resamples, chunk)
    ])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi), int(k))


def _resample_means(rng, sums: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    idx = rng.integers(0, sums.size, size=(n, sums.size))
    return sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)


def bootstrap_ci(
    values: Sequence[float], seed: int, n_resamples: int = N_RESAMPLES, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean with every value its own cluster."""
    lo, hi, _ = cluster_bootstrap_ci(values, None, seed, n_resamples, alpha)
    return (lo, hi)
