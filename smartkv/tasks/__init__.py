"""Evaluation task sets: generated needle/RULER/perplexity tasks and LongBench loading.

Importing this package registers every built-in task in `TASKS`.
"""

from smartkv.tasks.registry import TASKS, TaskSpec, generate_task, register_task, task_names
from smartkv.tasks.sample import Sample

# Imported for their registration side effect.
from smartkv.tasks import niah, niah_passage, passkey, perplexity, ruler_niah, ruler_vt, ruler_words  # noqa: E402,F401
from smartkv.tasks.longbench import load_longbench  # noqa: E402

__all__ = ["TASKS", "TaskSpec", "Sample", "generate_task", "register_task", "task_names", "load_longbench"]
