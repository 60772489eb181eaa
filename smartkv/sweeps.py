"""Sweeps as DVC experiments: read the finished ones and summarize each swept parameter.

Experiments are queued with `dvc exp run --queue -S split=dev -S decay=0.85,0.9,0.95 smartkv`
(see docs/study.md, "Sweeps") and run with `dvc queue start -j N`. Each finished experiment is a commit
holding its params, `metrics/smartkv.json` and, git-tracked, `data/smartkv/<cell>.parquet`;
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

A paired comparison is only as exact as its pairs: the same prompts through the same code on
the same machine. Floating-point results move across CPUs (answer log-likelihoods by up to
~0.006 nats on the dev set), and a sweep may run with a lighter protocol than the study's
(other runs of the stage switched off, docs/study.md, "Sweeps"). So each experiment belongs to a
batch, the commit it was run from and its other params (the protocol), and each value is
compared with the current value's experiment of its own batch. Repeats of one configuration
(`reruns`) measure how far float noise alone moves each measure.

This module is not imported by the model stages: editing it re-runs `sweeps` only.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import subprocess
from collections import Counter
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
RESULTS_DIR = "data/smartkv"  # one file per cell (smartkv/study/cells.py)
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
    """rev -> the union of that commit's `data/smartkv/<cell>.parquet`, or None where the commit or
    the files are absent."""
    def show(rev: str, path: str) -> bytes | None:
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True)
        return proc.stdout if proc.returncode == 0 and proc.stdout else None

    def rows_at(rev: str) -> pd.DataFrame | None:
        ls = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{RESULTS_DIR}"], cwd=repo, capture_output=True,
                            text=True)
        names = [n for n in ls.stdout.split() if n.endswith(".parquet")] if ls.returncode == 0 else []
        blobs = [b for b in (show(rev, f"{RESULTS_DIR}/{n}") for n in names) if b]
        return pd.concat([pd.read_parquet(io.BytesIO(b)) for b in blobs], ignore_index=True) if blobs else None
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


def protocol(params: dict) -> str:
    """A short fingerprint of an experiment's params other than the swept ones: experiments
    with the same fingerprint ran the same protocol (prompts, runs, method defaults)."""
    rest = json.loads(json.dumps(params))
    for k in SWEPT:
        *path, leaf = k.split(".")
        node = rest
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha1(_key(rest).encode()).hexdigest()[:12]


def cpu_model() -> str:
    """This machine's CPU as /proc/cpuinfo names it, and its core count ("AMD EPYC, 2 cores")."""
    name = ""
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def finished(shown: list[dict], rows_at: RowsAt | None = None) -> list[dict]:
    """One record per finished experiment: name, params, its batch (the commit it was run from,
    its protocol), the machine that found it, its headline run's metrics and, where
    `rows_at(rev)` finds the experiment's results, its per-prompt headline measures."""
    out, machine = [], cpu_model()
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
                          "baseline": commit.get("rev"), "protocol": protocol(params),
                          "timestamp": data.get("timestamp"),
                          # float results move across CPUs: the machine whose refs held it (the
                          # one that ran it, unless they were pulled from another)
                          "found_on": machine,
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


def _or_nan(x) -> float:
    return math.nan if x is None else float(x)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else math.nan


def _paired(a: dict, b: dict, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of `measure` on the prompts both per-prompt records hold (a's order)."""
    bv = {k: v for k, v in zip(b["key"], b[measure]) if v is not None}
    pairs = [(v, bv[k]) for k, v in zip(a["key"], a[measure]) if v is not None and k in bv]
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)


def _batch(e: dict) -> str:
    """The batch an experiment ran in: the commit it was run from and its protocol (records kept
    from before batches were recorded share one batch, as they shared one session)."""
    return _key([e.get("baseline"), e.get("protocol")])


def _newest_first(es: list[dict]) -> list[dict]:
    return sorted(es, key=lambda e: (e.get("timestamp") or "", e["name"]), reverse=True)


def versus_current(values: list[dict], pairs: list[tuple[dict | None, dict | None] | None]) -> None:
    """Adds `vs_current` to each value whose `pairs` entry is (its per-prompt rows, the current
    value's experiment of the same batch): per measure, the paired comparison on the prompts both
    hold (Holm over every test of this parameter), and `paired_with`, that experiment's name. A
    value without rows, or without a current-value partner in its batch, says so. An entry of
    None (the current value itself) is skipped."""
    tests = []
    for v, pair in zip(values, pairs):
        if pair is None:
            continue
        rows, partner = pair
        if rows is None or partner is None:
            v["vs_current"] = {"note": "per-prompt results not recorded for this experiment, or no experiment of "
                                       "the current value recorded them in the same batch (commit and protocol)"}
            continue
        v["paired_with"], v["vs_current"] = partner["name"], {}
        for m in MEASURES:
            t, b = _paired(rows, partner["per_prompt"], m)
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


def _representative(es: list[dict], partners: dict[str, dict], is_current: bool, weight: Counter) -> dict:
    """The experiment that stands for a value: the newest with per-prompt rows whose batch also
    ran the current value, else the newest with rows, else the newest. For the current value:
    its experiment in the batch most other values ran in (`weight`), so that the row shown is the
    one they were compared with."""
    newest = _newest_first(es)
    with_rows = [e for e in newest if e.get("per_prompt") is not None]
    if is_current:
        paired = sorted(with_rows, key=lambda e: weight[_batch(e)], reverse=True)  # stable: newest first on ties
    else:
        paired = [e for e in with_rows if _batch(e) in partners]
    return (paired or with_rows or newest)[0]


def reruns(experiments: list[dict]) -> list[dict]:
    """The run-to-run spread: every pair of recorded experiments with the same swept values
    (a repeat of one configuration), compared prompt by prompt. Per pair: whether the two share
    a commit and a protocol (None where a record predates them), the machines that found them,
    the prompts both hold, how many flip their 0/1 score, and the largest and mean |difference|
    of each continuous measure.
    What a repeat moves is the floor under every Δ of the sweep tables (and of the study's
    comparisons): a difference inside it is float noise, not evidence."""
    groups: dict[str, list[dict]] = {}
    for e in experiments:
        if e.get("per_prompt") is not None:
            groups.setdefault(_key([e["split"], e["params"]]), []).append(e)
    out = []
    for _, es in sorted(groups.items()):
        es = _newest_first(es)
        for i, a in enumerate(es):
            for b in es[i + 1:]:
                sa, sb = _paired(a["per_prompt"], b["per_prompt"], "score")
                known = a.get("baseline") is not None and b.get("baseline") is not None
                pair = {"a": a["name"], "b": b["name"], "split": a["split"], "params": a["params"],
                        "same_commit": a.get("baseline") == b.get("baseline") if known else None,
                        "same_protocol": a.get("protocol") == b.get("protocol") if known else None,
                        "found_on": [a.get("found_on"), b.get("found_on")],
                        "n_prompts": int(sa.size), "score_flips": int((sa != sb).sum()), "max_abs": {},
                        "mean_abs": {}}
                for m in MEASURES[1:]:
                    x, y = _paired(a["per_prompt"], b["per_prompt"], m)
                    d = np.abs(x - y)
                    pair["max_abs"][m] = float(d.max()) if d.size else None
                    pair["mean_abs"][m] = float(d.mean()) if d.size else None
                out.append(pair)
    return out


def summarize(experiments: list[dict], current: dict) -> dict:
    """{n_experiments, n_dev, experiments, params: {param: {current, best_on_dev, values: [...]}}}."""
    dev = [e for e in experiments if e["split"] == "dev"]
    now = {k: get(current, k, None) for k in SWEPT}
    summary: dict = {"n_experiments": len(experiments), "n_dev": len(dev), "experiments": experiments, "params": {},
                     "reruns": reruns(experiments)}
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
        cur = _key(now[p])
        partners: dict[str, dict] = {}  # batch -> the newest current-value experiment with rows
        for e in _newest_first(slice_):
            if _key(e["params"][p]) == cur and e.get("per_prompt") is not None:
                partners.setdefault(_batch(e), e)
        weight = Counter(_batch(e) for e in slice_ if _key(e["params"][p]) != cur)
        values, pairs = [], []
        for k, es in sorted(by_value.items(), key=lambda kv: _order(json.loads(kv[0]))):
            rep = _representative(es, partners, k == cur, weight)
            rows = rep.get("per_prompt")
            # Repeats of one value give the same accuracy up to the CPU's float noise: the
            # representative (the experiment its paired comparison uses) stands for them.
            v = {"value": json.loads(k), "experiments": [e["name"] for e in es], "shown": rep["name"],
                 "score_mean": _or_nan(rep["headline"]["score_mean"]), "kv_ratio": _or_nan(rep["headline"]["kv_ratio"]),
                 "n_prompts": rep["headline"]["n_prompts"]}
            if rows is not None:
                v.update(answer_logprob_mean=_mean(rows["answer_logprob"]), kl_fp16_mean=_mean(rows["kl_fp16"]))
            values.append(v)
            pairs.append(None if k == cur else (rows, partners.get(_batch(rep))))
        versus_current(values, pairs)
        # A value scored on fewer prompts (it errored on the others: dp refuses 2k prompts, say)
        # has its mean over an easier set, so it cannot be the best on dev.
        full = max((v["n_prompts"] or 0 for v in values), default=0)
        scored = []
        for v in values:
            if (v["n_prompts"] or 0) < full:
                v["note"] = f"scored on {v['n_prompts']} of {full} prompts (it errored on the rest): not a candidate"
            elif not math.isnan(v["score_mean"]):
                scored.append(v)
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
    the paired change in the gold answer's log-likelihood against the current value (95% CI),
    over a grey band: the largest move between two runs of one configuration (`reruns`)."""
    from matplotlib.figure import Figure

    from smartkv.plots import _save

    params = summary["params"]
    if not params:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, summary.get("note", "no sweep"), ha="center", va="center")
        return _save(fig, stem)
    # The largest per-prompt move of the answer log-likelihood between two runs of one
    # configuration: a mean Δ inside this band is within float noise.
    spread = [r["max_abs"].get("answer_logprob") for r in summary.get("reruns") or []]
    floor = max((x for x in spread if x is not None), default=None)
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
        if floor is not None:
            low.axhspan(-floor, floor, color="#DDDDDD", zorder=0, label=f"re-run spread (±{floor:.3f})")
            low.legend(loc="lower left", fontsize=7, frameon=False)
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
