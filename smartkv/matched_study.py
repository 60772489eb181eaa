"""A self-contained matched comparison: one model, its own prompts, baselines, SmartKV at their bytes.

Part of the study layer (it drives `smartkv.study`), kept beside it rather than inside it so that
the main study's model stages, which depend on `smartkv/study` as a whole, do not depend on it.

A params section (`second_model`, `extra_cells`; `SECTIONS`) names a model, test seeds, a task
grid, baseline runs and the baselines to match. On test seeds this runs what the main study's
headline rests on:

1. the section's prompts, generated with the model's own tokenizer (lengths are its tokens);
2. FP16 and the matched baselines (`runs`, labels of `baselines`: FP16 must succeed for a
   prompt to say anything about a cache, so FP16's accuracy per cell is reported first);
3. each `match` baseline's KV bytes measured per cell (task x length), then SmartKV at exactly
   those budgets (`smartkv@int3`, `smartkv@kivi-2`), with the main study's SmartKV params;
4. exact McNemar per comparison, pooled and per cell, Holm within each family, as the stats
   stage does for the main study.

Two stages use it. `second_model`: Gemma-3-270M, a second model family (one KV head of 256
dimensions, 18 layers of which 5 in 6 attend over a 512-token sliding window), where the main
study's SmolLM2-135M has 3 KV heads of 64 dimensions on 30 full-attention layers. `extra_cells`:
the main model on the cells the main grid cannot afford on 2 CPU cores with every baseline,
SmartKV run, ablation and peer (4k-token needles, RULER multikey), with the headline
comparisons only. Each is its own stage so that the main study's outputs do not depend on it,
and `dvc exp run -S second_model.model=...` re-runs only that one.
"""

from __future__ import annotations

import math

import pandas as pd

from smartkv.study.params import ParamError, get, is_int

# The params sections this module reads, with the family name of their tests.
SECTIONS = {"second_model": "second model: baselines vs matched SmartKV",
            "extra_cells": "extra cells: baselines vs matched SmartKV"}
KEYS = ("model", "seeds", "tasks", "runs", "match")


def settings(params: dict, section: str = "second_model") -> dict:
    """The validated `section`: model, test seeds, task plan, baseline runs, match labels.

    `model: null` means the main study's `model` (`extra_cells` runs the main model)."""
    from smartkv.study.grid import task_plan
    from smartkv.study.params import seeds_by_split
    from smartkv.study.runs import baseline_runs

    if section not in SECTIONS:
        raise ValueError(f"section {section!r} is not one of {', '.join(SECTIONS)}")
    sm = get(params, section)
    if not isinstance(sm, dict):
        raise ParamError(f"{section} must be a mapping with {', '.join(KEYS)}")
    unknown = sorted(set(sm) - set(KEYS))
    if unknown:
        raise ParamError(f"{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    model = sm.get("model")
    if model is None:
        model = get(params, "model")
    if not isinstance(model, str) or not model:
        raise ParamError(f"{section}.model={model!r} must name a model (e.g. gemma3-270m), or null for `model`")
    seeds = sm.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) for s in seeds):
        raise ParamError(f"{section}.seeds={seeds!r} must be a non-empty list of integer seeds")
    test = seeds_by_split(params)["test"]
    stray = [s for s in seeds if s not in test]
    if stray:  # dev seeds choose, test seeds report: this stage reports
        raise ParamError(f"{section}.seeds: {stray} are not test seeds ({test}); it reports, it does not tune")
    plan = task_plan({"tasks": sm.get("tasks"), "max_new_tokens": get(params, "max_new_tokens"),
                      "longbench": {"enabled": False}})
    by_label = {r.label: r for r in baseline_runs(params)}
    labels = sm.get("runs")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ParamError(f"{section}.runs={labels!r} must list labels of `baselines` (e.g. [fp16, int3])")
    missing = [x for x in labels if x not in by_label]
    if missing:
        raise ParamError(f"{section}.runs: {', '.join(missing)} not in baselines; known: {', '.join(by_label)}")
    if "fp16" not in labels:
        raise ParamError(f"{section}.runs must include fp16: FP16's accuracy is what calibrates the tasks")
    match = sm.get("match")
    if not isinstance(match, list) or not all(isinstance(x, str) for x in match):
        raise ParamError(f"{section}.match={match!r} must list labels of {section}.runs")
    outside = [x for x in match if x not in labels]
    if outside:
        raise ParamError(f"{section}.match: {', '.join(outside)} not in {section}.runs ({', '.join(labels)})")
    return {"section": section, "model": model, "seeds": [int(s) for s in seeds], "plan": plan,
            "runs": [by_label[x] for x in labels], "match": list(dict.fromkeys(match))}


def prepare(s: dict, tokenizer) -> pd.DataFrame:
    """The second model's needle prompts, one row per sample and seed (split `test`)."""
    from smartkv.study.grid import task_samples

    rows = [{**sample.to_row(), "seed": seed, "split": "test"}
            for seed in s["seeds"] for t in s["plan"] for sample in task_samples(t, tokenizer, seed)]
    return pd.DataFrame(rows)


def run_baselines(params: dict, s: dict, tasks_file, cell=None) -> pd.DataFrame:
    """FP16 and the `runs` baselines on the section's prompts (of one cell when given)."""
    from smartkv.study.driver import evaluate_runs

    sub = {**params, "model": s["model"]}
    return evaluate_runs(sub, s["runs"], tasks_file, split="test", desc=f"{s['model']} baselines", cell=cell)


def run_smartkv(params: dict, s: dict, tasks_file, base: pd.DataFrame, cell=None) -> pd.DataFrame:
    """SmartKV at each `match` baseline's bytes measured per (task, length) on `base`, the
    baselines' rows of every cell, on the section's prompts (of one cell when given)."""
    from smartkv.study.driver import evaluate_runs
    from smartkv.study.match import budgets, measure
    from smartkv.study.labels import matched_baseline
    from smartkv.study.runs import smartkv_runs

    sub = {**params, "model": s["model"]}
    matched = budgets(measure(base, s["match"]), "test")
    lost = [x for x in s["match"] if x not in matched]
    if lost:
        raise ParamError(f"{s['section']}.match: no measured bytes for {', '.join(lost)} (see the log)")
    # the matched runs alone (the headline and the Pareto sweep are the main study's)
    runs = [r for r in smartkv_runs(sub, matched) if matched_baseline(r.label)]
    if not runs:
        return base.iloc[:0]
    return evaluate_runs(sub, runs, tasks_file, split="test", desc=f"{s['model']} smartkv", cell=cell)


def tests(df: pd.DataFrame, match: list[str], *, seed: int = 0, alpha: float = 0.05,
          margin: float = 0.05, family: str = SECTIONS["second_model"]) -> pd.DataFrame:
    """smartkv@<b> against b on every paired measure, pooled and per cell (task x length); Holm per (family, measure)."""
    from smartkv.stats import apply_holm, measures_in, paired_tests
    from smartkv.study.labels import matched_label

    # every cell named as the accuracy table names it (`niah@4k`), even a task at one length
    strata = df[df["error"] == ""].copy()
    strata["task"] = [cell_name(t, n) for t, n in zip(strata["task"], strata["context_length"])]
    frames = []
    for measure in measures_in(strata):
        for b in match:
            target = matched_label(b)
            if target not in set(strata["run"]):
                continue
            t = paired_tests(strata, target, [b], measure=measure, per_task=True, seed=seed, alpha=alpha,
                             margin=margin if measure == "score" else None)
            t["family"] = [f"{family} [{measure}{'' if task == 'all' else ', per cell'}]" for task in t["task"]]
            frames.append(t)
    if not frames:
        return pd.DataFrame()
    return apply_holm(pd.concat(frames, ignore_index=True), alpha)


def cell_name(task: str, length: int) -> str:
    """A cell's label, as the per-length tests name it: `niah@4k`, `ruler_multikey@1k`, `niah@160`."""
    n = int(length)
    return f"{task}@{n // 1024}k" if n % 1024 == 0 else f"{task}@{n}"


def accuracy(df: pd.DataFrame) -> dict:
    """{run: {cell: {n, correct, accuracy, ci95, kv_ratio}}} over the rows that have a score;
    cells (`cell_name`) in task order, then by length."""
    from smartkv.plot_labels import wilson_interval

    out: dict = {}
    ok = df[(df["error"] == "") & df["score"].notna()]
    tasks = list(dict.fromkeys(ok["task"]))
    ok = ok.assign(_t=ok["task"].map(tasks.index)).sort_values(["_t", "context_length"], kind="stable")
    for (run, task, length), g in ok.groupby(["run", "task", "context_length"], sort=False):
        k, n = int((g["score"] == 1).sum()), int(len(g))
        lo, hi = wilson_interval(k, n)
        out.setdefault(str(run), {})[cell_name(str(task), int(length))] = {
            "n": n, "correct": k, "accuracy": k / n, "ci95": [float(lo), float(hi)],
            "kv_ratio": float(g["kv_ratio"].mean())}
    return out


def metrics(df: pd.DataFrame, t: pd.DataFrame, s: dict) -> dict:
    """metrics/<section>.json: the model, accuracy per run and cell, every comparison row."""
    keep = ["family", "target", "baseline", "task", "measure", "n_pairs", "target_mean", "baseline_mean",
            "mean_diff", "n_target_only", "n_baseline_only", "p", "p_holm", "ci_lo", "ci_hi", "verdict",
            "target_kv_ratio", "baseline_kv_ratio"]

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return v.item() if hasattr(v, "item") else v

    rows = [] if t.empty else [{k: clean(r[k]) for k in keep if k in r} for r in t.to_dict("records")]
    return {"model": s["model"], "seeds": s["seeds"], "accuracy": accuracy(df), "comparisons": rows}


def table(m: dict) -> str:
    """metrics/<section>_table.md: FP16 per cell, then each matched comparison (bold = Holm-significant)."""
    acc = m["accuracy"]
    names = list(dict.fromkeys(c for runs in acc.values() for c in runs))
    head = "| run | " + " | ".join(names) + " | KV x FP16 |"
    lines = [f"Model: `{m['model']}`, test seeds {m['seeds']}. Accuracy (correct / n) per task and prompt "
             "length (`niah@4k`: 4,096 prompt tokens).", "", head, "|" + " --- |" * (len(names) + 2)]
    for run, by in acc.items():
        cells = [f"{by[c]['correct']}/{by[c]['n']}" if c in by else "" for c in names]
        kv = sum(v["kv_ratio"] * v["n"] for v in by.values()) / sum(v["n"] for v in by.values())
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {kv:.3f} |")
    lines += ["", "| SmartKV | baseline | where | measure | t / b | discordant t / b | KV x FP16 t / b | Holm p | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in m["comparisons"]:
        disc = "" if r.get("n_target_only") is None else f"{int(r['n_target_only'])} / {int(r['n_baseline_only'])}"
        p = r.get("p_holm")
        ptxt = "" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")
        verdict = r.get("verdict", "")
        if verdict and verdict != "inconclusive":
            ptxt, verdict = f"**{ptxt}**", f"**{verdict}**"
        lines.append(f"| {r['target']} | {r['baseline']} | {r['task']} | {r['measure']} | "
                     f"{r['target_mean']:.3f} / {r['baseline_mean']:.3f} | {disc} | "
                     f"{r['target_kv_ratio']:.3f} / {r['baseline_kv_ratio']:.3f} | {ptxt} | {verdict} |")
    return "\n".join(lines) + "\n"


def n_prompts(s: dict) -> int:
    """Prompts per seed the plan generates (depths x n_per_cell per length), for the log."""
    return sum(len(t["depths"] or [None]) * n for t in s["plan"] for n in t["n_per_cell"])


__all__ = ["SECTIONS", "cell_name", "settings", "prepare", "run", "tests", "accuracy", "write", "metrics", "table", "n_prompts"]
