"""Statistics over per-sample results: summaries, paired tests, matched-memory pairs, tables.

Input is the per-sample frame the pipeline writes (one row per run x task x sample x seed;
columns `run, method, family, budget, bits, task, sample_id, seed, score, nll, kv_ratio,
tokens_per_s, ...`). Seeds are the unit of replication: scores are averaged over samples
within a seed first, and the spread we report is the standard deviation across seeds
(ddof=1; NaN with a single seed rather than a misleading 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

PERPLEXITY_TASK = "perplexity"
RUN_META = ["method", "family", "budget", "bits"]
FAMILY_ORDER = {"baseline": 0, "peer": 1, "smartkv": 2, "ablation": 3}


def _run_meta(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in RUN_META if c in df.columns]
    return df.groupby("run", sort=False)[cols].first()


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, task): score mean/std over seeds, n, memory ratio, throughput, ppl."""
    rows = []
    meta = _run_meta(df)
    for (run, task), g in df.groupby(["run", "task"], sort=False):
        is_ppl = task == PERPLEXITY_TASK
        value = "nll" if is_ppl else "score"
        per_seed = g.groupby("seed")[value].mean()
        row = {
            "run": run,
            "task": task,
            **meta.loc[run].to_dict(),
            "score_mean": np.nan if is_ppl else per_seed.mean(),
            "score_std": np.nan if is_ppl else per_seed.std(ddof=1),
            "nll_mean": per_seed.mean() if is_ppl else np.nan,
            "nll_std": per_seed.std(ddof=1) if is_ppl else np.nan,
            # Perplexity of the pooled mean NLL (exp of a mean, not a mean of exps).
            "ppl": math.exp(per_seed.mean()) if is_ppl else np.nan,
            "n_samples": g["sample_id"].nunique(),
            "n_seeds": g["seed"].nunique(),
            "kv_ratio": g["kv_ratio"].mean(),
            # Throughput only where the frame has timings: the pipeline's results do not (they
            # live in data/timings/, read by the latency stage), so these stay NaN there.
            "tokens_per_s": _timing(g).mean(),
            # Medians resist the odd slow sample (GC, page faults) on a shared CPU.
            "tokens_per_s_median": _timing(g).median(),
        }
        rows.append(row)
    return _order_runs(pd.DataFrame(rows))


def _timing(g: pd.DataFrame) -> pd.Series:
    return g["tokens_per_s"] if "tokens_per_s" in g else pd.Series(np.nan, index=g.index)


def _order_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """Baselines first, then peers, SmartKV, ablations; within a family, most memory first."""
    if summary.empty:
        return summary
    run_ratio = summary.groupby("run")["kv_ratio"].transform("mean")
    rank = summary["family"].map(FAMILY_ORDER).fillna(len(FAMILY_ORDER))
    order = pd.DataFrame({"rank": rank, "ratio": -run_ratio, "run": summary["run"]})
    idx = order.sort_values(["rank", "ratio", "run"], kind="stable").index
    return summary.loc[idx].reset_index(drop=True)


def overall(summary_or_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: accuracy averaged over tasks (perplexity excluded), with its std.

    From a per-sample frame the std is exact: average over tasks within each seed, then the
    std across seeds. From a summary it is approximated as sqrt(sum of task variances)/k,
    i.e. tasks treated as independent.
    """
    if "sample_id" in summary_or_df.columns:
        df = summary_or_df[summary_or_df["task"] != PERPLEXITY_TASK]
        task_seed = df.groupby(["run", "task", "seed"], sort=False)["score"].mean()
        per_seed = task_seed.groupby(["run", "seed"], sort=False).mean()
        out = per_seed.groupby("run", sort=False).agg(["mean", lambda s: s.std(ddof=1)])
        out.columns = ["score_mean", "score_std"]
        extra = df.assign(tokens_per_s=_timing(df)).groupby("run", sort=False)[["kv_ratio", "tokens_per_s"]].mean()
        out = out.join(extra).join(_run_meta(df))
    else:
        s = summary_or_df[summary_or_df["task"] != PERPLEXITY_TASK]
        g = s.groupby("run", sort=False)
        out = pd.DataFrame(
            {
                "score_mean": g["score_mean"].mean(),
                "score_std": g["score_std"].apply(
                    # min_count: one undefined task std (single seed) makes the total undefined
                    lambda x: math.sqrt(x.pow(2).sum(min_count=len(x))) / len(x)
                ),
                "kv_ratio": g["kv_ratio"].mean(),
                "tokens_per_s": g["tokens_per_s"].mean(),
            }
        ).join(g[[c for c in RUN_META if c in s.columns]].first())
    return out.reset_index()


def bootstrap_ci(
    values: Sequence[float], seed: int, n_resamples: int = 2000, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; deterministic for a given seed."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # Chunks bound memory (2000 x 10k pairs at once would be 160 MB of indices).
    chunk = max(1, 2_000_000 // x.size)
    means = np.concatenate([
        x[rng.integers(0, x.size, size=(min(chunk, n_resamples - i), x.size))].mean(axis=1)
        for i in range(0, n_resamples, chunk)
    ])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _paired_row(d: np.ndarray, seed: int) -> dict:
    """Tests on paired differences d = target - baseline; edge cases get a note, not an error."""
    n = d.size
    notes = []
    p_t = p_w = math.nan
    if n < 2:
        notes.append("fewer than 2 pairs: no test")
    elif np.all(d == 0):
        # Identical outputs: no evidence of a difference. scipy would return NaN or raise.
        p_t = p_w = 1.0
        notes.append("all differences zero: p set to 1")
    else:
        if np.all(d == d[0]):
            notes.append("constant nonzero difference: t-test undefined, flag uses Wilcoxon")
        else:
            p_t = float(sps.ttest_rel(d, np.zeros_like(d)).pvalue)
        p_w = float(sps.wilcoxon(d).pvalue)
    lo, hi = bootstrap_ci(d, seed=seed)
    p_flag = p_t if not math.isnan(p_t) else p_w
    return {
        "n_pairs": n,
        "mean_diff": float(d.mean()) if n else math.nan,
        "ci_lo": lo,
        "ci_hi": hi,
        "p_t": p_t,
        "p_wilcoxon": p_w,
        "significant": bool(p_flag < 0.05),
        "note": "; ".join(notes),
    }


def paired_tests(
    df: pd.DataFrame,
    target_run: str,
    baseline_runs: Sequence[str],
    key: Sequence[str] = ("task", "sample_id", "seed"),
    value: str = "score",
    per_task: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired t-test, Wilcoxon signed-rank and bootstrap CI of target - baseline per baseline.

    Samples are aligned on `key`; rows present in only one run are dropped and counted in
    `n_unpaired`. `value="nll"` tests perplexity (lower is better, so a negative diff is a
    gain). With `per_task`, each task also gets its own row (task="all" is the pooled one).
    `p_t_holm` is the Holm-adjusted t-test p over the rows returned, for the many baselines
    a single target is compared against.
    """
    key = list(key)
    sub = df.dropna(subset=[value])
    target = _keyed(sub, target_run, key, value)
    rows = []
    for base in baseline_runs:
        baseline = _keyed(sub, base, key, value)
        pairs = pd.concat({"t": target, "b": baseline}, axis=1, join="inner")
        n_unpaired = len(target) + len(baseline) - 2 * len(pairs)
        groups = [("all", pairs)]
        if per_task and "task" in key:
            groups += list(pairs.groupby(level="task", sort=False))
        for task, p in groups:
            d = (p["t"] - p["b"]).to_numpy(dtype=float)
            rows.append(
                {
                    "target": target_run,
                    "baseline": base,
                    "task": task,
                    "target_mean": float(p["t"].mean()),
                    "baseline_mean": float(p["b"].mean()),
                    **_paired_row(d, seed),
                    "n_unpaired": n_unpaired if task == "all" else 0,
                }
            )
    out = pd.DataFrame(rows)
    if not out.empty:
        out["p_t_holm"] = _holm(out["p_t"].to_numpy(dtype=float))
    return out


def _keyed(df: pd.DataFrame, run: str, key: list[str], value: str) -> pd.Series:
    s = df[df["run"] == run].set_index(key)[value]
    if s.empty:
        raise ValueError(f"run {run!r} has no rows with a {value!r} value")
    if s.index.duplicated().any():
        raise ValueError(f"run {run!r}: key {key} does not identify rows uniquely")
    return s


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjustment; NaNs stay NaN and are not counted."""
    adj = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    pv = p[ok]
    m = pv.size
    if m == 0:
        return adj
    order = np.argsort(pv)
    stepped = np.maximum.accumulate((m - np.arange(m)) * pv[order])
    res = np.empty(m)
    res[order] = np.minimum(stepped, 1.0)
    adj[ok] = res
    return adj


def matched_memory_pairs(
    summary: pd.DataFrame, target_prefix: str = "smartkv", tolerance: float = 0.05
) -> pd.DataFrame:
    """For each target run, the baseline run(s) at matched measured memory.

    Memory is each run's mean `kv_ratio` (fraction of FP16 bytes). Baselines (families
    "baseline" and "peer") within `tolerance` (absolute) all match. If none does, the match
    is the nearest baseline using at least as much memory as the target, so the comparison
    never favours SmartKV by giving it more bytes; failing that, the nearest overall.
    """
    runs = summary.groupby("run", sort=False).agg(kv_ratio=("kv_ratio", "mean"), family=("family", "first"))
    targets = runs[runs.index.str.startswith(target_prefix) & (runs["family"] != "ablation")]
    bases = runs[runs["family"].isin(["baseline", "peer"])]
    rows = []
    for t, tr in targets.iterrows():
        gap = (bases["kv_ratio"] - tr["kv_ratio"]).sort_values(key=np.abs)
        within = gap[gap.abs() <= tolerance]
        if len(within):
            picked, how = within, "within_tolerance"
        elif (gap >= 0).any():
            picked, how = gap[gap >= 0].sort_values().iloc[:1], "nearest_more_memory"
        else:
            picked, how = gap.iloc[:1], "nearest"
        for b, g in picked.items():
            rows.append(
                {
                    "target": t,
                    "baseline": b,
                    "target_kv_ratio": tr["kv_ratio"],
                    "baseline_kv_ratio": bases.loc[b, "kv_ratio"],
                    "gap": g,
                    "match": how,
                }
            )
    cols = ["target", "baseline", "target_kv_ratio", "baseline_kv_ratio", "gap", "match"]
    return pd.DataFrame(rows, columns=cols)


def _num(x) -> float | None:
    """A JSON-safe finite float, or None (NaN is not valid JSON and breaks `dvc metrics`)."""
    if x is None or isinstance(x, str):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _leaves(d: dict) -> dict:
    return {k: v for k, v in ((k, _num(v)) for k, v in d.items()) if v is not None}


def metrics_json(summary: pd.DataFrame, tests: pd.DataFrame | None = None) -> dict:
    """Nested dict for `metrics/*.json`: numbers only at the leaves (flags as 0/1)."""
    runs: dict = {}
    for _, r in summary.iterrows():
        leaf = _leaves(
            {
                "score_mean": r["score_mean"],
                "score_std": r["score_std"],
                "ppl": r.get("ppl"),
                "kv_ratio": r["kv_ratio"],
                "tokens_per_s": r["tokens_per_s"],
                "n_samples": r["n_samples"],
                "n_seeds": r["n_seeds"],
            }
        )
        runs.setdefault(r["run"], {})[r["task"]] = leaf
    out: dict = {"runs": runs}
    if tests is not None and not tests.empty:
        cmp: dict = {}
        for _, t in tests.iterrows():
            leaf = _leaves(
                {
                    "mean_diff": t["mean_diff"],
                    "ci_lo": t["ci_lo"],
                    "ci_hi": t["ci_hi"],
                    "p_t": t["p_t"],
                    "p_wilcoxon": t["p_wilcoxon"],
                    "n_pairs": t["n_pairs"],
                    "significant": int(bool(t["significant"])),
                }
            )
            cmp.setdefault(f"{t['target']}_vs_{t['baseline']}", {})[t.get("task", "all")] = leaf
        out["tests"] = cmp
    return out


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: pd.DataFrame) -> str:
    """Rows = runs, columns = tasks (score mean ± std over seeds; perplexity for that task),
    then measured KV memory as a fraction of FP16 and mean tokens/s."""
    if summary.empty:
        return "_no results_\n"
    tasks = list(dict.fromkeys(summary["task"]))
    runs = list(dict.fromkeys(summary["run"]))
    cell = {(r.run, r.task): r for r in summary.itertuples(index=False)}
    header = ["run", *[f"{t} (ppl ↓)" if t == PERPLEXITY_TASK else t for t in tasks]]
    timed = summary["tokens_per_s"].notna().any()
    header += ["KV memory (× FP16)"] + (["tokens/s"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [f"`{run}`"]
        for t in tasks:
            r = cell.get((run, t))
            if r is None:
                cells.append("–")
            elif t == PERPLEXITY_TASK:
                cells.append(_fmt(r.ppl, math.nan, 2))
            else:
                cells.append(_fmt(r.score_mean, r.score_std))
        rs = summary[summary["run"] == run]
        cells += [f"{rs['kv_ratio'].mean():.3f}"] + ([f"{rs['tokens_per_s'].mean():.1f}"] if timed else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
