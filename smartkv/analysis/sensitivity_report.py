"""Summary and figure of the sensitivity experiment (`smartkv.analysis.sensitivity`).

Every comparison is paired within a prompt: the same prompt, the same bytes, only which
tokens sit at the low width changes. KL and log-likelihood differences get a percentile
bootstrap 95% CI of the mean; accuracy gets the exact McNemar test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from smartkv.analysis.paired import mcnemar_exact, paired_difference
from smartkv.stats import bootstrap_ci


def _wide(df: pd.DataFrame, value: str) -> pd.DataFrame:
    return df.pivot(index="sample_id", columns="condition", values=value)


def _tag(k: float, rotate: bool) -> str:
    return f"k{round(100 * k)}" + ("-rot" if rotate else "")


def _compare(kl, lp, ex, a: str, b: str, seed: int) -> dict:
    return {
        "a": a,
        "b": b,
        "kl_diff": paired_difference(kl[a], kl[b], seed),
        "gold_logprob_diff": paired_difference(lp[a], lp[b], seed),
        "accuracy_a": float(ex[a].mean()),
        "accuracy_b": float(ex[b].mean()),
        "mcnemar": mcnemar_exact(ex[a].to_numpy(), ex[b].to_numpy()),
    }


def _verdict(c: dict) -> str:
    """Which side of 'a' vs 'b' is more harmful, by the KL CI (a - b)."""
    d = c["kl_diff"]
    if d["ci_lo"] > 0:
        return f"{c['a']} more harmful"
    if d["ci_hi"] < 0:
        return f"{c['b']} more harmful"
    return "no difference resolved"


def summary(df: pd.DataFrame, cfg: dict) -> dict:
    """Per-condition means and paired top/bottom/random comparisons; JSON-ready."""
    seed = int(cfg.get("bootstrap_seed", 0))
    kl, lp, ex = _wide(df, "kl"), _wide(df, "gold_logprob"), _wide(df, "exact").astype(bool)
    conds = {}
    # Accuracy also among the prompts FP16 itself answers: a miss there is the cache's doing.
    fp16_ok = set(ex.index[ex["fp16"]]) if "fp16" in ex else set()
    for label, g in df.groupby("condition", sort=False):
        lo, hi = bootstrap_ci(g["kl"].to_numpy(), seed=seed)
        ok = g[g["sample_id"].isin(fp16_ok)]
        conds[label] = {"n": int(len(g)), "kl_mean": float(g["kl"].mean()), "kl_ci_lo": lo, "kl_ci_hi": hi,
                        "gold_logprob_mean": float(g["gold_logprob"].mean()), "accuracy": float(g["exact"].mean()),
                        "accuracy_where_fp16_right": float(ok["exact"].mean()) if len(ok) else math.nan,
                        "mean_quant_bits": float(g["mean_quant_bits"].mean())}
    comps = {}
    for rotate in sorted(df["rotate"].unique()):
        for k in sorted(df.loc[df["fraction"] > 0, "fraction"].unique()):
            t = _tag(k, rotate)
            rnd = f"random-{t}"
            for score in ("window", "accumulated"):
                top, bot = f"top-{score}-{t}", f"bottom-{score}-{t}"
                if top not in kl or bot not in kl:
                    continue
                entry = {"top_vs_bottom": _compare(kl, lp, ex, top, bot, seed),
                         "top_vs_random": _compare(kl, lp, ex, top, rnd, seed),
                         "bottom_vs_random": _compare(kl, lp, ex, bot, rnd, seed)}
                for c in entry.values():
                    c["verdict"] = _verdict(c)
                comps[f"{score}-{t}"] = entry
    fp16_acc = float(ex["fp16"].mean()) if "fp16" in ex else math.nan
    return {
        "simulation": "prefilled cache quantized then de-quantized in place (analysis only)",
        "n_prompts": int(df["sample_id"].nunique()),
        "fp16_accuracy": fp16_acc,
        "n_fp16_right": len(fp16_ok),
        "design": {k: v for k, v in cfg.items()},
        "conditions": conds,
        "comparisons": comps,
    }


def table(summ: dict) -> str:
    """Markdown: one row per (score, k, rotation): KL and accuracy of top/bottom/random, top - bottom with CI."""
    lines = ["| keys | k | score | KL top | KL bottom | KL random | ΔKL top−bottom [95% CI] | acc top / bottom / random | McNemar p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    c = summ["conditions"]
    for name, e in summ["comparisons"].items():
        tb = e["top_vs_bottom"]
        rnd = e["top_vs_random"]["b"]
        d = tb["kl_diff"]
        rot = "rotated" if name.endswith("-rot") else "plain"
        score, k = name.split("-")[0], name.split("-")[1]
        lines.append(f"| {rot} | {k[1:]}% | {score} | {c[tb['a']]['kl_mean']:.4f} | {c[tb['b']]['kl_mean']:.4f} | "
                     f"{c[rnd]['kl_mean']:.4f} | {d['mean_diff']:+.4f} [{d['ci_lo']:+.4f}, {d['ci_hi']:+.4f}] | "
                     f"{tb['accuracy_a']:.2f} / {tb['accuracy_b']:.2f} / {c[rnd]['accuracy']:.2f} | "
                     f"{tb['mcnemar']['p_mcnemar']:.3g} |")
    return "\n".join(lines)


def figure(df: pd.DataFrame, out_stem: str | Path, cfg: dict) -> list[Path]:
    from smartkv.analysis.figures import sensitivity_figure

    return sensitivity_figure(df, out_stem, seed=int(cfg.get("bootstrap_seed", 0)))
