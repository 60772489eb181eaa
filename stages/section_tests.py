"""Stage `section_tests@<section>`: a matched section's tests on the union of its cells.

`python -m stages.section_tests <section>` (`extra_cells`, `second_model`): the rows of every
`<section>_baselines` and `<section>_smartkv` cell, clustered by passage (smartkv/stats/clusters.py),
then `smartkv@<b>` against `b` on every paired measure, pooled and per cell, Holm per family
(smartkv/matched_tests.py). On the section the presses were tuned for (`peers_tuning.section`),
also SmartKV at each kept ratio against the press chosen there on dev (`<section>_peers` cells,
metrics/peers_choice.json), and the no-press control checked against FP16 row for row
-> metrics/<section>.json, metrics/<section>_table.md, and one panel per comparison in
plots/<section>.png (smartkv/plots_sections.py).
"""

from __future__ import annotations

import sys

import pandas as pd

from smartkv import matched_study as ms
from smartkv import matched_tests as mt
from smartkv.study.params import ParamError, model_settings, stats_settings
from smartkv.plots_sections import section_plot
from stages.common import DATA, METRICS, PLOTS, cell_file, read_section, section_cells, stage_main


def press_rows(params: dict, section: str, cells: list[str]):
    """(the `<section>/peers` rows of the finished `cells`, metrics/peers_choice.json), or (None, None)
    where the presses were tuned for another section or have not been chosen yet."""
    import json

    from smartkv.study.driver import read_results

    choice_file = METRICS / "peers_choice.json"
    if (params.get("peers_tuning") or {}).get("section") != section or not choice_file.is_file():
        return None, None
    files = [cell_file(f"{section}/peers", c) for c in cells if cell_file(f"{section}/peers", c).is_file()]
    return (read_results([files]) if files else None), json.loads(choice_file.read_text())


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json, atomic_write_text, read_parquet_with_meta
    from smartkv.stats.clusters import attach_passage_clusters
    from smartkv.study.runs import ablation_runs, headline_budget

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
    done = section_cells(section, params)[0]
    presses, choice = press_rows(params, section, done)
    if presses is not None:
        rows = pd.concat([rows, presses], ignore_index=True)
    df = attach_passage_clusters(rows, tasks)
    pairs = mt.press_pairs(choice, s["budgets"], headline_budget(params), set(df["run"])) if choice else []
    oracle = next((r.label for r in ablation_runs(params) if r.oracle and r.label in s["ablations"]), None)
    t = mt.tests(df, s["match"], seed=stats["bootstrap_seed"], alpha=stats["alpha"],
                 margin=stats["noninferiority_margin"], family=ms.SECTIONS[section], ablations=s["ablations"],
                 presses=pairs, oracle=oracle)
    m = mt.metrics(df, t, s, oracle=oracle) | {"missing_cells": missing}
    if choice:
        m["presses"] = {"choice": METRICS.name + "/peers_choice.json", "rule": choice.get("rule"),
                        "pairs": [list(p) for p in pairs],
                        "press_cells_missing": [c for c in done if not cell_file(f"{section}/peers", c).is_file()]}
    atomic_write_json(METRICS / f"{section}.json", m)
    atomic_write_text(METRICS / f"{section}_table.md", mt.table(m))
    section_plot(m, PLOTS / section)


if __name__ == "__main__":
    main()
