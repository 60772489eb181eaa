"""The matched-comparison sections (`extra_cells`, `second_model`): their prompts and model cells.

`python -m stages.section <step> <section> [<cell>]`, the steps in the order they run (the fourth,
the tests, is `stages.section_tests`, apart so that the model cells never depend on statistics code):

- `tasks <section>`: the section's prompts with its model's tokenizer -> data/<section>_tasks.parquet;
- `baselines <section> <cell>`: FP16 and `<section>.runs` on one cell of `cells.<section>`
  -> data/<section>/baselines/<cell>.parquet;
- `smartkv <section> <cell>`: each `<section>.match` baseline's bytes measured per (task, length)
  over every baselines cell, SmartKV at exactly those bytes on one cell
  -> data/<section>/smartkv/<cell>.parquet;
- `python -m stages.section_tests <section>`: the tests on the union of the cells -> metrics/<section>.json,
  metrics/<section>_table.md.

Wall clock goes to data/timings/<section>/... beside each cell (smartkv/matched_study.py has the rest).
"""

from __future__ import annotations

import logging
import sys

from smartkv import matched_study as ms
from smartkv.study import get
from smartkv.study.cells import check_cover, find
from smartkv.study.params import ParamError, device_setting, model_settings, stats_settings
from stages.common import DATA, read_results, stage_main, write_results

log = logging.getLogger("stages.section")
STEPS = {"tasks": 1, "baselines": 2, "smartkv": 2}  # step -> arguments after it


def tasks_file(section: str):
    return DATA / f"{section}_tasks.parquet"


# The params each step's outputs depend on (dvc.yaml lists the same), recorded beside them.
CONFIG = {"tasks": ("model", "seeds", "max_new_tokens"), "baselines": ("model", "dtype", "baselines"),
          "smartkv": ("model", "dtype", "baselines", "decay", "realloc_freq", "smartkv")}


def config(params: dict, section: str, step: str) -> dict:
    return {k: get(params, k, None) for k in (section, *CONFIG[step])}


def prepare(params: dict, s: dict) -> None:
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.models import load_tokenizer

    section = s["section"]
    df = ms.prepare(s, load_tokenizer(s["model"]))
    check_cover(params, section, {(str(t), int(n)) for t, n in zip(df["task"], df["context_length"])})
    atomic_write_parquet(df, tasks_file(section), provenance(config(params, section, "tasks")))
    log.info("%s: %s, %d prompts (%d per seed)", section, s["model"], len(df), ms.n_prompts(s))


@stage_main
def main(params: dict) -> None:
    args = sys.argv[1:]
    if not args or args[0] not in STEPS or len(args) != 1 + STEPS[args[0]] or args[1] not in ms.SECTIONS:
        raise ParamError(f"usage: python -m stages.section tasks <section> | baselines|smartkv <section> <cell>, "
                         f"<section> one of {', '.join(ms.SECTIONS)} (got {args!r})")
    step, section = args[0], args[1]
    model_settings(params)
    stats_settings(params)  # a bad stats value fails before the model work, not after
    s = ms.settings(params, section)
    if step == "tasks":
        return prepare(params, s)
    cell = find(params, section, args[2])
    file = tasks_file(section)
    if step == "baselines":
        df = ms.run_baselines(params, s, file, cell)
    else:
        df = ms.run_smartkv(params, s, file, read_results(f"{section}/baselines", params=params), cell)
    write_results(df, f"{section}/{step}", cell.name, config(params, section, step), device_setting(params))


if __name__ == "__main__":
    main()
