"""Figures of what memory buys: needle accuracy with binomial CIs, where the bytes go, and
perplexity, each against measured KV memory. Built like smartkv/plots.py (Figure without
pyplot, PNG + deterministic PDF); each `*_figure` returns the figure (and its point labels)
so that tests can inspect it, each plain function saves it and returns the two paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import stats as sps

from smartkv.cache.base import MEMORY_PARTS
from smartkv.plot_labels import place_labels, wilson_interval
from smartkv.plots import MARKERS, _family_color, _save, _styled
from smartkv.stats import PERPLEXITY_TASK
from smartkv.stats.summary import FAMILY_ORDER

PART_COLORS = {  # Okabe-Ito, plus greys for the FP16 parts and what is not itemized
    "codes": "#0072B2", "scales": "#56B4E9", "index": "#F0E442", "sinks": "#CC79A7", "window": "#E69F00",
    "fp16": "#999999", "key_stats": "#009E73", "tracker": "#D55E00", "quantized": "#6A8FB3", "other": "#DDDDDD",
}
NOT_ITEMIZED = "not itemized"


def _ordered_runs(table: pd.DataFrame) -> pd.DataFrame:
    """Baselines, peers, SmartKV, ablations; within a family, most memory first (as the tables)."""
    rank = table["family"].map(FAMILY_ORDER).fillna(len(FAMILY_ORDER))
    return table.assign(_rank=rank).sort_values(["_rank", "kv_ratio"], ascending=[True, False]).drop(columns="_rank")


def _curves(ax, table: pd.DataFrame, y: str, lo: np.ndarray, hi: np.ndarray) -> None:
    """One series per method: SmartKV/ablation budgets joined as a curve, others as points."""
    for i, (method, m) in enumerate(table.groupby("method", sort=False)):
        m = m.sort_values("kv_ratio")
        family = m["family"].iloc[0]
        curve = family in ("smartkv", "ablation") and len(m) > 1
        ax.errorbar(m["kv_ratio"], m[y], yerr=np.clip(np.vstack([lo[m.index], hi[m.index]]), 0, None), color=_family_color(family),
                    marker=MARKERS[i % len(MARKERS)], markersize=7, linestyle="-" if curve else "none",
                    linewidth=1.6, capsize=3, label=f"{method} ({family})")


def niah_table(df: pd.DataFrame, task: str = "niah") -> pd.DataFrame:
    """Per run on one needle task: k correct of n prompts (all seeds pooled: each seed draws
    new prompts), the accuracy k/n, its Wilson 95% interval, and the mean memory ratio."""
    d = df[(df["task"] == task) & df["score"].notna()]
    if d.empty:
        raise ValueError(f"niah_pareto: no scored rows of task {task!r}")
    bad = sorted(set(d["score"].unique()) - {0.0, 1.0})
    if bad:
        raise ValueError(f"niah_pareto: binomial intervals need 0/1 scores; task {task!r} has {bad[:3]}")
    g = d.groupby("run", sort=False)
    t = pd.DataFrame({"method": g["method"].first(), "family": g["family"].first(), "k": g["score"].sum(),
                      "n": g["score"].count(), "kv_ratio": g["kv_ratio"].mean()})
    t["accuracy"] = t["k"] / t["n"]
    t["ci_lo"], t["ci_hi"] = wilson_interval(t["k"], t["n"])
    return _ordered_runs(t.reset_index().rename(columns={"index": "run"})).reset_index(drop=True)


def _n_text(n: pd.Series, unit: str) -> str:
    lo, hi = int(n.min()), int(n.max())
    return f"n = {lo} {unit} per run" if lo == hi else f"n = {lo}–{hi} {unit} per run"


@_styled
def niah_pareto_figure(df: pd.DataFrame, task: str = "niah") -> tuple[Figure, list]:
    t = niah_table(df, task)
    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _curves(ax, t, "accuracy", (t["accuracy"] - t["ci_lo"]).to_numpy(), (t["ci_hi"] - t["accuracy"]).to_numpy())
    ax.set_xlabel("Measured KV-cache memory (fraction of FP16 bytes)")
    ax.set_ylabel(f"Accuracy on {task} (share of prompts)")
    ax.set_xlim(0, max(1.05, float(t["kv_ratio"].max()) + 0.05))
    ax.set_ylim(-0.02, 1.08)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Needle retrieval ({task}) vs KV memory ({_n_text(t['n'], 'prompts')}, seeds pooled)\n"
                 "error bars: Wilson 95% binomial interval", fontsize=10)
    labels = place_labels(ax, t["kv_ratio"].to_numpy(), t["accuracy"].to_numpy(), list(t["run"]))
    return fig, labels


def niah_pareto(df: pd.DataFrame, out_stem: str | Path, task: str = "niah") -> list[Path]:
    """Accuracy on the needle task alone, with binomial (Wilson) 95% CIs, against memory."""
    return _save(niah_pareto_figure(df, task)[0], out_stem)


def breakdown_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per run over its accuracy prompts: the mean share of FP16 bytes in each part of
    `MEMORY_PARTS` (columns named by part), `not itemized` for runs whose rows carry no
    breakdown (results written before it, or caches that do not itemize), and `kv_ratio`,
    which the parts add up to."""
    d = df[df["task"] != PERPLEXITY_TASK]
    if d.empty:
        d = df
    fp16 = d["fp16_kv_bytes"].astype(float)
    cols = {part: f"kv_{part}_bytes" for part in MEMORY_PARTS}
    shares = pd.DataFrame({part: d[c].astype(float) / fp16 if c in d.columns else np.nan for part, c in cols.items()},
                          index=d.index)
    itemized = shares.notna().any(axis=1)
    shares = shares.fillna(0.0)
    shares[NOT_ITEMIZED] = np.where(itemized, 0.0, d["kv_ratio"].astype(float))
    shares["run"], shares["method"], shares["family"] = d["run"], d["method"], d["family"]
    shares["kv_ratio"] = d["kv_ratio"].astype(float)
    g = shares.groupby("run", sort=False)
    out = g[[*MEMORY_PARTS, NOT_ITEMIZED, "kv_ratio"]].mean()
    out = out.join(g[["method", "family"]].first()).join(g.size().rename("n"))
    return _ordered_runs(out.reset_index()).reset_index(drop=True)


@_styled
def memory_breakdown_figure(df: pd.DataFrame) -> Figure:
    t = breakdown_table(df)
    parts = [p for p in (*MEMORY_PARTS, NOT_ITEMIZED) if (t[p] > 0).any()]
    fig = Figure(figsize=(8.0, max(3.0, 0.36 * len(t) + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(t))[::-1]  # first run on top
    left = np.zeros(len(t))
    for part in parts:
        color = PART_COLORS.get(part, "#DDDDDD")
        ax.barh(y, t[part], left=left, color=color, edgecolor="white", linewidth=0.4,
                hatch="//" if part == NOT_ITEMIZED else "")
        left += t[part].to_numpy()
    for yi, total in zip(y, t["kv_ratio"]):
        ax.text(total + 0.01, yi, f"{total:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, list(t["run"]))
    ax.set_xlim(0, max(1.05, float(t["kv_ratio"].max()) * 1.12))
    ax.set_xlabel("KV-cache memory (fraction of FP16 bytes), by what holds it")
    ax.grid(axis="y", visible=False)
    handles = [Patch(facecolor=PART_COLORS.get(p, "#DDDDDD"), hatch="//" if p == NOT_ITEMIZED else "",
                     label=MEMORY_PARTS.get(p, "not itemized (these rows carry no breakdown)")) for p in parts]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Where the KV memory goes ({_n_text(t['n'], 'prompts')})\n"
                 "bars: mean over prompts of each part's bytes ÷ FP16 bytes; the parts add up to the total shown",
                 fontsize=10)
    return fig


def memory_breakdown(df: pd.DataFrame, out_stem: str | Path) -> list[Path]:
    """Stacked bars: codes, scales, index, sinks, window, key statistics, tracker per run."""
    return _save(memory_breakdown_figure(df), out_stem)


def perplexity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per run over its perplexity texts: perplexity exp(mean NLL), the 95% t-interval of the
    mean NLL exponentiated, the memory ratio on those texts and n."""
    is_ppl = df["metric"] == "perplexity" if "metric" in df.columns else df["task"] == PERPLEXITY_TASK
    d = df[is_ppl & df["nll"].notna()]
    if d.empty:
        raise ValueError("perplexity_memory: no rows with metric 'perplexity' and an nll")
    rows = []
    for run, g in d.groupby("run", sort=False):
        nll = g["nll"].astype(float).to_numpy()
        n, mean = len(nll), float(nll.mean())
        half = float(sps.t.ppf(0.975, n - 1) * nll.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append({"run": run, "method": g["method"].iloc[0], "family": g["family"].iloc[0], "n": n,
                     "ppl": np.exp(mean), "ppl_lo": np.exp(mean - half), "ppl_hi": np.exp(mean + half),
                     "kv_ratio": float(g["kv_ratio"].mean()),
                     "tokens": float(g["answer_tokens"].median()) if "answer_tokens" in g else np.nan})
    return _ordered_runs(pd.DataFrame(rows)).reset_index(drop=True)


@_styled
def perplexity_memory_figure(df: pd.DataFrame) -> tuple[Figure, list]:
    t = perplexity_table(df)
    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    lo = np.nan_to_num((t["ppl"] - t["ppl_lo"]).to_numpy())
    hi = np.nan_to_num((t["ppl_hi"] - t["ppl"]).to_numpy())
    _curves(ax, t, "ppl", lo, hi)
    ax.set_yscale("log")
    ax.set_xlabel("Measured KV-cache memory on these texts (fraction of FP16 bytes)")
    ax.set_ylabel("Perplexity (log scale; lower is better)")
    ax.set_xlim(0, max(1.05, float(t["kv_ratio"].max()) + 0.05))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    tokens = t["tokens"].dropna()
    per_text = f" of {int(tokens.median())} tokens" if len(tokens) else ""
    ax.set_title(f"Perplexity vs KV memory ({_n_text(t['n'], 'texts' + per_text)})\n"
                 "error bars: 95% t-interval of the mean NLL over texts, exponentiated", fontsize=10)
    labels = place_labels(ax, t["kv_ratio"].to_numpy(), t["ppl"].to_numpy(), list(t["run"]))
    return fig, labels


def perplexity_memory(df: pd.DataFrame, out_stem: str | Path) -> list[Path]:
    """Perplexity (rows with metric "perplexity" carry `nll`) against measured memory."""
    return _save(perplexity_memory_figure(df)[0], out_stem)

