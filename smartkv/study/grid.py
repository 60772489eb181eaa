"""The task grid of the study: `tasks` (generated from seeds) and `longbench` (real data)."""

from __future__ import annotations

from pathlib import Path

from smartkv.study.params import ParamError, check_positive_int, get, is_int, is_num

TASK_KEYS = ("lengths", "depths", "n_per_cell", "max_new_tokens", "kwargs")


def _n_per_length(key: str, value, lengths: list[int]) -> list[int]:
    if isinstance(value, list):
        if len(value) != len(lengths):
            raise ParamError(f"{key}.n_per_cell={value!r}: a list needs one count per length ({len(lengths)}), "
                             f"or give one int for all")
        return [check_positive_int(f"{key}.n_per_cell[{i}]", v) for i, v in enumerate(value)]
    return [check_positive_int(f"{key}.n_per_cell", value)] * len(lengths)


def task_plan(params: dict) -> list[dict]:
    """Validated task entries: name, lengths, depths, n_per_cell, max_new_tokens, kwargs.

    `n_per_cell` comes back as a list with one count per length: params may give one int for
    every length or a list aligned with `lengths`, because a long prompt costs several short
    ones and a study sized for power at 1k cannot afford the same count at 4k.
    """
    from smartkv.tasks.registry import TASKS, task_names

    known = task_names()
    tasks = get(params, "tasks")
    if not isinstance(tasks, dict):
        raise ParamError(f"tasks must map task names to their grid, got {type(tasks).__name__}")
    default_new = check_positive_int("max_new_tokens", get(params, "max_new_tokens"))
    plan = []
    for name, spec in tasks.items():
        key = f"tasks.{name}"
        if name not in known or name == "longbench":
            raise ParamError(f"{key}: unknown task {name!r}; known: "
                             f"{', '.join(t for t in known if t != 'longbench')} (LongBench: key `longbench`)")
        spec = spec or {}
        unknown = sorted(set(spec) - set(TASK_KEYS))
        if unknown:
            raise ParamError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TASK_KEYS)}")
        lengths = spec.get("lengths")
        if not isinstance(lengths, list) or not lengths or not all(is_int(n) and n > 0 for n in lengths):
            raise ParamError(f"{key}.lengths={lengths!r} must be a non-empty list of positive token counts")
        depths = spec.get("depths", [])
        if TASKS[name].uses_depth:
            if not isinstance(depths, list) or not depths or not all(is_num(d) and 0 <= d <= 1 for d in depths):
                raise ParamError(f"{key}.depths={depths!r} must be a non-empty list of fractions in [0, 1]")
        n = _n_per_length(key, spec.get("n_per_cell", 1), lengths)
        new = check_positive_int(f"{key}.max_new_tokens", spec.get("max_new_tokens", default_new))
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ParamError(f"{key}.kwargs must be a mapping")
        plan.append({"name": name, "lengths": lengths, "depths": list(depths or []), "n_per_cell": n,
                     "max_new_tokens": new, "kwargs": kwargs})
    lb = longbench_plan(params)  # checked here too, so one call validates the whole grid
    if not plan and lb is None:
        raise ParamError("tasks is empty and longbench.enabled is false: the grid has no samples")
    return plan


def longbench_plan(params: dict) -> dict | None:
    """LongBench settings when enabled; the folder and its task files must exist (checked here)."""
    from smartkv.tasks.longbench import PROMPTS

    lb = get(params, "longbench", {}) or {}
    if not lb.get("enabled", False):
        return None
    source = lb.get("source")
    names = lb.get("tasks") or []
    if not isinstance(names, list) or not names:
        raise ParamError("longbench.tasks must list at least one LongBench dataset")
    bad = [t for t in names if t not in PROMPTS]
    if bad:
        raise ParamError(f"longbench.tasks: unknown dataset(s) {bad}; known: {', '.join(sorted(PROMPTS))}")
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise ParamError(f"longbench.source={source!r}: folder not found (it must hold <task>.jsonl "
                             "files in LongBench's schema; or set source: null to load from the hub)")
        missing = [t for t in names if not (folder / f"{t}.jsonl").is_file()]
        if missing:
            raise ParamError(f"longbench.source={source!r}: missing {', '.join(f'{t}.jsonl' for t in missing)}")
    lengths = lb.get("max_context_tokens", [2048])
    lengths = lengths if isinstance(lengths, list) else [lengths]
    if not lengths or not all(is_int(n) and n > 0 for n in lengths):
        raise ParamError(f"longbench.max_context_tokens={lengths!r} must be positive token counts")
    n = check_positive_int("longbench.n_per_task", lb.get("n_per_task", 1))
    return {"source": source, "tasks": names, "lengths": lengths, "n_per_task": n}


def task_samples(t: dict, tokenizer, seed: int) -> list:
    """The samples of one `task_plan` entry for one seed: each length with its own count per cell,
    each sample told its task's `max_new_tokens` (unless the task set its own)."""
    from smartkv.tasks import generate_task

    samples = [s for length, n in zip(t["lengths"], t["n_per_cell"])
               for s in generate_task(t["name"], tokenizer, n_per_cell=n, lengths=[length],
                                      depths=t["depths"], seed=seed, **t["kwargs"])]
    for s in samples:
        s.meta.setdefault("max_new_tokens", t["max_new_tokens"])
    return samples
