"""The body of a matched-comparison stage (`second_model`, `extra_cells`): smartkv/matched_study.py.

Params section `<section>` -> data/<section>_tasks.parquet, data/<section>.parquet
(+ data/timings/<section>.parquet), metrics/<section>.json, metrics/<section>_table.md.
"""

from __future__ import annotations

import logging

from smartkv import matched_study as ms
from smartkv.study import get
from smartkv.study.params import model_settings, stats_settings
from stages.common import DATA, METRICS

log = logging.getLogger("stages.matched")


def run_section(params: dict, section: str) -> None:
    """Prompts, baselines, SmartKV at their measured bytes, tests and tables for `section`."""
    from smartkv.io import atomic_write_json, atomic_write_parquet, atomic_write_text, provenance
    from smartkv.models import load_tokenizer

    model_settings(params)
    stats = stats_settings(params)  # a bad stats value fails before an hour of model work, not after
    s = ms.settings(params, section)
    config = {k: get(params, k, None) for k in (section, "model", "dtype", "baselines", "decay",
                                                "realloc_freq", "smartkv")}
    tokenizer = load_tokenizer(s["model"])
    tasks_file = DATA / f"{section}_tasks.parquet"
    tasks = ms.prepare(s, tokenizer)
    atomic_write_parquet(tasks, tasks_file, provenance(config))
    log.info("%s: %s, %d prompts (%d per seed)", section, s["model"], len(tasks), ms.n_prompts(s))
    df = ms.run(params, s, tasks_file)
    ms.write(df, DATA / f"{section}.parquet", DATA / "timings" / f"{section}.parquet", config)
    t = ms.tests(df, s["match"], seed=stats["bootstrap_seed"], alpha=stats["alpha"],
                 margin=stats["noninferiority_margin"], family=ms.SECTIONS[section])
    m = ms.metrics(df, t, s)
    atomic_write_json(METRICS / f"{section}.json", m)
    atomic_write_text(METRICS / f"{section}_table.md", ms.table(m))
