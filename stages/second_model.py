"""Stage `second_model`: the headline comparisons on a second model family (default Gemma-3-270M).

Its own needle prompts (its tokenizer), FP16 and the `second_model.runs` baselines, each
`second_model.match` baseline's bytes measured per cell, SmartKV at exactly those bytes, exact
McNemar with Holm (smartkv/second_model.py). -> data/second_model_tasks.parquet,
data/second_model.parquet (+ data/timings/second_model.parquet), metrics/second_model.json,
metrics/second_model_table.md.
"""

from __future__ import annotations

import logging

from smartkv import second_model as sm
from smartkv.study import get
from smartkv.study.params import model_settings, stats_settings
from stages.common import DATA, METRICS, stage_main

log = logging.getLogger("stages.second_model")
TASKS = DATA / "second_model_tasks.parquet"


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json, atomic_write_parquet, atomic_write_text, provenance
    from smartkv.models import load_tokenizer

    model_settings(params)
    stats = stats_settings(params)  # a bad stats value fails before an hour of model work, not after
    s = sm.settings(params)
    config = {k: get(params, k, None) for k in ("second_model", "dtype", "baselines", "decay",
                                                "realloc_freq", "smartkv")}
    tokenizer = load_tokenizer(s["model"])
    tasks = sm.prepare(s, tokenizer)
    atomic_write_parquet(tasks, TASKS, provenance(config))
    log.info("%s: %d prompts (%d per seed)", s["model"], len(tasks), sm.n_prompts(s))
    df = sm.run(params, s, TASKS)
    sm.write(df, DATA / "second_model.parquet", DATA / "timings" / "second_model.parquet", config)
    t = sm.tests(df, s["match"], seed=stats["bootstrap_seed"], alpha=stats["alpha"],
                 margin=stats["noninferiority_margin"])
    m = sm.metrics(df, t, s)
    atomic_write_json(METRICS / "second_model.json", m)
    atomic_write_text(METRICS / "second_model_table.md", sm.table(m))


if __name__ == "__main__":
    main()
