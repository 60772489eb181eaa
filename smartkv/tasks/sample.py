"""One evaluation sample, the unit every task generator produces and every stage consumes.

A sample is plain data (prompt text, gold answers, scorer name) so that a prepared task set
can be written to parquet once and evaluated by any KV method later (docs/DESIGN.md: prepare
tasks -> runs). `answers` and `meta` are JSON-encoded in a parquet row because their shapes
vary by task and parquet wants one type per column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """A prompt and what counts as a right answer to it.

    task:           task name; a registered name (``niah``, ``ruler_multikey``...), or for
                    LongBench ``longbench_<dataset>`` so each dataset keeps its own metric.
    sample_id:      unique within ``task``; deterministic from the generator's seed.
    prompt:         the full plain text fed to the model (no chat template).
    answers:        gold answers; ``[]`` for perplexity.
    metric:         a scorer name in ``smartkv.scoring.SCORERS``, or ``"perplexity"``.
    context_length: the target context length in tokens (the grid value).
    depth:          needle depth in [0, 1] for needle tasks, else None.
    meta:           JSON-serializable extras (needle spans, the perplexity continuation...).
    target:         the gold continuation of the prompt, scored teacher-forced (its tokens fed
                    through the cache in one forward): e.g. " 48213" after "The pass key is",
                    or the perplexity continuation. "" for a task scored by generation only.
    cluster:        prompts that share material (a haystack, a key, a story) share a cluster,
                    so a bootstrap resamples clusters rather than prompts; defaults to
                    `sample_id` (the prompt shares nothing).
    """

    task: str
    sample_id: str
    prompt: str
    answers: list[str]
    metric: str
    context_length: int
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    target: str = ""
    cluster: str = ""

    def __post_init__(self) -> None:
        if not self.cluster:
            self.cluster = self.sample_id

    def to_row(self) -> dict[str, Any]:
        """A flat dict for one parquet row; answers and meta become JSON strings."""
        return {
            "task": self.task,
            "sample_id": self.sample_id,
            "prompt": self.prompt,
            "answers": json.dumps(list(self.answers)),
            "metric": self.metric,
            "context_length": int(self.context_length),
            "depth": None if self.depth is None else float(self.depth),
            "meta": json.dumps(self.meta, sort_keys=True),
            "target": self.target,
            "cluster": self.cluster,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Sample":
        """Inverse of `to_row`; also accepts already-decoded lists/dicts and pandas' NaN depth."""
        answers = row["answers"]
        if isinstance(answers, str):
            answers = json.loads(answers)
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        depth = row.get("depth")
        # pandas turns a None in a float column into NaN; a NaN depth means "no depth".
        if depth is not None and isinstance(depth, float) and math.isnan(depth):
            depth = None
        return cls(
            task=str(row["task"]),
            sample_id=str(row["sample_id"]),
            prompt=str(row["prompt"]),
            answers=[str(a) for a in answers],
            metric=str(row["metric"]),
            context_length=int(row["context_length"]),
            depth=None if depth is None else float(depth),
            meta=dict(meta),
            # Task sets prepared before these columns existed have neither.
            target=str(row.get("target") or ""),
            cluster=str(row.get("cluster") or ""),
        )
