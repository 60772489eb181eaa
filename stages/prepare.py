"""Stage `prepare`: task sets from seeds (and LongBench when enabled) -> data/tasks.parquet.

One row per sample, with its seed and the number of new tokens to generate for it.
"""

from __future__ import annotations

import logging

import pandas as pd

from stages.common import TASKS_FILE, check_seeds, get, longbench_plan, model_settings, stage_main, task_plan

log = logging.getLogger("stages.prepare")


def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer

    from smartkv.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model_name))


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.tasks import generate_task

    seeds = check_seeds(params)
    plan = task_plan(params)
    lb = longbench_plan(params)
    model_name, _ = model_settings(params)
    tokenizer = load_tokenizer(model_name)
    rows = []
    for seed in seeds:
        for t in plan:
            samples = generate_task(t["name"], tokenizer, n_per_cell=t["n_per_cell"], lengths=t["lengths"],
                                    depths=t["depths"], seed=seed, **t["kwargs"])
            for s in samples:
                s.meta.setdefault("max_new_tokens", t["max_new_tokens"])
                rows.append({**s.to_row(), "seed": seed})
            log.info("seed %d: %s -> %d samples", seed, t["name"], len(samples))
        if lb is not None:
            samples = generate_task("longbench", tokenizer, n_per_cell=lb["n_per_task"], lengths=lb["lengths"],
                                    depths=[], seed=seed, source=lb["source"], tasks=lb["tasks"])
            rows += [{**s.to_row(), "seed": seed} for s in samples]
            log.info("seed %d: longbench -> %d samples", seed, len(samples))
    df = pd.DataFrame(rows)
    config = {k: get(params, k, None) for k in ("model", "seeds", "tasks", "longbench", "max_new_tokens")}
    atomic_write_parquet(df, TASKS_FILE, provenance(config))
    log.info("wrote %s: %d samples", TASKS_FILE, len(df))


if __name__ == "__main__":
    main()
