"""Stage `prepare`: task sets from the dev and test seeds (and LongBench when enabled) -> data/tasks.parquet.

One row per sample, with its seed, its split (`dev` or `test`) and the number of new tokens
to generate for it.
"""

from __future__ import annotations

import logging

import pandas as pd

from smartkv.study import get
from smartkv.models import load_tokenizer
from smartkv.study.cells import check_cover
from smartkv.study.grid import longbench_plan, task_plan, task_samples
from smartkv.study.params import model_settings, seeds_by_split
from stages.common import TASKS_FILE, stage_main

log = logging.getLogger("stages.prepare")


@stage_main
def main(params: dict) -> None:
    from tqdm.auto import tqdm

    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.tasks import generate_task

    seeds = seeds_by_split(params)
    plan = task_plan(params)
    lb = longbench_plan(params)
    if not lb:  # the cell list against the planned grid, before any prompt is made (again below, on the prompts)
        check_cover(params, "main", {(str(t["name"]), int(n)) for t in plan for n in t["lengths"]})
    model_name, _ = model_settings(params)
    tokenizer = load_tokenizer(model_name)
    jobs = [(split, seed, t) for split, ss in seeds.items() for seed in ss for t in plan + ([lb] if lb else [])]
    rows = []
    for split, seed, t in tqdm(jobs, desc="prepare", unit="task set"):
        if t is lb:
            samples = generate_task("longbench", tokenizer, n_per_cell=lb["n_per_task"], lengths=lb["lengths"],
                                    depths=[], seed=seed, source=lb["source"], tasks=lb["tasks"])
        else:
            samples = task_samples(t, tokenizer, seed)
        rows += [{**s.to_row(), "seed": seed, "split": split} for s in samples]
        log.debug("%s seed %d: %s -> %d samples", split, seed, "longbench" if t is lb else t["name"], len(samples))
    df = pd.DataFrame(rows)
    config = {k: get(params, k, None) for k in ("model", "seeds", "tasks", "longbench", "max_new_tokens")}
    # the model stages run cell by cell: the cell list must cover this grid, before any model work
    check_cover(params, "main", {(str(t), int(n)) for t, n in zip(df["task"], df["context_length"])})
    atomic_write_parquet(df, TASKS_FILE, provenance(config))
    log.info("wrote %s: %d samples (%s)", TASKS_FILE, len(df),
             ", ".join(f"{k} {v}" for k, v in df["split"].value_counts().sort_index().items()))


if __name__ == "__main__":
    main()
