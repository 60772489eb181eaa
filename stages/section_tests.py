"""Stage `section_tests@<section>`: a matched section's tests on the union of its cells.

`python -m stages.section_tests <section>` (`extra_cells`, `second_model`): the rows of every
`<section>_baselines` and `<section>_smartkv` cell, clustered by passage (smartkv/stats/clusters.py),
then `smartkv@<b>` against `b` on every paired measure, pooled and per cell, Holm per family
(smartkv/matched_tests.py) -> metrics/<section>.json, metrics/<section>_table.md, and one panel per
comparison in plots/<section>.png (smartkv/plots_sections.py).
"""

from __future__ import annotations

import sys

from smartkv import matched_study as ms
from smartkv import matched_tests as mt
from smartkv.study.params import ParamError, model_settings, stats_settings
from smartkv.plots_sections import section_plot
from stages.common import DATA, METRICS, PLOTS, read_section, stage_main


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json, atomic_write_text, read_parquet_with_meta
    from smartkv.stats.clusters import attach_passage_clusters

    args = sys.argv[1:]
    if len(args) != 1 or args[0] not in ms.SECTIONS:
        raise ParamError(f"usage: python -m stages.section_tests <section>, one of {', '.join(ms.SECTIONS)} "
                         f"(got {args!r})")
    section = args[0]
    model_settings(params)
    stats = stats_settings(params)
    s = ms.settings(params, section)
    tasks, _ = read_parquet_with_meta(DATA / f"{section}_tasks.parquet")
    rows, missing = read_section(section, params)
    df = attach_passage_clusters(rows, tasks)
    t = mt.tests(df, s["match"], seed=stats["bootstrap_seed"], alpha=stats["alpha"],
                 margin=stats["noninferiority_margin"], family=ms.SECTIONS[section], ablations=s["ablations"])
    m = mt.metrics(df, t, s) | {"missing_cells": missing}
    atomic_write_json(METRICS / f"{section}.json", m)
    atomic_write_text(METRICS / f"{section}_table.md", mt.table(m))
    section_plot(m, PLOTS / section)


if __name__ == "__main__":
    main()
