"""A self-contained matched comparison: one model, its own prompts, baselines, SmartKV at their bytes.

Part of the study layer (it drives `smartkv.study`), kept beside it rather than inside it so that
the main study's model stages, which depend on `smartkv/study` as a whole, do not depend on it.

A params section (`second_model`, `extra_cells`, `passages`; `SECTIONS`) names a model, test
seeds, a task grid, baseline runs and the baselines to match, and optionally dev seeds on which
FP16 must first reach `fp16_bar` in every (task, length) cell (`calibrate`: the test cells
depend on its record). On test seeds this runs what the main study's headline rests on:

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
comparisons only. `passages`: the main model on needles in real text (`niah_passage`), every
prompt its own passage, depth and key, so that every prompt is an independent sample (issue
33): the primary comparisons a skeptic counts. Each is its own stage so that the main study's
outputs do not depend on it, and `dvc exp run -S second_model.model=...` re-runs only that one.
"""

from __future__ import annotations

import math

import pandas as pd

from smartkv.study.params import ParamError, get, is_int
from smartkv.tasks.bible_corpus import DEV_SEED_MIN

# The params sections this module reads, with the family name of their tests.
SECTIONS = {"second_model": "second model: baselines vs matched SmartKV",
            "extra_cells": "extra cells: baselines vs matched SmartKV",
            "passages": "independent passages: baselines vs matched SmartKV"}
KEYS = ("model", "seeds", "tasks", "runs", "match", "dev_seeds", "fp16_bar", "budgets", "ablations")
FP16_BAR = 0.9  # a (task, length) cell measures a cache only where FP16 gets it right this often, on dev


def settings(params: dict, section: str = "second_model") -> dict:
    """The validated `section`: model, test seeds, task plan, baseline runs, match labels.

    `model: null` means the main study's `model` (`extra_cells` runs the main model)."""
    from smartkv.study.grid import task_plan
    from smartkv.study.params import seeds_by_split
    from smartkv.study.runs import ablation_runs, baseline_runs, known_labels

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
    dev = sm.get("dev_seeds") or []
    if not isinstance(dev, list) or not all(is_int(x) and x >= DEV_SEED_MIN for x in dev):
        raise ParamError(f"{section}.dev_seeds={dev!r} must list dev seeds (>= {DEV_SEED_MIN}), or be left out")
    bar = sm.get("fp16_bar", FP16_BAR)
    if isinstance(bar, bool) or not isinstance(bar, (int, float)) or not 0 <= bar <= 1:
        raise ParamError(f"{section}.fp16_bar={bar!r} must be a fraction in [0, 1]")
    budgets = sm.get("budgets") or []
    if not isinstance(budgets, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                and 0 < b <= 1 for b in budgets):
        raise ParamError(f"{section}.budgets={budgets!r} must list fractions in (0, 1] (SmartKV at fixed budgets), "
                         "or be left out")
    ablations = known_labels(f"{section}.ablations", sm.get("ablations") or [],
                             [r.label for r in ablation_runs(params)], "ablations", "labels of `ablations`, or be left out")
    return {"section": section, "model": model, "seeds": [int(s) for s in seeds], "plan": plan,
            "runs": [by_label[x] for x in labels], "match": list(dict.fromkeys(match)),
            "dev_seeds": [int(x) for x in dev], "fp16_bar": float(bar),
            "budgets": [float(b) for b in dict.fromkeys(budgets)], "ablations": ablations}


def prepare(s: dict, tokenizer, split: str = "test") -> pd.DataFrame:
    """The section's prompts, one row per sample and seed: of its test `seeds`, or of its
    `dev_seeds` (split `dev`, the calibration's)."""
    from smartkv.study.grid import task_samples

    seeds = s["seeds"] if split == "test" else s["dev_seeds"]
    rows = [{**sample.to_row(), "seed": seed, "split": split}
            for seed in seeds for t in s["plan"] for sample in task_samples(t, tokenizer, seed)]
    return pd.DataFrame(rows)


def calibrate(params: dict, s: dict, dev_tasks_file) -> tuple[pd.DataFrame, dict]:
    """FP16 on the section's dev prompts, before any test cell runs: (rows, a summary per cell).

    The summary holds FP16's accuracy per (task, length) (`score`, the study's teacher-forced
    exact match), its n in prompts and in passages (clusters), and whether it reaches `fp16_bar`.
    A cell under the bar fails the calibration (`failed`): its test prompts would measure the
    model, not the cache. Change the task's format or drop the cell, and say so."""
    from smartkv.study.driver import evaluate_runs

    fp16 = [r for r in s["runs"] if r.label == "fp16"]
    sub = {**params, "model": s["model"]}
    df = evaluate_runs(sub, fp16, dev_tasks_file, split="dev", desc=f"{s['model']} FP16 on dev")
    cells = {}
    for (task, length), g in df.groupby(["task", "context_length"], sort=True):
        acc = float(g["score"].mean())
        cells[f"{task}-{int(length)}"] = {
            "n": int(len(g)), "passages": int(g["cluster"].nunique()) if "cluster" in g else int(len(g)),
            "fp16": round(acc, 4), "found": int(g["score"].sum()), "passed": bool(acc >= s["fp16_bar"])}
    summary = {"model": s["model"], "dev_seeds": s["dev_seeds"], "bar": s["fp16_bar"], "cells": cells,
               "failed": sorted(c for c, v in cells.items() if not v["passed"])}
    return df, summary


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
    from smartkv.study.labels import HEADLINE, budget_label, matched_baseline
    from smartkv.study.runs import ablation_runs, headline_budget, smartkv_runs

    sub = {**params, "model": s["model"], "budgets": s["budgets"]}
    matched = budgets(measure(base, s["match"]), "test")
    lost = [x for x in s["match"] if x not in matched]
    if lost:
        raise ParamError(f"{s['section']}.match: no measured bytes for {', '.join(lost)} (see the log)")
    # the matched runs, SmartKV at the section's own `budgets`, and with `ablations` the headline
    # run they are each compared with (the main study's Pareto sweep is not the section's)
    head = headline_budget(sub)
    fixed = ({budget_label(b) for b in s["budgets"]}
             | ({HEADLINE} if s["ablations"] or any(math.isclose(b, head) for b in s["budgets"]) else set()))
    runs = [r for r in smartkv_runs(sub, matched) if matched_baseline(r.label) or r.label in fixed]
    runs += [r for r in ablation_runs(sub) if r.label in s["ablations"]]
    if not runs:
        return base.iloc[:0]
    return evaluate_runs(sub, runs, tasks_file, split="test", desc=f"{s['model']} smartkv", cell=cell)


def n_prompts(s: dict) -> int:
    """Prompts per seed the plan generates (depths x n_per_cell per length), for the log."""
    return sum(len(t["depths"] or [None]) * n for t in s["plan"] for n in t["n_per_cell"])


__all__ = ["SECTIONS", "cell_name", "settings", "prepare", "run", "tests", "accuracy", "write", "metrics", "table", "n_prompts"]
