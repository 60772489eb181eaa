"""Per-task and per-run summaries of the per-sample results.

Input is the per-sample frame the pipeline writes (one row per run x task x sample x seed;
columns `run, method, family, budget, bits, task, sample_id, seed, score, nll, kv_ratio,
tokens_per_s, ...`). Seeds draw new prompts: within a task, scores are averaged over a
seed's prompts first, and the ± is the standard deviation across seeds (ddof=1; NaN with a
single seed rather than a misleading 0).

Weighting, one rule everywhere:
- per task: each task is shown apart;
- "mean over tasks" (`score_mean` of `overall`) is the mean of per-task means, each task
  weighing the same whatever its number of prompts;
- "pooled" numbers (`score_pooled`, and the task = "all" rows of the paired tests) are
  means over prompts, so a task with more prompts weighs more; they are labelled so;
- memory (`kv_ratio` of a run) is the mean over the run's accuracy prompts, perplexity rows
  excluded (they hold a different, longer context); the table, metrics, matching and
  figures all use this one number.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

PERPLEXITY_TASK = "perplexity"
RUN_META = ["method", "family", "budget", "bits"]
FAMILY_ORDER = {"baseline": 0, "peer": 1, "smartkv": 2, "ablation": 3}


def length_strata(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with each task that ran at several prompt lengths split into one task per length
    (`niah` -> `niah@1k`, `niah@2k`): a 2k prompt is a different difficulty and, for KIVI, a
    different memory, so tables, per-task tests and the mean over tasks keep lengths apart
    (pooled numbers still pool every prompt). Tasks with one length keep their name."""
    if "context_length" not in df or df.empty:
        return df
    out = df.copy()
    for task, g in df.groupby("task", sort=False):
        if g["context_length"].nunique() > 1:
            lengths = g["context_length"].astype(int)
            names = [f"{task}@{n // 1024}k" if n % 1024 == 0 else f"{task}@{n}" for n in lengths]
            out.loc[g.index, "task"] = names
    return out


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
            "n_rows": len(g),  # prompts x seeds: the weight of this task in pooled means
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
    mem = run_memory(summary)
    rank = summary["family"].map(FAMILY_ORDER).fillna(len(FAMILY_ORDER))
    order = pd.DataFrame({"rank": rank, "ratio": -summary["run"].map(mem), "run": summary["run"]})
    idx = order.sort_values(["rank", "ratio", "run"], kind="stable").index
    return summary.loc[idx].reset_index(drop=True)


def run_memory(frame: pd.DataFrame) -> pd.Series:
    """Each run's memory (× FP16): mean kv_ratio over its accuracy prompts, from either a
    per-sample frame or a summary (whose task means are weighted by `n_rows`). A run with
    perplexity rows only falls back to those, so it still has a number."""
    acc = frame[frame["task"] != PERPLEXITY_TASK]
    use = pd.concat([acc, frame[~frame["run"].isin(acc["run"])]])
    if "sample_id" in use.columns or "n_rows" not in use.columns:
        return use.groupby("run", sort=False)["kv_ratio"].mean()
    w = use["n_rows"].astype(float)
    num = (use["kv_ratio"] * w).groupby(use["run"], sort=False).sum(min_count=1)
    return num / w.where(use["kv_ratio"].notna()).groupby(use["run"], sort=False).sum()


def overall(summary_or_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run over its accuracy tasks (perplexity excluded).

    `score_mean` is the mean of per-task means (every task weighs the same); `score_pooled`
    the mean over prompts (only from a per-sample frame, else the n_rows-weighted mean).
    From a per-sample frame `score_std` is exact: average over tasks within each seed, then
    the std across seeds. From a summary it is approximated as sqrt(sum of task
    variances)/k, i.e. tasks treated as independent. `kv_ratio` is `run_memory`.
    """
    frame = summary_or_df
    if "sample_id" in frame.columns:
        df = frame[frame["task"] != PERPLEXITY_TASK]
        task_seed = df.groupby(["run", "task", "seed"], sort=False)["score"].mean()
        per_seed = task_seed.groupby(["run", "seed"], sort=False).mean()
        out = per_seed.groupby("run", sort=False).agg(["mean", lambda s: s.std(ddof=1)])
        out.columns = ["score_mean", "score_std"]
        g = df.groupby("run", sort=False)
        out = out.join(pd.DataFrame({"score_pooled": g["score"].mean(), "n_tasks": g["task"].nunique(),
                                     "tokens_per_s": df.assign(tokens_per_s=_timing(df))
                                     .groupby("run", sort=False)["tokens_per_s"].mean()}))
        out = out.join(_run_meta(df))
    else:
        s = frame[frame["task"] != PERPLEXITY_TASK]
        g = s.groupby("run", sort=False)
        w = s["n_rows"].astype(float) if "n_rows" in s.columns else pd.Series(1.0, index=s.index)
        out = pd.DataFrame(
            {
                "score_mean": g["score_mean"].mean(),
                "score_std": g["score_std"].apply(
                    # min_count: one undefined task std (single seed) makes the total undefined
                    lambda x: math.sqrt(x.pow(2).sum(min_count=len(x))) / len(x)
                ),
                "score_pooled": (s["score_mean"] * w).groupby(s["run"], sort=False).sum() / w.groupby(s["run"]).sum(),
                "n_tasks": g["task"].nunique(),
                "tokens_per_s": s.assign(tokens_per_s=_timing(s)).groupby("run", sort=False)["tokens_per_s"].mean(),
            }
        ).join(g[[c for c in RUN_META if c in s.columns]].first())
    out["kv_ratio"] = run_memory(frame)
    return out.reset_index().rename(columns={"index": "run"})
