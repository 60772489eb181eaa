"""Holm's step-down adjustment within families of comparisons, and the wording of results.

Holm (1979, Scand. J. Statist. 6(2)) controls the family-wise error rate at alpha for any
dependence between the tests, and is uniformly more powerful than Bonferroni. A family is
one set of claims read together ("baselines vs matched SmartKV" on accuracy, "ablations vs
headline" on accuracy, ...); the `family` column of a tests frame names it.

Only the adjusted p decides `significant`. A comparison that is not significant is
"inconclusive": a test that fails to reject shows no difference only with enough power,
which the non-inferiority columns and metrics/power.json speak to.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

INCONCLUSIVE = "inconclusive"


def holm(p) -> np.ndarray:
    """Holm-adjusted p-values (same order as `p`); NaNs stay NaN and are not counted."""
    p = np.asarray(p, dtype=float)
    adj = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    pv = p[ok]
    m = pv.size
    if m == 0:
        return adj
    order = np.argsort(pv, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * pv[order])
    res = np.empty(m)
    res[order] = np.minimum(stepped, 1.0)
    adj[ok] = res
    return adj


def verdict(significant: bool, mean_diff: float, higher_is_better: bool) -> str:
    """"target better" / "target worse" when the adjusted test rejects, else "inconclusive"."""
    if not significant or not np.isfinite(mean_diff) or mean_diff == 0:
        return INCONCLUSIVE
    return "target better" if (mean_diff > 0) == bool(higher_is_better) else "target worse"


def apply_holm(tests: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """A copy of `tests` with `p_holm` (adjusted within each `family`), `significant`
    (p_holm < alpha) and `verdict`. Needs columns family, p, mean_diff, higher_is_better."""
    out = tests.copy()
    if out.empty:
        return out.assign(p_holm=pd.Series(dtype=float), significant=pd.Series(dtype=bool),
                          verdict=pd.Series(dtype=object))
    out["p_holm"] = np.nan
    for _, idx in out.groupby("family", sort=False).groups.items():
        out.loc[idx, "p_holm"] = holm(out.loc[idx, "p"].to_numpy(dtype=float))
    out["significant"] = out["p_holm"] < alpha
    out["verdict"] = [verdict(s, d, h) for s, d, h in
                      zip(out["significant"], out["mean_diff"], out["higher_is_better"])]
    return out
