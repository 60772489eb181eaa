"""Cells of the study: the pieces a model stage runs one at a time, each its own DVC stage.

A model stage (`baselines`, `smartkv`, and the matched sections `extra_cells`, `second_model`, `passages`)
runs once per cell of `params.yaml`'s `cells.<stage group>` list (dvc.yaml `foreach`), writes
`data/<stage>/<cell>.parquet`, and records its own entry in `dvc.lock` when it finishes. So an
interrupted `dvc repro` keeps every finished cell, and a change to one cell's inputs re-runs
that cell alone. Readers (stats, figures, report) take the union of the listed cells.

A cell's name is `<task>-<length>` (every prompt of that task at that prompt length) or
`<task>-<length>-<i>of<n>` (the i-th of n equal, contiguous shards of those prompts, in the
order the tasks file holds them: seed, then prompt). Shards keep a long cell under a session's
worth of minutes; they split prompts, never a prompt's runs, so every prompt still pays one
prefill for all the runs that share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smartkv.study.params import ParamError, get

_NAME = re.compile(r"^(?P<task>[a-z][a-z0-9_]*)-(?P<length>[1-9][0-9]*)(-(?P<i>[1-9][0-9]*)of(?P<n>[1-9][0-9]*))?$")
GROUPS = ("main", "extra_cells", "second_model", "passages")


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    shard: int = 1  # 1-based
    shards: int = 1

    @property
    def name(self) -> str:
        base = f"{self.task}-{self.length}"
        return base if self.shards == 1 else f"{base}-{self.shard}of{self.shards}"

    def take(self, items: list, sample=lambda x: x) -> list:
        """This cell's prompts among `items` (ordered seed, then prompt; `sample(item)` is its Sample)."""
        mine = [x for x in items if sample(x).task == self.task and int(sample(x).context_length) == self.length]
        n = len(mine)
        return mine[(self.shard - 1) * n // self.shards: self.shard * n // self.shards]


def parse(name: str, key: str = "cells") -> Cell:
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise ParamError(f"{key}: {name!r} is not a cell name; allowed: <task>-<length> or <task>-<length>-<i>of<n>, "
                         "e.g. niah-1024 or niah-1024-2of6")
    i, n = int(m["i"] or 1), int(m["n"] or 1)
    if i > n:
        raise ParamError(f"{key}: {name!r}: shard {i} of {n} does not exist; allowed: 1 to {n}")
    return Cell(m["task"], int(m["length"]), i, n)


def cell_list(params: dict, group: str) -> list[Cell]:
    """`cells.<group>`, parsed and checked: names unique, every shard of a split cell listed once."""
    if group not in GROUPS:
        raise ParamError(f"cells.{group}: no such group; allowed: {', '.join(GROUPS)}")
    names = get(params, f"cells.{group}", None)
    if not isinstance(names, list) or not names:
        raise ParamError(f"cells.{group}={names!r} must be a non-empty list of cell names (<task>-<length>[-<i>of<n>])")
    cells = [parse(x, f"cells.{group}") for x in names]
    by: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        by.setdefault((c.task, c.length), []).append(c)
    for (task, length), cs in by.items():
        want = list(range(1, cs[0].shards + 1))
        if {c.shards for c in cs} != {cs[0].shards} or sorted(c.shard for c in cs) != want:
            raise ParamError(f"cells.{group}: {task}-{length} must be listed whole or as all of its shards 1of<n> .. "
                             f"<n>of<n>, once each; got {', '.join(c.name for c in cs)}")
    return cells


def find(params: dict, group: str, name: str) -> Cell:
    """The cell `name` of `cells.<group>` (a stage's command-line argument)."""
    cells = cell_list(params, group)
    for c in cells:
        if c.name == name:
            return c
    raise ParamError(f"cells.{group}: no cell {name!r}; allowed: {', '.join(c.name for c in cells)}")


def check_cover(params: dict, group: str, grid: set[tuple[str, int]]) -> None:
    """Every (task, prompt length) of the prepared grid has its cells, and no cell lies outside it."""
    have = {(c.task, c.length) for c in cell_list(params, group)}
    missing = sorted(grid - have)
    extra = sorted(have - grid)
    if missing or extra:
        names = lambda pairs: ", ".join(f"{t}-{n}" for t, n in pairs)  # noqa: E731
        raise ParamError(f"cells.{group} does not match the task grid: "
                         + "; ".join(x for x in (missing and f"missing {names(missing)}",
                                                  extra and f"no prompts for {names(extra)}") if x)
                         + f"; the grid has {names(sorted(grid))}")
