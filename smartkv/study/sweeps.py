"""Sweeps as DVC experiments: read the finished ones and summarize each swept parameter.

Experiments are queued with `dvc exp run --queue -S split=dev -S decay=0.85,0.9,0.95 smartkv`
(see README) and run with `dvc queue start -j N`. Each finished experiment is a commit
holding its params and `metrics/smartkv.json`; `dvc exp show --json` lists them. Only
dev-seed experiments count as evidence for choosing a default (test seeds report, never
choose). For each swept parameter, the summary takes the experiments whose other swept
parameters sit at the current `params.yaml` values (one factor at a time), and gives the
headline run's dev score and measured memory per value.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from smartkv.study.params import get
from smartkv.study.labels import HEADLINE

SWEPT = ("budget", "decay", "realloc_freq", "smartkv.allocation")
METRICS_FILE = "metrics/smartkv.json"


def dvc_experiments(repo: str | Path = ".") -> list[dict]:
    """`dvc exp show --all-commits --json`, as parsed JSON (every baseline commit with its
    experiments): a sweep stays in the summary after later commits move HEAD past its baseline."""
    proc = subprocess.run(["dvc", "exp", "show", "--all-commits", "--json"], cwd=repo, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout or "[]")


def finished(shown: list[dict]) -> list[dict]:
    """One record per finished experiment: name, params, its headline run's metrics."""
    out = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
                runs = (((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data") or {}).get("runs", {})
                if rev.get("error") or not params or HEADLINE not in runs:
                    continue  # queued, running, failed, or from before the smartkv metrics existed
                out.append({"name": rev.get("name") or exp.get("name") or rev["rev"][:7], "rev": rev["rev"],
                            "split": params.get("split", "test"),
                            "params": {k: get(params, k, None) for k in SWEPT},
                            "headline": {k: runs[HEADLINE].get(k) for k in ("score_mean", "kv_ratio", "n_prompts")}})
    return sorted(out, key=lambda e: (e["name"], e["rev"]))


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def summarize(experiments: list[dict], current: dict) -> dict:
    """{n_experiments, n_dev, experiments, params: {param: {current, best, values: [...]}}}."""
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
        values = []
        for k, es in sorted(by_value.items(), key=lambda kv: kv[0]):
            scores = [e["headline"]["score_mean"] for e in es if e["headline"]["score_mean"] is not None]
            ratios = [e["headline"]["kv_ratio"] for e in es if e["headline"]["kv_ratio"] is not None]
            values.append({"value": json.loads(k), "experiments": [e["name"] for e in es],
                           "score_mean": sum(scores) / len(scores) if scores else math.nan,
                           "kv_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
                           "n_prompts": es[0]["headline"]["n_prompts"]})
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
    """One panel per swept parameter: the headline run's dev score per value (current marked)."""
    from matplotlib.figure import Figure

    from smartkv.plots import _save

    params = summary["params"]
    if not params:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, summary.get("note", "no sweep"), ha="center", va="center")
        return _save(fig, stem)
    fig = Figure(figsize=(3.4 * len(params), 3.2), layout="constrained")
    for i, (p, s) in enumerate(params.items()):
        ax = fig.add_subplot(1, len(params), i + 1)
        labels = [str(v["value"]) for v in s["values"]]
        scores = [v["score_mean"] for v in s["values"]]
        colors = ["#D55E00" if _key(v["value"]) == _key(s["current"]) else "#0072B2" for v in s["values"]]
        ax.bar(range(len(labels)), scores, color=colors)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel(p)
        ax.set_ylabel("SmartKV accuracy (dev seeds)" if i == 0 else "")
        n = s["values"][0]["n_prompts"]
        ax.set_title(f"{p} (n={n} prompts each)", fontsize=9)
    fig.suptitle(f"Sweeps on dev seeds ({summary['n_dev']} experiments; orange = current value)", fontsize=10)
    return _save(fig, stem)
