"""Tasks by name: a generator per task, dispatched by dictionary look-up (docs/DESIGN.md decision 5).

Every generator has the signature
``generate(tokenizer, *, n_per_cell, lengths, depths, seed, **kw) -> list[Sample]``;
`generate_task` validates the grid arguments once so generators need not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from smartkv.tasks.sample import Sample


@dataclass(frozen=True)
class TaskSpec:
    name: str
    generate: Callable[..., list[Sample]]
    description: str
    # Tasks without a needle (variable tracking, word extraction, perplexity, LongBench)
    # make one sample per (length, i) and ignore `depths`, so an empty list is fine for them.
    uses_depth: bool = True


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, description: str, *, uses_depth: bool = True):
    """Decorator: register `generate` under `name`."""

    def wrap(generate):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = TaskSpec(name, generate, description, uses_depth)
        return generate

    return wrap


def _load_builtin_tasks() -> None:
    # Importing the package imports every built-in task module, which registers it.
    import smartkv.tasks  # noqa: F401


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(TASKS)


def generate_task(
    name: str,
    tokenizer: Any,
    *,
    n_per_cell: int,
    lengths: list[int],
    depths: list[float],
    seed: int,
    **kw: Any,
) -> list[Sample]:
    """Samples of task `name` over the grid lengths x depths (x n_per_cell), from `seed`."""
    _load_builtin_tasks()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    lengths = list(lengths or [])
    depths = list(depths or [])
    if not lengths:
        raise ValueError(f"task {name!r}: lengths is empty; give at least one context length")
    bad = [n for n in lengths if int(n) != n or n <= 0]
    if bad:
        raise ValueError(f"task {name!r}: lengths must be positive integers, got {bad}")
    if spec.uses_depth:
        if not depths:
            raise ValueError(f"task {name!r}: depths is empty; give at least one depth in [0, 1]")
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"task {name!r}: depths must lie in [0, 1], got {bad}")
    if int(n_per_cell) != n_per_cell or n_per_cell < 1:
        raise ValueError(f"task {name!r}: n_per_cell must be a positive integer, got {n_per_cell!r}")
    return spec.generate(
        tokenizer,
        n_per_cell=int(n_per_cell),
        lengths=[int(n) for n in lengths],
        depths=[float(d) for d in depths],
        seed=int(seed),
        **kw,
    )
