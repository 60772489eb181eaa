"""Shared plumbing of the DVC stages: params, validation, task sets, evaluation, outputs.

Every stage is `python -m stages.<name>` from the repository root. A stage reads
`params.yaml`, validates everything it will use before any model work, and on a bad value
stops with one line naming the key (`error: params.yaml: <key>: <why>`) and exit status 2.
Outputs go through `smartkv.io`'s atomic writers, so a failed stage leaves no half file.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"
DATA = Path("data")
METRICS = Path("metrics")
PLOTS = Path("plots")
TASKS_FILE = DATA / "tasks.parquet"
RESULTS = {"baselines": DATA / "baselines.parquet", "smartkv": DATA / "smartkv.parquet",
           "ablations": DATA / "ablations.parquet"}
HEADLINE = "smartkv"  # label of the headline SmartKV run (budget = params `budget`)
# Decay of the shared prefill's importance tracker in the baselines stage: no baseline reads
# it (only SmartKV caches track attention), so it is a constant, not a param dependency.
BASELINE_DECAY = 0.9

log = logging.getLogger("stages")


class ParamError(ValueError):
    """A bad value in params.yaml; the message starts with the key."""


# ---------------------------------------------------------------------------------------------
# Entry point, logging, params


def stage_main(fn: Callable[[dict], None]) -> Callable[[], None]:
    """Wrap a stage's `main(params)`: logging, params loading, one-line errors with exit 2."""

    @functools.wraps(fn)
    def run() -> None:
        logging.basicConfig(level=os.environ.get("SMARTKV_LOG", "INFO"),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
        from smartkv.methods.registry import ConfigError

        import time

        name = Path(sys.argv[0]).stem if fn.__module__ == "__main__" else fn.__module__.rsplit(".", 1)[-1]
        start = time.perf_counter()
        try:
            params = load_params()
            fn(params)
            log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
        except (ParamError, ConfigError) as err:
            print(f"error: {PARAMS_FILE}: {err}", file=sys.stderr)
            sys.exit(2)

    return run


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path} not found (run from the repository root)")
    with path.open(encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ParamError("top level must be a mapping of keys to values")
    return params


def get(params: dict, key: str, default: Any = ...) -> Any:
    """`params[a][b]` for key "a.b"; missing keys are an error unless a default is given."""
    cur: Any = params
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if default is ...:
                raise ParamError(f"{key}: missing")
            return default
        cur = cur[part]
    return cur


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_budget(key: str, value: Any) -> float:
    if not _is_num(value) or not 0.0 < float(value) <= 1.0:
        raise ParamError(f"{key}={value!r} must be a fraction of FP16 memory in (0, 1]")
    return float(value)


def check_seeds(params: dict) -> list[int]:
    seeds = get(params, "seeds")
    if not isinstance(seeds, list) or not seeds:
        raise ParamError(f"seeds={seeds!r} must be a non-empty list of integers")
    if not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ParamError(f"seeds={seeds!r} must be distinct integers")
    return seeds


def check_decay(params: dict) -> float:
    decay = get(params, "decay")
    if not _is_num(decay) or not 0.0 < decay < 1.0:
        raise ParamError(f"decay={decay!r} must lie in (0, 1)")
    return float(decay)


def check_realloc_freq(params: dict) -> int:
    freq = get(params, "realloc_freq")
    if not _is_int(freq) or freq < 0:
        raise ParamError(f"realloc_freq={freq!r} must be an integer >= 0 (0 = fixed after prefill)")
    return freq


def check_max_new_tokens(key: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ParamError(f"{key}={value!r} must be a positive integer")
    return value


# ---------------------------------------------------------------------------------------------
# Task grid


def task_plan(params: dict) -> list[dict]:
    """Validated task entries: name, lengths, depths, n_per_cell, max_new_tokens, kwargs."""
    from smartkv.tasks.registry import TASKS, task_names

    known = task_names()
    tasks = get(params, "tasks")
    if not isinstance(tasks, dict):
        raise ParamError(f"tasks must map task names to their grid, got {type(tasks).__name__}")
    default_new = check_max_new_tokens("max_new_tokens", get(params, "max_new_tokens"))
    plan = []
    for name, spec in tasks.items():
        key = f"tasks.{name}"
        if name not in known or name == "longbench":
            raise ParamError(f"{key}: unknown task {name!r}; known: "
                             f"{', '.join(t for t in known if t != 'longbench')} (LongBench: key `longbench`)")
        spec = spec or {}
        unknown = sorted(set(spec) - {"lengths", "depths", "n_per_cell", "max_new_tokens", "kwargs"})
        if unknown:
            raise ParamError(f"{key}: unknown key(s) {', '.join(unknown)}; "
                             "allowed: lengths, depths, n_per_cell, max_new_tokens, kwargs")
        lengths = spec.get("lengths")
        if not isinstance(lengths, list) or not lengths or not all(_is_int(n) and n > 0 for n in lengths):
            raise ParamError(f"{key}.lengths={lengths!r} must be a non-empty list of positive token counts")
        depths = spec.get("depths", [])
        if TASKS[name].uses_depth:
            if not isinstance(depths, list) or not depths or not all(_is_num(d) and 0 <= d <= 1 for d in depths):
                raise ParamError(f"{key}.depths={depths!r} must be a non-empty list of fractions in [0, 1]")
        n = spec.get("n_per_cell", 1)
        if not _is_int(n) or n < 1:
            raise ParamError(f"{key}.n_per_cell={n!r} must be a positive integer")
        new = check_max_new_tokens(f"{key}.max_new_tokens", spec.get("max_new_tokens", default_new))
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ParamError(f"{key}.kwargs must be a mapping")
        plan.append({"name": name, "lengths": lengths, "depths": list(depths or []), "n_per_cell": n,
                     "max_new_tokens": new, "kwargs": kwargs})
    lb = longbench_plan(params)
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
    if not lengths or not all(_is_int(n) and n > 0 for n in lengths):
        raise ParamError(f"longbench.max_context_tokens={lengths!r} must be positive token counts")
    n = lb.get("n_per_task", 1)
    if not _is_int(n) or n < 1:
        raise ParamError(f"longbench.n_per_task={n!r} must be a positive integer")
    return {"source": source, "tasks": names, "lengths": lengths, "n_per_task": n}


# ---------------------------------------------------------------------------------------------
# Runs


def _run(key: str, label: Any, method: Any, run_params: Any, family: str, oracle: bool = False):
    from smartkv.methods.registry import ConfigError, method_names
    from smartkv.runner import RunSpec

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


def _unique(runs: list, key: str) -> list:
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ParamError(f"{key}: duplicate label(s) {', '.join(dup)}")
    return runs


def baseline_runs(params: dict) -> list:
    entries = get(params, "baselines")
    if not isinstance(entries, list) or not entries:
        raise ParamError("baselines must list at least one run (label, method, params)")
    runs = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ParamError(f"baselines[{i}] must be a mapping with label, method, params")
        family = e.get("family", "peer" if str(e.get("method", "")).startswith("hf_") else "baseline")
        runs.append(_run(f"baselines[{i}]", e.get("label"), e.get("method"), e.get("params") or {}, family))
    return _unique(runs, "baselines")


def smartkv_base(params: dict) -> dict:
    """SmartKV params shared by the headline, the sweep and the ablations."""
    base = dict(get(params, "smartkv"))
    for k in ("budget", "decay", "realloc_freq"):
        if k in base:
            raise ParamError(f"smartkv.{k}: set the top-level `{k}` instead (so `dvc exp run -S {k}=...` works)")
    base["decay"] = check_decay(params)
    base["realloc_freq"] = check_realloc_freq(params)
    return base


def budget_label(b: float) -> str:
    return f"smartkv-b{b:.2f}"


def smartkv_runs(params: dict) -> list:
    """The headline run (label `smartkv`) then the Pareto sweep over `budgets`."""
    base = smartkv_base(params)
    budget = check_budget("budget", get(params, "budget"))
    budgets = get(params, "budgets")
    if not isinstance(budgets, list) or not budgets:
        raise ParamError(f"budgets={budgets!r} must be a non-empty list of fractions in (0, 1]")
    sweep = [check_budget(f"budgets[{i}]", b) for i, b in enumerate(budgets)]
    runs = [_run("budget", HEADLINE, "smartkv", {**base, "budget": budget}, "smartkv")]
    for i, b in enumerate(dict.fromkeys(sweep)):
        if not math.isclose(b, budget):  # the headline already covers its own budget
            runs.append(_run(f"budgets[{i}]", budget_label(b), "smartkv", {**base, "budget": b}, "smartkv"))
    return _unique(runs, "budgets")


def ablation_runs(params: dict) -> list:
    """Each ablation is the headline config with some params overridden (or `oracle: true`)."""
    base = {**smartkv_base(params), "budget": check_budget("budget", get(params, "budget"))}
    entries = get(params, "ablations")
    if not isinstance(entries, list) or not entries:
        raise ParamError("ablations must list at least one variant (label, params and/or oracle)")
    runs = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ParamError(f"ablations[{i}] must be a mapping with label, params, oracle")
        unknown = sorted(set(e) - {"label", "params", "oracle"})
        if unknown:
            raise ParamError(f"ablations[{i}]: unknown key(s) {', '.join(unknown)}; allowed: label, params, oracle")
        over = e.get("params") or {}
        if not isinstance(over, dict):
            raise ParamError(f"ablations[{i}].params must be a mapping")
        if e.get("label") == HEADLINE:
            raise ParamError(f"ablations[{i}].label: {HEADLINE!r} is the headline run's label")
        runs.append(_run(f"ablations[{i}]", e.get("label"), "smartkv", {**base, **over}, "ablation",
                         bool(e.get("oracle", False))))
    return _unique(runs, "ablations")


def model_settings(params: dict) -> tuple[str, str]:
    from smartkv.models import resolve_dtype

    model, dtype = get(params, "model"), get(params, "dtype")
    if not isinstance(model, str) or not model:
        raise ParamError(f"model={model!r} must be `default` or a Hugging Face id / local path")
    try:
        resolve_dtype(dtype)
    except (ValueError, KeyError, TypeError) as err:
        raise ParamError(f"dtype={dtype!r}: {err}") from None
    return model, dtype


def device_setting(params: dict) -> str:
    """`device` (default cpu); a GPU that is not there is an error before any work."""
    import torch

    device = get(params, "device", "cpu")
    if not isinstance(device, str) or not device.split(":")[0] in ("cpu", "cuda", "mps"):
        raise ParamError(f"device={device!r} must be cpu, cuda, cuda:<n> or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(f"device={device!r}: no CUDA GPU is visible to torch")
    return device


# ---------------------------------------------------------------------------------------------
# Data


def read_tasks(path: Path = TASKS_FILE) -> dict[int, list]:
    """Prepared samples per seed."""
    from smartkv.io import read_parquet_with_meta
    from smartkv.tasks.sample import Sample

    df, _ = read_parquet_with_meta(path)
    out: dict[int, list] = {}
    for row in df.to_dict("records"):
        out.setdefault(int(row["seed"]), []).append(Sample.from_row(row))
    return out


def with_seed(run, seed: int):
    """SmartKV runs take the data seed (random allocation draws from it); others unchanged."""
    from smartkv.runner import RunSpec

    if run.method != "smartkv":
        return run
    return RunSpec(run.label, run.method, {**run.params, "seed": int(seed)}, run.family, run.oracle)


def evaluate_runs(params: dict, runs: list, out: Path, stage: str, config: dict) -> None:
    """Every run on every prepared sample, seed by seed; one prefill per sample shared by the runs."""
    import pandas as pd
    import torch

    from smartkv.evaluate import evaluate
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.models import load_model

    model_name, dtype = model_settings(params)
    device = device_setting(params)
    if not TASKS_FILE.is_file():
        raise ParamError(f"{TASKS_FILE} not found: run the prepare stage first (`dvc repro prepare`)")
    tasks = read_tasks()
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    frames = []
    for seed, samples in sorted(tasks.items()):
        seeded = [with_seed(r, seed) for r in runs]
        # Runs that track attention must share the prefill's decay: one evaluate per decay.
        by_decay: dict[float, list] = {}
        for r in seeded:
            by_decay.setdefault(float(getattr(r.config(), "decay", BASELINE_DECAY)), []).append(r)
        for decay, group in by_decay.items():
            frames.append(evaluate(model, tokenizer, samples, group, seed=seed, decay=decay,
                                   desc=f"{stage} seed {seed}"))
    df = pd.concat(frames, ignore_index=True)
    order = {r.label: i for i, r in enumerate(runs)}
    df = df.sort_values(["seed", "task", "sample_id", "run"], key=lambda s: s.map(order) if s.name == "run" else s,
                        kind="stable").reset_index(drop=True)
    atomic_write_parquet(df, out, provenance(config))
    errors = df[df["error"] != ""]
    if len(errors):
        log.warning("%d of %d rows below their budget's floor (score NaN): %s", len(errors), len(df),
                    ", ".join(sorted(set(errors["run"]))))
    log.info("wrote %s: %d rows (%d runs x %d samples)", out, len(df), len(runs), len(df) // max(1, len(runs)))


def read_results(*names: str):
    import pandas as pd

    from smartkv.io import read_parquet_with_meta

    return pd.concat([read_parquet_with_meta(RESULTS[n])[0] for n in names], ignore_index=True)


def section(params: dict, key: str) -> dict:
    value = get(params, key, {}) or {}
    if not isinstance(value, dict):
        raise ParamError(f"{key} must be a mapping")
    return value
