"""Markdown tables and `metrics/*.json` dicts from summaries and paired tests."""

from __future__ import annotations

import math

import pandas as pd

from smartkv.stats.summary import PERPLEXITY_TASK, run_memory

TEST_LEAVES = ["n_pairs", "n_unpaired", "n_clusters", "p_prompts", "n_target_only", "n_baseline_only", "target_mean",
               "baseline_mean", "mean_diff", "ci_lo", "ci_hi", "p", "p_holm", "p_t", "p_wilcoxon",
               "significant", "noninferior", "equivalent", "margin", "target_kv_ratio", "baseline_kv_ratio",
               "target_kv_bytes", "baseline_kv_bytes"]
MEMORY_HEADER = "KV memory (× FP16, accuracy prompts)"
TASK_MEAN_HEADER = "mean over tasks (mean of per-task means)"


def _num(x) -> float | None:
    """A JSON-safe finite float, or None (NaN is not valid JSON and breaks `dvc metrics`)."""
    if x is None or isinstance(x, str):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _leaves(d: dict) -> dict:
    return {k: v for k, v in ((k, _num(v)) for k, v in d.items()) if v is not None}


def comparison_key(t) -> str:
    """`<target>_vs_<baseline>`, with `:<measure>` for any measure but the score."""
    name = f"{t['target']}_vs_{t['baseline']}"
    measure = t.get("measure", "score")
    return name if measure == "score" else f"{name}:{measure}"


def metrics_json(summary: pd.DataFrame, tests: pd.DataFrame | None = None) -> dict:
    """Nested dict for `metrics/*.json`: numbers only at the leaves (flags as 0/1).
    runs -> run -> task -> leaves; tests -> comparison_key -> task -> leaves."""
    runs: dict = {}
    for _, r in summary.iterrows():
        leaf = _leaves({k: r.get(k) for k in ("score_mean", "score_std", "ppl", "kv_ratio", "tokens_per_s",
                                                "n_samples", "n_seeds")})
        runs.setdefault(r["run"], {})[r["task"]] = leaf
    out: dict = {"runs": runs}
    if tests is not None and not tests.empty:
        cmp: dict = {}
        for _, t in tests.iterrows():
            leaf = _leaves({k: t[k] for k in TEST_LEAVES if k in t.index})
            cmp.setdefault(comparison_key(t), {})[t.get("task", "all")] = leaf
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
    the mean over tasks (mean of per-task means), measured KV memory (mean over accuracy
    prompts, perplexity excluded, as everywhere) and mean tokens/s."""
    if summary.empty:
        return "_no results_\n"
    tasks = list(dict.fromkeys(summary["task"]))
    acc_tasks = [t for t in tasks if t != PERPLEXITY_TASK]
    runs = list(dict.fromkeys(summary["run"]))
    cell = {(r.run, r.task): r for r in summary.itertuples(index=False)}
    memory = run_memory(summary)
    header = ["run", *[f"{t} (ppl ↓)" if t == PERPLEXITY_TASK else t for t in tasks]]
    header += [TASK_MEAN_HEADER] if len(acc_tasks) > 1 else []
    timed = "tokens_per_s" in summary and summary["tokens_per_s"].notna().any()  # the pipeline keeps timings apart
    header += [MEMORY_HEADER] + (["tokens/s"] if timed else [])
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
        if len(acc_tasks) > 1:
            means = [cell[(run, t)].score_mean for t in acc_tasks if (run, t) in cell]
            cells.append(_fmt(sum(means) / len(means), math.nan) if len(means) == len(acc_tasks) else "–")
        rs = summary[summary["run"] == run]
        cells += [f"{memory[run]:.3f}"] + ([f"{rs['tokens_per_s'].mean():.1f}"] if timed else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _flag(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else ("yes" if x else "no")


def comparison_table(tests: pd.DataFrame) -> str:
    """One row per paired comparison. Only Holm-adjusted results are bold: the adjusted p and
    the verdict of a comparison significant after Holm within its family. Δ = target −
    baseline with the cluster-bootstrap 95% CI; discordant = prompts only the target / only
    the baseline got right; KV memory is each side's mean over the paired prompts."""
    if tests is None or tests.empty:
        return "_no paired tests were run_\n"
    cols = ["target", "baseline", "measure", "task", "n (clusters)", "discordant t / b",
            "KV memory t / b", "Δ mean [95% CI]", "test", "p", "p (Holm)", "verdict",
            "non-inferior (margin)", "family", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in tests.to_dict("records"):
        sig = bool(t.get("significant", False))
        disc = ("–" if math.isnan(t.get("n_target_only", math.nan))
                else f"{int(t['n_target_only'])} / {int(t['n_baseline_only'])}")
        holm, verdict = _p(t.get("p_holm", math.nan)), t.get("verdict", "")
        margin = t.get("margin", math.nan)
        ni = _flag(t.get("noninferior", math.nan)) + ("" if math.isnan(margin) else f" ({margin:g})")
        lines.append("| " + " | ".join([
            f"`{t['target']}`", f"`{t['baseline']}`", t.get("measure", "score"), str(t["task"]),
            f"{t['n_pairs']} ({t.get('n_clusters', t['n_pairs'])})", disc,
            f"{t.get('target_kv_ratio', math.nan):.3f} / {t.get('baseline_kv_ratio', math.nan):.3f}",
            f"{t['mean_diff']:+.3f} [{t['ci_lo']:+.3f}, {t['ci_hi']:+.3f}]", t.get("test", ""),
            _p(t["p"]), f"**{holm}**" if sig else holm, f"**{verdict}**" if sig else verdict, ni,
            t.get("family", ""), t.get("note", "") or "",
        ]) + " |")
    return "\n".join(lines) + "\n"


def main_table(summary: pd.DataFrame, tests: pd.DataFrame, power: dict) -> str:
    """`metrics/main_table.md`: the per-task table, the pooled comparisons with how each
    SmartKV partner was chosen, and the power the design reaches (`power_report`'s dict)."""
    md = ["## Results per task", "Score mean ± std over seeds; a task run at several prompt lengths has one "
          "column per length (`niah@2k`); the mean over tasks is the mean of per-task "
          "means (each task weighs the same); KV memory is the mean over accuracy prompts (perplexity "
          "rows excluded), as everywhere in this study.", "", markdown_table(summary)]
    pooled = tests[tests["task"] == "all"] if len(tests) else tests
    md += ["## Baselines vs matched-memory SmartKV", "Pooled over prompts (task = all; a task with more "
           "prompts weighs more). Exact McNemar for 0/1 outcomes, paired t for continuous ones; CI by "
           "cluster bootstrap; bold = significant after Holm within its family, else inconclusive.", "",
           comparison_table(pooled)]
    if len(pooled):
        md += ["How each SmartKV run was chosen:", ""]
        md += [f"- `{b}` → `{r['target']}` ({r['match']}): {r['match_reason']}"
               for b, r in pooled.drop_duplicates("baseline").set_index("baseline").iterrows()]
        md.append("")
    d = power.get("design")
    if d:
        md += ["## Power", f"At the median comparison (n = {d['n_pairs']} pairs in {d.get('n_clusters', d['n_pairs'])} "
               f"independent clusters, discordance {d['discordance_observed']:.2f}, taken as "
               f"{d['discordance_assumed']:.2f}), the exact test on its clusters has power {d['power']:.2f} to detect a "
               f"{power['effect']:.2f} difference at alpha {power['alpha']}; {power['target_power']:.0%} power "
               f"needs n = {d['n_for_target_power']} independent clusters (passages, not prompts).", ""]
    return "\n".join(md)
