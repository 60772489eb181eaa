"""`params.yaml`: loading, look-up by dotted key, and the study-level keys.

Each value has one check. Method params (`budget`, `decay`, `realloc_freq`, bit widths...)
are checked by the method's config dataclass or the helpers it uses
(`smartkv.methods.common`); this module only adds the key's name. Keys that belong to the
study alone (seeds and their split, model, device) are checked here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from smartkv.errors import ConfigError

PARAMS_FILE = "params.yaml"
SPLITS = ("dev", "test")


class ParamError(ConfigError):
    """A bad value in params.yaml; the message starts with the key."""


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path} not found (run from the repository root)")
    try:
        with path.open(encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:  # one line: where the YAML breaks, not a traceback
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ParamError(f"not valid YAML: {where}{getattr(err, 'problem', None) or err}") from None
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


def section(params: dict, key: str) -> dict:
    value = get(params, key, {}) or {}
    if not isinstance(value, dict):
        raise ParamError(f"{key} must be a mapping")
    return value


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_positive_int(key: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ParamError(f"{key}={value!r} must be a positive integer")
    return value


def seeds_by_split(params: dict) -> dict[str, list[int]]:
    """`seeds: {dev: [...], test: [...]}`: dev seeds for choosing (sweeps, tuning), test seeds
    for reporting. Both non-empty, distinct integers, no seed in both."""
    seeds = get(params, "seeds")
    if not isinstance(seeds, dict) or set(seeds) != set(SPLITS):
        raise ParamError(f"seeds={seeds!r} must map dev and test to lists of seeds, "
                         "e.g. {dev: [100], test: [0, 1, 2]}")
    for split in SPLITS:
        s = seeds[split]
        if not isinstance(s, list) or not s or not all(is_int(x) for x in s) or len(set(s)) != len(s):
            raise ParamError(f"seeds.{split}={s!r} must be a non-empty list of distinct integers")
    both = sorted(set(seeds["dev"]) & set(seeds["test"]))
    if both:
        raise ParamError(f"seeds: {both} are both dev and test seeds; a seed chooses or reports, never both")
    return {split: list(seeds[split]) for split in SPLITS}


def study_split(params: dict) -> str:
    """`split`: the seeds SmartKV and the ablations run on and the statistics report: `test` for
    the study, `dev` for sweeps and tuning."""
    split = get(params, "split")
    if split not in SPLITS:
        raise ParamError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    return split


def seed_subset(params: dict, key: str) -> list[int] | None:
    """`key`: a subset of the `split` seeds a stage runs on, to bound its cost (null: all of them)."""
    value = get(params, key, None)
    if value is None:
        return None
    split = study_split(params)
    allowed = seeds_by_split(params)[split]
    if not isinstance(value, list) or not value or not all(is_int(x) for x in value):
        raise ParamError(f"{key}={value!r} must be null or a non-empty list of {split} seeds {allowed}")
    outside = [x for x in value if x not in allowed]
    if outside:
        raise ParamError(f"{key}={value!r}: {outside} not among the {split} seeds {allowed}")
    return list(value)


def stats_settings(params: dict) -> dict:
    """The `stats` section, validated, with its defaults (every stage that tests reads it here)."""
    s = section(params, "stats")
    tol = s.get("memory_tolerance", 0.02)
    if not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ParamError(f"stats.memory_tolerance={tol!r} must lie in [0, 1)")
    seed = s.get("bootstrap_seed", 0)
    if not isinstance(seed, int):
        raise ParamError(f"stats.bootstrap_seed={seed!r} must be an integer")
    out = {"memory_tolerance": float(tol), "bootstrap_seed": seed}
    for key, default, lo, hi in (("alpha", 0.05, 0, 0.5), ("noninferiority_margin", 0.05, 0, 1),
                                 ("power_effect", 0.10, 0, 1), ("power_target", 0.8, 0, 1)):
        v = s.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi:
            raise ParamError(f"stats.{key}={v!r} must lie in ({lo}, {hi})")
        out[key] = float(v)
    return out


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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_setting(params: dict) -> str | dict | None:
    """`device_map` (default null): accelerate's placement of a model too large for one device,
    a strategy name or {module name: device}; it overrides `device` for the model's weights."""
    value = get(params, "device_map", None)
    if value is None:
        return None
    if isinstance(value, str) and value in DEVICE_MAP_STRATEGIES:
        return value
    if isinstance(value, dict) and value and all(isinstance(k, str) and (is_int(v) or (
            isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda", "mps", "disk"))) for k, v in value.items()):
        return value
    raise ParamError(f"device_map={value!r} must be null, one of {', '.join(DEVICE_MAP_STRATEGIES)}, or a mapping "
                     "of module names to devices (cpu, cuda:<n>, <n>, mps, disk)")


def placement(params: dict) -> dict:
    """`load_model`'s placement kwargs from the `device` and `device_map` params."""
    return {"device": device_setting(params), "device_map": device_map_setting(params)}


def device_setting(params: dict) -> str:
    """`device` (default cpu); a GPU that is not there is an error before any work."""
    import torch

    device = get(params, "device", "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ParamError(f"device={device!r} must be cpu, cuda, cuda:<n> or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(f"device={device!r}: no CUDA GPU is visible to torch")
    return device
