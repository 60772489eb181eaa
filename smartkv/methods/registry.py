"""Methods by name: a validated config dataclass and a builder that makes a `transformers` cache.

Stages and the command line ask for a method by name and a dict of params; dispatch is a
dictionary look-up (docs/DESIGN.md decision 5), never an if/elif over strings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from transformers import Cache, PreTrainedConfig


from smartkv.errors import ConfigError  # noqa: E402  (re-exported: the name callers import from here)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    build: Callable[[Any, PreTrainedConfig], Cache]
    description: str


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, description: str):
    """Decorator: register `build(config, model_config) -> Cache` under `name`."""

    def wrap(build):
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        REGISTRY[name] = MethodSpec(name, config_cls, build, description)
        return build

    return wrap


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(REGISTRY)


def get_spec(name: str) -> MethodSpec:
    _load_builtin_methods()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_config(name: str, **params):
    """The validated config of method `name`; unknown keys are an error naming them."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    return spec.config_cls(**params)


def build_cache(name: str, model_config: PreTrainedConfig, **params) -> Cache:
    """A fresh cache of method `name` for a model with `model_config`."""
    spec = get_spec(name)
    return spec.build(make_config(name, **params), model_config)


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


_LOADED = False


def _load_builtin_methods() -> None:
    # Importing the method modules runs their @register decorators. Done lazily so that
    # `registry` itself has no import cycle with the modules that import it.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from smartkv.methods import builtin  # noqa: F401
