"""The runs of the study as `RunSpec`s, built from params.

- baselines: `baselines` entries (label, method, params);
- SmartKV: the headline run at `budget` (label `smartkv`), one run at each matched
  baseline's measured memory (`smartkv@<baseline>`, budgets from the `match` stage), and
  the Pareto sweep over `budgets` (`smartkv-b0.30`);
- ablations: the headline config with `params` overridden, or `oracle: true`.

Every run's method params are validated by building its config once, here; an error names
the params key it came from.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from smartkv.methods.common import check_budget, check_decay, check_int
from smartkv.methods.registry import ConfigError, method_names
from smartkv.runner import RunSpec
from smartkv.study.labels import HEADLINE, MATCH_SEP, budget_label, matched_label
from smartkv.study.params import ParamError, get


def _checked(check, *args) -> None:
    """A method-level check (smartkv.methods.common) on a top-level params value."""
    try:
        check("", *args)
    except ConfigError as err:
        raise ParamError(str(err)) from None


def run_spec(key: str, label: Any, method: Any, run_params: Any, family: str, oracle: bool = False) -> RunSpec:
    if not isinstance(label, str) or not label:
        raise ParamError(f"{key}.label={label!r} must be a non-empty string")
    if method not in method_names():
        raise ParamError(f"{key}.method={method!r}: unknown method; known: {', '.join(method_names())}")
    if not isinstance(run_params, dict):
        raise ParamError(f"{key}.params must be a mapping, got {run_params!r}")
    run_params = {k: tuple(v) if isinstance(v, list) else v for k, v in run_params.items()}
    spec = RunSpec(label, method, run_params, family, oracle)
    try:
        spec.config()
    except (ConfigError, TypeError, ValueError) as err:
        raise ParamError(f"{key} ({label}): {err}") from None
    return spec


def _own_label(key: str, label: Any) -> None:
    if isinstance(label, str) and MATCH_SEP in label:
        raise ParamError(f"{key}.label={label!r}: {MATCH_SEP!r} is kept for matched runs (smartkv@<baseline>)")


def _unique(runs: list[RunSpec], key: str) -> list[RunSpec]:
    labels = [r.label for r in runs if r.context_length is None]
    labels += list(dict.fromkeys(r.label for r in runs if r.context_length is not None))
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ParamError(f"{key}: duplicate label(s) {', '.join(dup)}")
    return runs


def _entries(params: dict, key: str, one: str, fields: str) -> list[dict]:
    """`params[key]`: a non-empty list of mappings (each with `fields`), or a ParamError naming the key."""
    entries = get(params, key)
    if not isinstance(entries, list) or not entries:
        raise ParamError(f"{key} must list at least one {one} ({fields})")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ParamError(f"{key}[{i}] must be a mapping with {fields}")
    return entries


def baseline_runs(params: dict) -> list[RunSpec]:
    runs = []
    for i, e in enumerate(_entries(params, "baselines", "run", "label, method, params")):
        _own_label(f"baselines[{i}]", e.get("label"))
        family = e.get("family", "peer" if str(e.get("method", "")).startswith("hf_") else "baseline")
        runs.append(run_spec(f"baselines[{i}]", e.get("label"), e.get("method"), e.get("params") or {}, family))
    return _unique(runs, "baselines")


def known_labels(key: str, labels: Any, known: list[str], where: str, what: str) -> list[str]:
    """`labels` (params key `key`) checked as a list of labels of `where` (`known`), without repeats;
    `what` says what the list must hold when it is not a list of strings."""
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ParamError(f"{key}={labels!r} must list {what}")
    unknown = [x for x in labels if x not in known]
    if unknown:
        raise ParamError(f"{key}: {', '.join(unknown)} not in {where}; known: {', '.join(known)}")
    return list(dict.fromkeys(labels))


def match_labels(params: dict) -> list[str]:
    """`match`: the baselines that get a SmartKV run at exactly their measured memory."""
    return known_labels("match", get(params, "match", []), [r.label for r in baseline_runs(params)], "baselines",
                        "baseline labels (e.g. [int3, kivi-2])")


def smartkv_base(params: dict) -> dict:
    """SmartKV params shared by the headline, the matched runs, the sweep and the ablations."""
    base = dict(get(params, "smartkv"))
    for k in ("budget", "decay", "realloc_freq"):
        if k in base:
            raise ParamError(f"smartkv.{k}: set the top-level `{k}` instead (so `dvc exp run -S {k}=...` works)")
    base["decay"], base["realloc_freq"] = get(params, "decay"), get(params, "realloc_freq")
    _checked(check_decay, base["decay"])
    _checked(check_int, "realloc_freq", base["realloc_freq"], 0)
    return base


def headline_budget(params: dict) -> float:
    budget = get(params, "budget")
    _checked(check_budget, budget)
    return float(budget)


def headline_run(params: dict) -> RunSpec:
    return run_spec("smartkv", HEADLINE, "smartkv", {**smartkv_base(params), "budget": headline_budget(params)},
                    "smartkv")


def sweep_budgets(params: dict) -> list[float]:
    budgets = get(params, "budgets")
    if not isinstance(budgets, list):
        raise ParamError(f"budgets={budgets!r} must be a list of fractions in (0, 1] (may be empty)")
    for i, b in enumerate(budgets):
        _checked(check_budget, b, f"budgets[{i}]")
    return [float(b) for b in budgets]


def smartkv_runs(params: dict, matched: dict[str, float] | None = None) -> list[RunSpec]:
    """The headline run, then one run per matched baseline (`matched`: label -> measured
    kv_ratio, or {(task, prompt length): kv_ratio} when the task set has several cells, from
    the match stage: then one spec per cell under the one label), then the Pareto sweep."""
    base = smartkv_base(params)
    head = headline_run(params)
    runs = [head]
    for baseline, ratio in (matched or {}).items():
        where = f"metrics/matched_budgets.json ({baseline})"
        if isinstance(ratio, dict):
            for (task, length), r in sorted(ratio.items()):
                spec = run_spec(where, matched_label(baseline), "smartkv", {**base, "budget": r}, "smartkv")
                runs.append(dataclasses.replace(spec, task=task, context_length=int(length)))
        else:
            runs.append(run_spec(where, matched_label(baseline), "smartkv", {**base, "budget": ratio}, "smartkv"))
    for i, b in enumerate(dict.fromkeys(sweep_budgets(params))):
        if not math.isclose(b, head.params["budget"]):  # the headline already covers its own budget
            runs.append(run_spec(f"budgets[{i}]", budget_label(b), "smartkv", {**base, "budget": b}, "smartkv"))
    return _unique(runs, "budgets")


def ablation_runs(params: dict) -> list[RunSpec]:
    """Each ablation is the headline config with some params overridden (or `oracle: true`)."""
    base = dict(headline_run(params).params)
    runs = []
    for i, e in enumerate(_entries(params, "ablations", "variant", "label, params and/or oracle")):
        unknown = sorted(set(e) - {"label", "params", "oracle"})
        if unknown:
            raise ParamError(f"ablations[{i}]: unknown key(s) {', '.join(unknown)}; allowed: label, params, oracle")
        over = e.get("params") or {}
        if not isinstance(over, dict):
            raise ParamError(f"ablations[{i}].params must be a mapping")
        if e.get("label") == HEADLINE:
            raise ParamError(f"ablations[{i}].label: {HEADLINE!r} is the headline run's label")
        _own_label(f"ablations[{i}]", e.get("label"))
        runs.append(run_spec(f"ablations[{i}]", e.get("label"), "smartkv", {**base, **over}, "ablation",
                             bool(e.get("oracle", False))))
    return _unique(runs, "ablations")


def with_seed(run: RunSpec, seed: int) -> RunSpec:
    """SmartKV runs take the data seed (random allocation draws from it); others unchanged."""
    if run.method != "smartkv":
        return run
    return dataclasses.replace(run, params={**run.params, "seed": int(seed)})
