"""Error analysis: where SmartKV fails and its matched baseline does not, and the reverse.

Pairs are the ones the `stats` stage tests (smartkv.stats.matching): `smartkv@<X>` with
baseline `X` (the `matched_to` column), and for a baseline or peer without such a run, the
SmartKV run with the most memory not above its own. FP16 is the reference, not a
compressor, and is left out. Only 0/1-scored prompts count (no perplexity rows, no rows
whose budget fell below the floor).

- `discordant`: every prompt where exactly one side of a pair is right;
- `failure_strata`: failure rate per run against context length, needle depth and task,
  with exact (Clopper-Pearson) 95% intervals, which never leave [0, 1];
- `needle_bits`: mean bits on the needle's tokens against the haystack's (median token),
  on the prompts a SmartKV run gets right and on those it gets wrong.

No logistic fit: with one context length and ~200 prompts per run, the stratified table
says as much, and a fit separates perfectly on cells with no failures.
"""

from __future__ import annotations

import math

import pandas as pd
import scipy.stats as sps

from smartkv.stats import PERPLEXITY_TASK, match_baselines, overall

KEYS = ["task", "sample_id", "seed"]
FACTORS = {"context_length": "context length", "depth": "needle depth", "task": "task"}
SMARTKV_FAILS, BASELINE_FAILS = "smartkv fails", "baseline fails"


def scored(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a 0/1 score: accuracy tasks, no error."""
    ok = (df["task"] != PERPLEXITY_TASK) & df["score"].notna()
    if "error" in df:
        ok &= df["error"].fillna("") == ""
    return df[ok]


def pairs(df: pd.DataFrame, tolerance: float = 0.02) -> pd.DataFrame:
    """target (SmartKV) / baseline / match: the pairs the statistics test, FP16 excluded."""
    ov = overall(df).set_index("run")
    m = match_baselines(ov["kv_ratio"], ov["family"], tolerance)
    fp16 = set(df.loc[df["method"] == "fp16", "run"])
    return m[~m["baseline"].isin(fp16)].reset_index(drop=True)


def _side(df: pd.DataFrame, run: str, prefix: str) -> pd.DataFrame:
    cols = ["score", "prediction", "kv_ratio", "needle_bits", "haystack_bits"]
    g = df[df["run"] == run][KEYS + ["context_length", "depth", "answers"] + [c for c in cols if c in df]]
    return g.rename(columns={c: f"{prefix}_{c}" for c in cols})


def paired_outcomes(df: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """One row per (pair, prompt) both sides scored: both sides' score, prediction, memory."""
    df = scored(df)
    frames = []
    for m in matches.itertuples():
        t = _side(df, m.target, "smartkv")
        b = _side(df, m.baseline, "baseline").drop(columns=["context_length", "depth", "answers"])
        j = t.merge(b, on=KEYS)
        if len(j):
            frames.append(j.assign(smartkv_run=m.target, baseline_run=m.baseline, match=m.match))
    if not frames:
        return pd.DataFrame(columns=["smartkv_run", "baseline_run", "match", *KEYS])
    out = pd.concat(frames, ignore_index=True)
    first = ["smartkv_run", "baseline_run", "match"]
    return out[first + [c for c in out.columns if c not in first]]


def discordant(paired: pd.DataFrame) -> pd.DataFrame:
    """The prompts where exactly one side is right; `direction` says which side failed."""
    if paired.empty:
        return paired.assign(direction=pd.Series(dtype=str))
    s, b = paired["smartkv_score"] >= 0.5, paired["baseline_score"] >= 0.5
    out = paired[s != b].copy()
    out["direction"] = [BASELINE_FAILS if x else SMARTKV_FAILS for x in s[s != b]]
    return out.reset_index(drop=True)


def pair_counts(paired: pd.DataFrame) -> list[dict]:
    """Per pair: n prompts, how many only the baseline got right and how many only SmartKV."""
    rows = []
    for (t, b), g in paired.groupby(["smartkv_run", "baseline_run"], sort=False):
        s, r = g["smartkv_score"] >= 0.5, g["baseline_score"] >= 0.5
        rows.append({"smartkv_run": t, "baseline_run": b, "match": g["match"].iloc[0], "n": int(len(g)),
                     SMARTKV_FAILS: int((~s & r).sum()), BASELINE_FAILS: int((s & ~r).sum()),
                     "smartkv_kv_ratio": float(g["smartkv_kv_ratio"].mean()),
                     "baseline_kv_ratio": float(g["baseline_kv_ratio"].mean())})
    return rows


def rate_ci(failures: int, n: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 95% interval of a failure rate."""
    if n == 0:
        return math.nan, math.nan
    ci = sps.binomtest(failures, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def failure_strata(df: pd.DataFrame, runs: list[str]) -> pd.DataFrame:
    """run x factor x level: n, failures, rate and its exact 95% CI (factors with one level
    are kept: the table then says the study did not vary them)."""
    df = scored(df)
    rows = []
    for run in runs:
        g = df[df["run"] == run]
        for col in FACTORS:
            if col not in g:
                continue
            for level, h in g.groupby(col, sort=True, dropna=True):
                n, k = int(len(h)), int((h["score"] < 0.5).sum())
                lo, hi = rate_ci(k, n)
                rows.append({"run": run, "factor": col, "level": str(level), "n": n, "failures": k,
                             "rate": k / n, "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows, columns=["run", "factor", "level", "n", "failures", "rate", "ci_lo", "ci_hi"])


def needle_bits(df: pd.DataFrame, runs: list[str]) -> pd.DataFrame:
    """run x outcome: mean bits on the needle, on the haystack, and their paired gap, with n.
    `p_gap` is Mann-Whitney's test that the gap differs between successes and failures."""
    df = scored(df)
    if "needle_bits" not in df:
        return pd.DataFrame()
    df = df[df["run"].isin(runs) & df["needle_bits"].notna() & df["haystack_bits"].notna()]
    rows = []
    for run, g in df.groupby("run", sort=False):
        gap = g["needle_bits"] - g["haystack_bits"]
        ok = g["score"] >= 0.5
        p = (float(sps.mannwhitneyu(gap[ok], gap[~ok]).pvalue) if ok.any() and (~ok).any() else math.nan)
        for outcome, sel in (("success", ok), ("failure", ~ok)):
            h = g[sel]
            rows.append({"run": run, "outcome": outcome, "n": int(len(h)),
                         "needle_bits": float(h["needle_bits"].mean()) if len(h) else math.nan,
                         "haystack_bits": float(h["haystack_bits"].mean()) if len(h) else math.nan,
                         "gap": float(gap[sel].mean()) if len(h) else math.nan, "p_gap": p})
    return pd.DataFrame(rows)


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def errors_json(split: str, counts: list[dict], strata: pd.DataFrame, bits: pd.DataFrame) -> dict:
    """metrics/errors.json: numbers at the leaves, NaN left out (it is no JSON)."""
    out: dict = {"split": split, "pairs": {}, "strata": {}, "needle_bits": {}}
    for c in counts:
        out["pairs"][f"{c['smartkv_run']}_vs_{c['baseline_run']}"] = {
            k: c[k] for k in ("n", SMARTKV_FAILS, BASELINE_FAILS, "smartkv_kv_ratio", "baseline_kv_ratio")}
    for r in strata.itertuples():
        leaf = {k: _num(getattr(r, k)) for k in ("n", "failures", "rate", "ci_lo", "ci_hi")}
        out["strata"].setdefault(r.run, {}).setdefault(r.factor, {})[r.level] = {
            k: v for k, v in leaf.items() if v is not None}
    for r in bits.itertuples():
        leaf = {k: _num(getattr(r, k)) for k in ("n", "needle_bits", "haystack_bits", "gap", "p_gap")}
        out["needle_bits"].setdefault(r.run, {})[r.outcome] = {k: v for k, v in leaf.items() if v is not None}
    return out
