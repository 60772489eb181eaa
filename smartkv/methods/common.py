"""Validation helpers shared by the method configs: each error names the value and what is allowed.

These are the only checks of these values: the study's params (`smartkv.study`) call them
with an empty `method` for top-level keys (`budget`, `decay`, ...), so a message reads
`budget=1.5 must ...` there and `smartkv: budget=1.5 must ...` in a method config.
"""

from __future__ import annotations

from smartkv.methods.registry import ConfigError
from smartkv.quantize import SUPPORTED_BITS


def check_choice(method: str, key: str, value, allowed) -> None:
    # the type must match too: `True in (0, 1)` holds in Python, but `axis=True` is a mistake
    if value not in allowed or type(value) not in {type(a) for a in allowed}:
        raise ConfigError(f"{method}: {key}={value!r} is not allowed; choose one of {tuple(allowed)}")


def check_bits(method: str, key: str, value, allowed=SUPPORTED_BITS) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ConfigError(f"{method}: {key}={value!r} is not a supported bit width; allowed: {tuple(allowed)}")


def check_int(method: str, key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_where(method)}{key}={value!r} must be an integer >= {minimum}")


def _where(method: str) -> str:
    return f"{method}: " if method else ""


def check_budget(method: str, value, key: str = "budget") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{_where(method)}{key}={value!r} must be a fraction of FP16 memory in (0, 1]")


def check_decay(method: str, value, key: str = "decay") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{_where(method)}{key}={value!r} must lie in (0, 1)")


def n_layers(model_config) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.num_hidden_layers)
