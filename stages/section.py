"""The matched-comparison sections (`extra_cells`, `second_model`, `passages`): their prompts and model cells.

`python -m stages.section <step> <section> [<cell>]`, the steps in the order they run (the last,
the tests, is `stages.section_tests`, apart so that the model cells never depend on statistics code):

- `calibrate <section>`: FP16 on the section's prompts drawn from its `dev_seeds`, each (task, length)
  cell at `fp16_bar` or the stage fails and writes nothing -> data/<section>_dev_tasks.parquet,
  data/<section>_calibration.parquet, metrics/<section>_calibration.json (the test cells depend on it);
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
from stages.common import DATA, METRICS, read_results, row_provenance, stage_main, write_results

log = logging.getLogger("stages.section")
STEPS = {"calibrate": 1, "tasks": 1, "baselines": 2, "smartkv": 2}  # step -> arguments after it


def tasks_file(section: str, split: str = "test"):
    return DATA / (f"{section}_tasks.parquet" if split == "test" else f"{section}_dev_tasks.parquet")


def calibration_files(section: str):
    return DATA / f"{section}_calibration.parquet", METRICS / f"{section}_calibration.json"


# The params each step's outputs depend on (dvc.yaml lists the same), recorded beside them.
CONFIG = {"tasks": ("model", "seeds", "max_new_tokens"), "calibrate": ("model", "dtype", "max_new_tokens", "baselines"), "baselines": ("model", "dtype", "baselines"),
          "smartkv": ("model", "dtype", "baselines", "decay", "realloc_freq", "smartkv")}
# ... and, for a section that runs SmartKV at the headline budget (`ablations`, or `budgets` holding it),
# these (dvc.yaml lists them for that section's cells only, so `-S budget=...` re-runs no other section)
HEADLINE_CONFIG = ("budget", "ablations")


def config(params: dict, section: str, step: str) -> dict:
    keys = CONFIG[step] + (HEADLINE_CONFIG if step == "smartkv" and get(params, f"{section}.ablations", None) else ())
    return {k: get(params, k, None) for k in (section, *keys)}


def prepare(params: dict, s: dict) -> None:
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.models import load_tokenizer

    section = s["section"]
    df = ms.prepare(s, load_tokenizer(s["model"]))
    check_cover(params, section, {(str(t), int(n)) for t, n in zip(df["task"], df["context_length"])})
    atomic_write_parquet(df, tasks_file(section), provenance(config(params, section, "tasks")))
    log.info("%s: %s, %d prompts (%d per seed)", section, s["model"], len(df), ms.n_prompts(s))


def calibrate(params: dict, s: dict) -> None:
    """FP16 on the dev prompts; every output written only once every cell has passed."""
    import tempfile

    from smartkv.io import atomic_write_json, atomic_write_parquet, provenance
    from smartkv.models import load_tokenizer
    from smartkv.study.driver import split_timings

    section = s["section"]
    if not s["dev_seeds"]:
        raise ParamError(f"{section}.dev_seeds is empty: there is nothing to calibrate on; list dev seeds (>= 100)")
    df = ms.prepare(s, load_tokenizer(s["model"]), split="dev")
    meta = provenance(config(params, section, "calibrate"))
    with tempfile.TemporaryDirectory() as tmp:  # evaluate reads a file; the real one is written on success
        staged = f"{tmp}/dev_tasks.parquet"
        atomic_write_parquet(df, staged, meta)
        rows, summary = ms.calibrate(params, s, staged)
    table = ", ".join(f"{c} {v['found']}/{v['n']}" for c, v in summary["cells"].items())
    if summary["failed"]:
        raise ParamError(f"{section}: FP16 is under fp16_bar={s['fp16_bar']} on dev in {', '.join(summary['failed'])} "
                         f"({table}); change the task's format or drop those cells (nothing written)")
    rows_file, metrics_file = calibration_files(section)
    atomic_write_parquet(df, tasks_file(section, "dev"), meta)
    atomic_write_parquet(split_timings(rows)[0].assign(**row_provenance(device_setting(params))), rows_file, meta)
    atomic_write_json(metrics_file, summary)
    log.info("%s: FP16 on dev %s (bar %.2f): every cell passes", section, table, s["fp16_bar"])


@stage_main
def main(params: dict) -> None:
    args = sys.argv[1:]
    if not args or args[0] not in STEPS or len(args) != 1 + STEPS[args[0]] or args[1] not in ms.SECTIONS:
        raise ParamError(f"usage: python -m stages.section calibrate|tasks <section> | baselines|smartkv <section> <cell>, "
                         f"<section> one of {', '.join(ms.SECTIONS)} (got {args!r})")
    step, section = args[0], args[1]
    model_settings(params)
    stats_settings(params)  # a bad stats value fails before the model work, not after
    s = ms.settings(params, section)
    if step == "tasks":
        return prepare(params, s)
    if step == "calibrate":
        return calibrate(params, s)
    cell = find(params, section, args[2])
    file = tasks_file(section)
    if step == "baselines":
        df = ms.run_baselines(params, s, file, cell)
    else:
        df = ms.run_smartkv(params, s, file, read_results(f"{section}/baselines", params=params), cell)
    write_results(df, f"{section}/{step}", cell.name, config(params, section, step), device_setting(params))


if __name__ == "__main__":
    main()
