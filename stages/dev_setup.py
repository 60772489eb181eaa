"""What the dev-seed analysis stages (`attention`, `sensitivity`) share: checks of their
params section, the rule that they run on dev seeds only, and loading the study's model."""

from __future__ import annotations

from smartkv.study.params import ParamError, get, model_settings, placement, seeds_by_split


def analysis_section(params: dict, name: str) -> dict:
    value = get(params, name)
    if not isinstance(value, dict):
        raise ParamError(f"{name} must be a mapping")
    return value


def int_param(key: str, v, lo: int, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise ParamError(f"{key}={v!r} must be an integer " + (f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"))
    return v


def int_list_param(key: str, v, lo: int = 0) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v):
        raise ParamError(f"{key}={v!r} must be a non-empty list of integers >= {lo}")
    return v


def check_dev_seeds(params: dict, key: str, seeds: list[int]) -> None:
    """The analysis may choose and look at anything on dev seeds; a test seed would leak into the study."""
    shared = sorted(set(seeds_by_split(params)["test"]) & set(seeds))
    if shared:
        raise ParamError(f"{key} shares {shared} with the study's test seeds (`seeds.test`): "
                         "use dev seeds the study never tests on")


def load_study_model(params: dict):
    """`(model, tokenizer, device)` of the study's `model`, `dtype`, `device` and `device_map`
    params; `device` is where inputs go (the model's first layer)."""
    from smartkv.models import load_model

    model_name, dtype = model_settings(params)
    model, tok = load_model(model_name, dtype=dtype, **placement(params))
    return model, tok, model.device
