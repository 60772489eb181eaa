"""The study's run labels: the headline run, the matched runs, the budget sweep.

Plain strings, kept apart from `smartkv.study.runs` (which builds and validates the runs, and so
imports the method registry, transformers and torch): the stages that only read results (stats,
report, slides, latency, errors, sweeps) import this and start in a second instead of ten.
"""

from __future__ import annotations

HEADLINE = "smartkv"  # label of the headline SmartKV run (budget = params `budget`)
MATCH_SEP = "@"       # smartkv@int3: SmartKV at int3's measured memory


def budget_label(b: float) -> str:
    return f"smartkv-b{b:.2f}"


def matched_label(baseline: str) -> str:
    return f"{HEADLINE}{MATCH_SEP}{baseline}"


def matched_baseline(label: str) -> str:
    """`int3` for `smartkv@int3`; "" for any other run."""
    head, sep, base = label.partition(MATCH_SEP)
    return base if sep and head == HEADLINE else ""
