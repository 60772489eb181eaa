"""Stages `peers_tuning` and `passages_peers`: eviction peers chosen on dev, then run on test cells.

In kvpress's own venv, as `stages.peers` (whose helpers this uses):

    .venv-kvpress/bin/python -m stages.peers_tuning tune                      # stage `peers_tuning`
    .venv-kvpress/bin/python -m stages.peers_tuning section <section> <cell>  # stage `<section>_peers@<cell>`

- `tune`: every candidate press and option combination at each kept ratio on the dev prompts of
  `peers_tuning.section` (data/<section>_dev_tasks.parquet, from its calibration), the best per
  kept ratio picked by smartkv/peer_tuning.py's rule before any test prompt runs
  -> data/peers_tuning.parquet, metrics/peers_choice.json;
- `section <section> <cell>`: the no-press control, the chosen press at each kept ratio and the
  dev-best setting of every other press (reported, not compared) on one cell of the section's test
  prompts -> data/<section>/peers/<cell>.parquet.

Apart from `stages.peers`, so that the main grid's peers do not depend on the tuning rule.
"""

from __future__ import annotations

import logging
import sys

from smartkv.study.params import ParamError, load_params
from stages.common import DATA, METRICS
from stages.peers import _run_specs, kvpress_main

log = logging.getLogger("stages.peers_tuning")


def tune(params: dict) -> None:
    """Every candidate on the section's dev prompts; the choice per kept ratio -> metrics/peers_choice.json."""
    from smartkv import peer_tuning as pt
    from smartkv.io import atomic_write_json
    from smartkv.study.driver import read_tasks

    try:
        s = pt.settings(params)
    except pt.TuningError as err:
        raise ParamError(str(err)) from None
    dev_file = DATA / f"{s['section']}_dev_tasks.parquet"
    if not dev_file.is_file():
        raise ParamError(f"{dev_file} not found: run `dvc repro section_calibration@{s['section']}` first")
    specs = pt.candidate_specs(s)
    tasks = read_tasks(dev_file, "dev")
    rows = _run_specs(params, tasks, specs, {"section": s["section"], "split": "dev", "tuning": "candidates"},
                      DATA / "peers_tuning.parquet", DATA / "timings" / "peers_tuning.parquet")
    choice = pt.choose(rows, specs) | {"section": s["section"], "dev_seeds": sorted(tasks),
                                       "n_prompts": int(rows["sample_id"].nunique())}
    atomic_write_json(METRICS / "peers_choice.json", choice)
    for kept, c in choice["kept"].items():
        log.info("kept %s: %s (dev accuracy %.3f over %d prompts)", kept, c["chosen"], c["candidates"][0]["accuracy"],
                 c["candidates"][0]["n"])


def section_cell(params: dict, section: str, cell_name: str) -> None:
    """The control, the chosen presses and every other press's dev-best setting (metrics/peers_choice.json)
    on one test cell of `section`."""
    import json

    from smartkv import peer_tuning as pt
    from smartkv.study.cells import find
    from smartkv.study.driver import read_tasks

    choice_file = METRICS / "peers_choice.json"
    if not choice_file.is_file():
        raise ParamError(f"{choice_file} not found: run `dvc repro peers_tuning` first (the presses are chosen on dev)")
    choice = json.loads(choice_file.read_text())
    if choice.get("section") != section:
        raise ParamError(f"{choice_file} chose presses on {choice.get('section')!r}, not on {section!r}")
    cell = find(params, section, cell_name)
    tasks = read_tasks(DATA / f"{section}_tasks.parquet", "test")
    mine = cell.take([(seed, x) for seed, v in sorted(tasks.items()) for x in v], sample=lambda p: p[1])
    by_seed: dict = {}
    for seed, x in mine:
        by_seed.setdefault(seed, []).append(x)
    try:
        specs = pt.chosen_specs(choice, pt.candidate_specs(pt.settings(params)))
    except pt.TuningError as err:
        raise ParamError(str(err)) from None
    _run_specs(params, by_seed, specs, {"section": section, "cell": cell.name, "split": "test"},
               DATA / section / "peers" / f"{cell.name}.parquet",
               DATA / "timings" / section / "peers" / f"{cell.name}.parquet")


def main() -> None:
    args = sys.argv[1:]

    def body() -> None:
        if args == ["tune"]:
            tune(load_params())
        elif len(args) == 3 and args[0] == "section":
            section_cell(load_params(), args[1], args[2])
        else:
            raise ParamError(f"usage: python -m stages.peers_tuning tune | section <section> <cell> (got {args!r})")

    kvpress_main(f"peers_tuning {' '.join(args)}", body)


if __name__ == "__main__":
    main()
