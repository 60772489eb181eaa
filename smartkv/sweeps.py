"""Sweeps as DVC experiments: read the finished ones and summarize each swept parameter.

Experiments are queued with `dvc exp run --queue -S split=dev -S decay=0.85,0.9,0.95 smartkv`
(see README) and run with `dvc queue start -j N`. Each finished experiment is a commit
holding its params, `metrics/smartkv.json` and, git-tracked, `data/smartkv.parquet`;
`dvc exp show --json` lists them. Only dev-seed experiments count as evidence for choosing
a default (test seeds report, never choose). For each swept parameter, the summary takes
the experiments whose other swept parameters sit at the current `params.yaml` values (one
factor at a time), and gives the headline run's dev score and measured memory per value.

The dev set is small (35 needle prompts on one seed), so accuracy alone rarely separates two
values. Each experiment's per-prompt headline results are therefore recorded too, and every
value is compared with the current one on the same prompts: exact McNemar on the 0/1 score,
paired t on the gold answer's log-likelihood and on the KL from FP16 (the continuous
measures carry more information per prompt), Holm within each parameter. The summary file
keeps those per-prompt results, so the evidence survives the experiment refs, which stay on
the machine that ran them.

This module is not imported by the model stages: editing it re-runs `sweeps` only.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from smartkv.stats.multiplicity import holm
from smartkv.stats.paired import compare
from smartkv.stats.tables import _num
from smartkv.study.labels import HEADLINE
from smartkv.study.params import get

SWEPT = ("budget", "decay", "realloc_freq", "smartkv.allocation")
METRICS_FILE = "metrics/smartkv.json"
RESULTS_FILE = "data/smartkv.parquet"
PROMPT_KEY = ("task", "sample_id", "seed", "context_length")
# Per-prompt measures compared with the current value (score: 0/1 needle rows; nll: perplexity rows).
MEASURES = ("score", "answer_logprob", "kl_fp16", "nll")

RowsAt = Callable[[str], "pd.DataFrame | None"]


def dvc_experiments(repo: str | Path = ".") -> list[dict]:
    """`dvc exp show --all-commits --json`, as parsed JSON (every baseline commit with its
    experiments): a sweep stays in the summary after later commits move HEAD past its baseline."""
    proc = subprocess.run(["dvc", "exp", "show", "--all-commits", "--json"], cwd=repo, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout or "[]")


def git_rows(repo: str | Path = ".") -> RowsAt:
    """rev -> that commit's `data/smartkv.parquet`, or None where the commit or the file is absent."""
    def rows_at(rev: str) -> pd.DataFrame | None:
        proc = subprocess.run(["git", "show", f"{rev}:{RESULTS_FILE}"], cwd=repo, capture_output=True)
        return pd.read_parquet(io.BytesIO(proc.stdout)) if proc.returncode == 0 and proc.stdout else None
    return rows_at


def per_prompt(results: pd.DataFrame | None) -> dict | None:
    """The headline run's per-prompt measures, {"key": [...], measure: [...]}, sorted by prompt
    (None for a missing value); None without results."""
    if results is None or "run" not in results.columns:
        return None
    rows = results[results["run"] == HEADLINE]
    if rows.empty:
        return None
    keys = rows[list(PROMPT_KEY)].astype(str).agg("|".join, axis=1)
    rows = rows.assign(_key=keys).sort_values("_key")
    perplexity = (rows["metric"] == "perplexity") if "metric" in rows.columns else pd.Series(False, index=rows.index)
    out: dict = {"key": rows["_key"].tolist()}
    for m in MEASURES:
        vals = rows[m].astype(float) if m in rows.columns else pd.Series(np.nan, index=rows.index)
        # A perplexity row's answer log-likelihood is its continuation's: only its nll is compared,
        # so the needle prompts' answer measures are not mixed with a 512-token continuation's.
        own = perplexity if m == "nll" else ~perplexity
        out[m] = [float(v) if ok and not math.isnan(v) else None for v, ok in zip(vals, own)]
    return out


def finished(shown: list[dict], rows_at: RowsAt | None = None) -> list[dict]:
    """One record per finished experiment: name, params, its headline run's metrics and, where
    `rows_at(rev)` finds the experiment's results, its per-prompt headline measures."""
    out = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
                runs = (((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data") or {}).get("runs", {})
                if rev.get("error") or not params or HEADLINE not in runs:
                    continue  # queued, running, failed, or from before the smartkv metrics existed
                record = {"name": rev.get("name") or exp.get("name") or rev["rev"][:7], "rev": rev["rev"],
                          "split": params.get("split", "test"),
                          "params": {k: get(params, k, None) for k in SWEPT},
                          "headline": {k: runs[HEADLINE].get(k) for k in ("score_mean", "kv_ratio", "n_prompts")}}
                prompts = per_prompt(rows_at(rev["rev"])) if rows_at else None
                if prompts is not None:
                    record["per_prompt"] = prompts
                out.append(record)
    return sorted(out, key=lambda e: (e["name"], e["rev"]))


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _order(value: Any) -> tuple:
    """Numbers by value (4 before 16), then anything else by its JSON text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, float(value), "") if number else (1, 0.0, _key(value))


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else math.nan


def _paired(a: dict, b: dict, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of `measure` on the prompts both per-prompt records hold (a's order)."""
    bv = {k: v for k, v in zip(b["key"], b[measure]) if v is not None}
    pairs = [(v, bv[k]) for k, v in zip(a["key"], a[measure]) if v is not None and k in bv]
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)


def versus_current(values: list[dict], rows: list[dict | None], current: int | None) -> None:
    """Adds `vs_current` to each value but the current one (`values[current]`): per measure, the
    paired comparison on the same prompts of its per-prompt `rows` with the current value's (Holm
    over every test of this parameter). A value without rows, or a current value without them, says so."""
    if current is None:
        return
    tests = []
    for i, v in enumerate(values):
        if i == current:
            continue
        if rows[i] is None or rows[current] is None:
            v["vs_current"] = {"note": "per-prompt results not recorded for this experiment or the current value's"}
            continue
        v["vs_current"] = {}
        for m in MEASURES:
            t, b = _paired(rows[i], rows[current], m)
            if t.size < 2:
                continue
            row = compare(t, b, measure=m)
            res = {"n_pairs": row["n_pairs"], "test": row["test"],
                   **{k: _num(row[k]) for k in ("mean_diff", "p", "ci_lo", "ci_hi")}}
            if row["test"] == "mcnemar_exact":
                res.update(n_value_only=row["n_target_only"], n_current_only=row["n_baseline_only"])
            v["vs_current"][m] = res
            tests.append(res)
    for res, adj in zip(tests, holm([math.nan if r["p"] is None else r["p"] for r in tests])):
        res["p_holm"] = _num(adj)


def summarize(experiments: list[dict], current: dict) -> dict:
    """{n_experiments, n_dev, experiments, params: {param: {current, best_on_dev, values: [...]}}}."""
    dev = [e for e in experiments if e["split"] == "dev"]
    now = {k: get(current, k, None) for k in SWEPT}
    summary: dict = {"n_experiments": len(experiments), "n_dev": len(dev), "experiments": experiments, "params": {}}
    if not dev:
        summary["note"] = ("no experiments yet" if not experiments else
                           "no dev-seed experiments yet (run sweeps with -S split=dev)")
        return summary
    for p in SWEPT:
        others = [q for q in SWEPT if q != p]
        slice_ = [e for e in dev if all(_key(e["params"][q]) == _key(now[q]) for q in others)]
        by_value: dict[str, list[dict]] = {}
        for e in slice_:
            by_value.setdefault(_key(e["params"][p]), []).append(e)
        if len(by_value) < 2:
            continue  # not swept (one value or none): nothing to choose between
        values, rows_of = [], []
        for k, es in sorted(by_value.items(), key=lambda kv: _order(json.loads(kv[0]))):
            scores = [e["headline"]["score_mean"] for e in es if e["headline"]["score_mean"] is not None]
            ratios = [e["headline"]["kv_ratio"] for e in es if e["headline"]["kv_ratio"] is not None]
            # Repeats of one value (same code, same prompts) give the same rows: the last by name
            # with per-prompt results stands for them.
            with_rows = [e for e in es if e.get("per_prompt") is not None]
            rows = with_rows[-1]["per_prompt"] if with_rows else None
            v = {"value": json.loads(k), "experiments": [e["name"] for e in es],
                 "score_mean": sum(scores) / len(scores) if scores else math.nan,
                 "kv_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
                 "n_prompts": es[0]["headline"]["n_prompts"]}
            if rows is not None:
                v.update(answer_logprob_mean=_mean(rows["answer_logprob"]), kl_fp16_mean=_mean(rows["kl_fp16"]))
            values.append(v)
            rows_of.append(rows)
        current = next((i for i, v in enumerate(values) if _key(v["value"]) == _key(now[p])), None)
        versus_current(values, rows_of, current)
        scored = [v for v in values if not math.isnan(v["score_mean"])]
        # For the budget, more memory always helps: the choice is a trade-off, shown, not picked.
        # A tie keeps the current value: dev evidence must beat it to move a default.
        best = None
        if p != "budget" and scored:
            top = max(v["score_mean"] for v in scored)
            tied = [v["value"] for v in scored if v["score_mean"] == top]
            best = now[p] if any(_key(v) == _key(now[p]) for v in tied) else tied[0]
        summary["params"][p] = {"current": now[p], "best_on_dev": best, "values": values}
    if not summary["params"]:
        summary["note"] = "no parameter swept with the others at their current values"
    return summary


def plot(summary: dict, stem: str | Path) -> list[Path]:
    """Per swept parameter: the headline run's dev accuracy per value (current marked) and, below,
    the paired change in the gold answer's log-likelihood against the current value (95% CI)."""
    from matplotlib.figure import Figure

    from smartkv.plots import _save

    params = summary["params"]
    if not params:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, summary.get("note", "no sweep"), ha="center", va="center")
        return _save(fig, stem)
    fig = Figure(figsize=(3.4 * len(params), 5.6), layout="constrained")
    for i, (p, s) in enumerate(params.items()):
        ax = fig.add_subplot(2, len(params), i + 1)
        labels = [str(v["value"]) for v in s["values"]]
        scores = [v["score_mean"] for v in s["values"]]
        colors = ["#D55E00" if _key(v["value"]) == _key(s["current"]) else "#0072B2" for v in s["values"]]
        ax.bar(range(len(labels)), scores, color=colors)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("SmartKV accuracy (dev seeds)" if i == 0 else "")
        n = s["values"][0]["n_prompts"]
        ax.set_title(f"{p} (n={n} prompts each)", fontsize=9)
        low = fig.add_subplot(2, len(params), len(params) + i + 1)
        low.axhline(0, color="#888888", lw=0.8)
        for j, v in enumerate(s["values"]):
            d = (v.get("vs_current") or {}).get("answer_logprob")
            if d is None or d["mean_diff"] is None:
                continue
            lo, hi = d["ci_lo"], d["ci_hi"]
            err = None if lo is None or hi is None else [[d["mean_diff"] - lo], [hi - d["mean_diff"]]]
            low.errorbar([j], [d["mean_diff"]], yerr=err, fmt="o", color="#0072B2", capsize=3)
        low.set_xticks(range(len(labels)), labels)
        low.set_xlim(-0.5, len(labels) - 0.5)
        low.set_xlabel(p)
        low.set_ylabel("Δ answer log-lik. vs current (nats)" if i == 0 else "")
    fig.suptitle(f"Sweeps on dev seeds ({summary['n_dev']} experiments; orange = current value)", fontsize=10)
    return _save(fig, stem)
