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

The tests, metrics and tables of step 4 live in `smartkv/matched_tests.py`, so that the
cells of steps 2 and 3 (model work) do not depend on the statistics code.

Two stages use it. `second_model`: Gemma-3-270M, a second model family (one KV head of 256
dimensions, 18 layers of which 5 in 6 attend over a 512-token sliding window), where the main
study's SmolLM2-135M has 3 KV heads of 64 dimensions on 30 full-attention layers. `extra_cells`:
the main model on the cells the main grid cannot afford on 2 CPU cores with every baseline,
SmartKV run, ablation and peer (4k-token needles, RULER multikey), with the headline
comparisons only. Each is its own stage so that the main study's outputs do not depend on it,
and `dvc exp run -S second_model.model=...` re-runs only that one.
"""

from __future__ import annotations

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


def n_prompts(s: dict) -> int:
    """Prompts per seed the plan generates (depths x n_per_cell per length), for the log."""
    return sum(len(t["depths"] or [None]) * n for t in s["plan"] for n in t["n_per_cell"])


__all__ = ["SECTIONS", "cell_name", "settings", "prepare", "run", "tests", "accuracy", "write", "metrics", "table", "n_prompts"]
