"""docs/internals.md's table of SmartKV's parameters names every `SmartKVConfig` field with its
current default, so a changed default or a new field cannot leave the documentation behind."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from smartkv.methods.smartkv import SmartKVConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "internals.md"


def _shown(value) -> str:
    """A default as the table writes it: tuples as Python does, strings bare."""
    return value if isinstance(value, str) else repr(value)


def test_parameter_table_matches_smartkvconfig():
    section = DOC.read_text(encoding="utf-8").split("\n## SmartKV's parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", section, flags=re.M))
    defaults = {}
    for f in dataclasses.fields(SmartKVConfig):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        defaults[f.name] = _shown(value)
    assert rows == defaults, "docs/internals.md, \"SmartKV's parameters\": update the table to SmartKVConfig"
