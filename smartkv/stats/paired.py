"""Paired tests of one run against another over the same prompts.

0/1 outcomes (a prompt answered right or wrong by both runs) get the exact McNemar test
(McNemar 1947, Psychometrika 12(2)): under no difference, each discordant pair is equally
likely to favour either run, so the count favouring the target is Binomial(discordant, 1/2)
and the two-sided exact binomial p is the test. A t-test or a Wilcoxon test on ±1
differences is a normal approximation to that sign test and is badly off at small counts
(one discordant pair: Wilcoxon p = 0.317, exact p = 1).

Continuous per-prompt measures (NLL, answer log-likelihood, KL from FP16) get a paired
t-test with its t-interval and the Wilcoxon signed-rank test (Wilcoxon 1945), exact when
there are at most 50 non-zero differences and no ties, normal-approximated otherwise.

Every comparison also gets a cluster-bootstrap 95% CI of the mean difference (see
`bootstrap.py`) and the non-inferiority verdict against a margin (see `equivalence.py`). Where
prompts share passages (fewer clusters than pairs), the primary p is the cluster-level sign-flip
test instead (`clusters.py`), and the prompt-level p is kept as `p_prompts`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from smartkv.stats.bootstrap import N_RESAMPLES, cluster_bootstrap_ci
from smartkv.stats.clusters import cluster_sign_test
from smartkv.stats.equivalence import noninferiority

KEY = ("task", "sample_id", "seed")
CLUSTER = "cluster"  # optional results column: rows sharing a value are one cluster
EXACT_WILCOXON_MAX_N = 50  # scipy's own limit for the exact null distribution


class Measure(NamedTuple):
    higher_is_better: bool
    margin: float | None  # non-inferiority margin in the measure's units; None: not claimed


# Per-prompt measures tested when a results frame has the column with values in it.
MEASURES = {
    "score": Measure(True, 0.05),  # fraction correct (0/1 per prompt, or an F1 in [0, 1])
    "nll": Measure(False, None),  # perplexity rows: mean token NLL of the continuation
    "answer_logprob": Measure(True, None),  # gold answer's teacher-forced log-likelihood
    "kl_fp16": Measure(False, None),  # KL of the next-token distribution from FP16's
}


def measures_in(df: pd.DataFrame) -> list[str]:
    """The measures of MEASURES that `df` has at least one value for, in registry order."""
    return [m for m in MEASURES if m in df.columns and df[m].notna().any()]


def mcnemar_exact(n_target_only: int, n_baseline_only: int) -> float:
    """Two-sided exact McNemar p from the discordant counts (1.0 with none)."""
    n = n_target_only + n_baseline_only
    if n == 0:
        return 1.0
    return float(sps.binomtest(n_target_only, n, 0.5, alternative="two-sided").pvalue)


def paired_continuous(d: Sequence[float], alpha: float = 0.05) -> dict:
    """Paired t-test (with its 1-alpha t-interval) and Wilcoxon signed-rank on differences d.

    Degenerate inputs get a note instead of an error: all-zero differences give p = 1 for
    both tests; a constant nonzero difference leaves the t-test undefined (zero variance).
    """
    d = np.asarray(d, dtype=float)
    n = d.size
    out = {"mean_diff": float(d.mean()) if n else math.nan, "t_ci_lo": math.nan, "t_ci_hi": math.nan,
           "p_t": math.nan, "p_wilcoxon": math.nan, "wilcoxon_method": "", "note": ""}
    if n < 2:
        out["note"] = "fewer than 2 pairs: no test"
        return out
    if np.all(d == 0):
        out.update(p_t=1.0, p_wilcoxon=1.0, t_ci_lo=0.0, t_ci_hi=0.0, note="all differences zero: p set to 1")
        return out
    sd = d.std(ddof=1)
    if sd > 0:
        se = sd / math.sqrt(n)
        half = sps.t.ppf(1 - alpha / 2, n - 1) * se
        out.update(p_t=float(2 * sps.t.sf(abs(d.mean()) / se, n - 1)),
                   t_ci_lo=float(d.mean() - half), t_ci_hi=float(d.mean() + half))
    else:
        out["note"] = "constant nonzero difference: t-test undefined"
    # Zeros carry no sign: drop them (Wilcoxon's own convention), then the exact null
    # distribution holds only without ties among the |d|.
    nz = d[d != 0]
    exact = nz.size <= EXACT_WILCOXON_MAX_N and np.unique(np.abs(nz)).size == nz.size
    method = "exact" if exact else "approx"
    out["p_wilcoxon"] = float(sps.wilcoxon(nz, method=method).pvalue)
    out["wilcoxon_method"] = method
    return out


def _is_binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(a, (0.0, 1.0)).all() for a in arrays)


def clusters_ahead_behind(d: np.ndarray, clusters: Sequence | None) -> tuple[int, int]:
    """In how many clusters (passages; each prompt its own without clusters) the target's summed
    difference is above zero, and in how many below: the cell-by-cell count a reader checks a pooled
    mean against (one passage can carry a pooled win)."""
    if not d.size:
        return 0, 0
    sums = pd.Series(d).groupby(np.asarray(clusters) if clusters is not None else np.arange(d.size)).sum()
    return int((sums > 0).sum()), int((sums < 0).sum())


def compare(
    t: np.ndarray,
    b: np.ndarray,
    clusters: Sequence | None = None,
    measure: str = "score",
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    alpha: float = 0.05,
    margin: float | None = None,
) -> dict:
    """All statistics of one comparison of target values t with baseline values b (paired).

    `p` is the primary test's p: exact McNemar for 0/1 values, else the paired t-test (the
    Wilcoxon p where t is undefined). The CI is the cluster bootstrap's. `margin` defaults
    to the measure's in MEASURES.
    """
    t, b = np.asarray(t, dtype=float), np.asarray(b, dtype=float)
    d = t - b
    spec = MEASURES.get(measure, Measure(True, None))
    margin = spec.margin if margin is None else margin
    row: dict = {"measure": measure, "higher_is_better": spec.higher_is_better, "n_pairs": int(d.size),
                 "target_mean": float(t.mean()) if d.size else math.nan,
                 "baseline_mean": float(b.mean()) if d.size else math.nan,
                 "n_target_only": math.nan, "n_baseline_only": math.nan}
    if d.size and _is_binary(t, b):
        n10, n01 = int(((t == 1) & (b == 0)).sum()), int(((t == 0) & (b == 1)).sum())
        row.update(test="mcnemar_exact", n_target_only=n10, n_baseline_only=n01,
                   mean_diff=float(d.mean()), p=mcnemar_exact(n10, n01),
                   p_t=math.nan, t_ci_lo=math.nan, t_ci_hi=math.nan, p_wilcoxon=math.nan,
                   wilcoxon_method="", note="" if n10 + n01 else "no discordant pairs: p = 1")
    else:
        c = paired_continuous(d, alpha)
        primary = "wilcoxon" if math.isnan(c["p_t"]) and not math.isnan(c["p_wilcoxon"]) else "paired_t"
        row.update(test=primary, p=c["p_wilcoxon"] if primary == "wilcoxon" else c["p_t"], **c)
    lo, hi, k = cluster_bootstrap_ci(d, clusters, seed, n_resamples, alpha)
    if d.size and k < d.size:
        # prompts share passages: the test counts clusters, not prompts (`clusters.py`); the
        # prompt-level p stays beside it for reference
        p, k_signed, method = cluster_sign_test(d, clusters, seed)
        row.update(test=f"cluster_sign_flip_{method}", p_prompts=row["p"], p=p,
                   note=(row["note"] + "; " if row["note"] else "") + f"{k} clusters ({k_signed} with a nonzero sum)")
    ahead, behind = clusters_ahead_behind(d, clusters)
    row.update(ci_lo=lo, ci_hi=hi, n_clusters=k, clusters_ahead=ahead, clusters_behind=behind,
               margin=math.nan if margin is None else margin,
               **noninferiority(lo, hi, margin, spec.higher_is_better))
    return row


def paired_tests(
    df: pd.DataFrame,
    target_run: str,
    baseline_runs: Sequence[str],
    measure: str = "score",
    key: Sequence[str] = KEY,
    per_task: bool = False,
    family: str = "",
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    alpha: float = 0.05,
    margin: float | None = None,
) -> pd.DataFrame:
    """One row per (baseline, task) comparing `target_run` with each baseline on `measure`.

    Rows are aligned on `key` (one prompt of one seed); rows present in only one run are
    dropped and counted in `n_unpaired`. task = "all" pools every paired prompt (a
    per-prompt mean, so a task with more prompts weighs more); `per_task` adds one row per
    task (when there are several). Each row carries both sides' measured `kv_ratio` (and
    `kv_bytes`, when the frame has it) averaged over exactly the paired prompts. Bootstrap
    clusters come from the `cluster` column when the frame has one (rows sharing a value
    resample together), else each prompt is its own cluster.
    `p_holm` and the verdict are set by `multiplicity.apply_holm` over a whole family.
    """
    key = list(key)
    sub = df.dropna(subset=[measure]) if measure in df.columns else df.iloc[0:0]
    target = _keyed(sub, target_run, key, measure)
    rows = []
    for base in baseline_runs:
        baseline = _keyed(sub, base, key, measure)
        pairs = target.add_suffix("_t").join(baseline.add_suffix("_b"), how="inner")
        n_unpaired = len(target) + len(baseline) - 2 * len(pairs)
        groups = [("all", pairs)]
        tasks = pairs.index.get_level_values("task").unique() if "task" in key else []
        if per_task and len(tasks) > 1:  # with one task its row would repeat "all"
            groups += list(pairs.groupby(level="task", sort=False))
        for task, p in groups:
            clusters = p["cluster_t"].to_numpy() if "cluster_t" in p else None
            stats = compare(p["value_t"].to_numpy(), p["value_b"].to_numpy(), clusters, measure,
                            seed, n_resamples, alpha, margin)
            rows.append({"family": family, "target": target_run, "baseline": base, "task": task, **stats,
                         "n_unpaired": n_unpaired if task == "all" else 0,
                         **{f"{side}_{name}": float(p[f"{col}_{s}"].mean()) if len(p) else math.nan
                            for side, s in (("target", "t"), ("baseline", "b"))
                            for name, col in (("kv_ratio", "kv"), ("kv_bytes", "bytes"))}})
    return pd.DataFrame(rows)


def _keyed(df: pd.DataFrame, run: str, key: list[str], measure: str) -> pd.DataFrame:
    r = df[df["run"] == run]
    if r.empty:
        raise ValueError(f"run {run!r} has no rows with a {measure!r} value")
    cols = {measure: "value"}
    for src, dst in (("kv_ratio", "kv"), ("kv_bytes", "bytes"), (CLUSTER, "cluster")):
        if src in r.columns:
            cols[src] = dst
    out = r.set_index(key)[list(cols)].rename(columns=cols)
    for col in ("kv", "bytes"):
        if col not in out:
            out[col] = math.nan
    if out.index.duplicated().any():
        raise ValueError(f"run {run!r}: key {key} does not identify rows uniquely")
    return out
