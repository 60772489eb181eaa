"""The unit of independence: prompts that share a passage are one cluster.

A needle prompt is a haystack, a depth, and a key. The classic layout fixes the haystack per
(length, depth), so prompts that differ only in their key's digits are the same text: the
main grid's 245 needle prompts are 10 texts. Their outcomes are not independent (a text the
model cannot read fails every key), so a test that counts prompts counts the same evidence many
times. `passage_cluster` names a prompt's text with every digit masked; prompts that share it
are one cluster, and the paired tests (`paired.compare`) resample and permute whole clusters.

`cluster_sign_test` is the cluster-level test of a paired difference: under the null the two
runs are exchangeable within every pair, so flipping the sign of every difference of one
cluster at once leaves the distribution of the total unchanged (a randomization test over the
2^k sign patterns of k cluster sums; Fisher 1935, Good 2005 "Permutation, Parametric and
Bootstrap Tests", sec. 3.7). With one prompt per cluster and 0/1 outcomes it is the exact
McNemar test. Exact up to `EXACT_MAX` clusters, Monte Carlo (with its seed) above.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from typing import Sequence

import numpy as np
import pandas as pd

EXACT_MAX = 16  # 65,536 sign patterns
MONTE_CARLO = 20_000
_DIGITS = re.compile(r"\d+")


def passage_cluster(task: str, prompt: str) -> str:
    """The prompt's text with its numbers masked, as a short hash (with its task)."""
    return f"{task}:" + hashlib.sha1(_DIGITS.sub("#", prompt).encode("utf-8")).hexdigest()[:12]


def attach_passage_clusters(results: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    """`results` with its `cluster` column set from the prompts of `tasks` (joined on task,
    sample and seed); a row whose prompt is not in `tasks` keeps its own cluster (its sample id)."""
    key = ["task", "sample_id", "seed"]
    names = tasks[key].copy()
    names["cluster"] = [passage_cluster(t, p) for t, p in zip(tasks["task"], tasks["prompt"])]
    names = names.drop_duplicates(key)
    out = results.drop(columns=["cluster"], errors="ignore").merge(names, on=key, how="left")
    own = out["cluster"].isna()
    out.loc[own, "cluster"] = out.loc[own, "task"].astype(str) + ":" + out.loc[own, "sample_id"].astype(str)
    out.index = results.index
    return out


def cluster_sums(d: np.ndarray, clusters: Sequence | None) -> np.ndarray:
    if clusters is None:
        return np.asarray(d, dtype=float)
    codes = pd.factorize(pd.Series(list(clusters)))[0]
    missing = codes < 0
    codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.sum())
    return np.bincount(codes, weights=np.asarray(d, dtype=float))


def cluster_sign_test(d: Sequence[float], clusters: Sequence | None, seed: int = 0) -> tuple[float, int, str]:
    """(two-sided p, number of clusters, "exact" | "monte_carlo") of the sign-flip test on cluster sums."""
    s = cluster_sums(np.asarray(d, dtype=float), clusters)
    s = s[s != 0]  # a cluster whose differences cancel carries no sign
    k = int(s.size)
    if k == 0:
        return 1.0, 0, "exact"
    observed = abs(s.sum())
    tol = 1e-9 * max(1.0, float(np.abs(s).sum()))
    if k <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=k)))
        totals = np.abs(signs @ s)
        return float(np.mean(totals >= observed - tol)), k, "exact"
    rng = np.random.default_rng(seed)
    hits, n = 0, 0
    for start in range(0, MONTE_CARLO, 2000):
        signs = rng.choice((1.0, -1.0), size=(min(2000, MONTE_CARLO - start), k))
        hits += int((np.abs(signs @ s) >= observed - tol).sum())
        n += signs.shape[0]
    return (hits + 1) / (n + 1), k, "monte_carlo"  # the observed pattern counts as one draw


def design_effect(n_pairs: int, n_clusters: int) -> float:
    """How many prompts one independent cluster is worth on average (n / k; 1 = independent)."""
    return n_pairs / n_clusters if n_clusters else math.nan
