"""Stage `smartkv@<cell>`: every SmartKV run of the study on one cell, one tracked prefill per
prompt shared by all (`python -m stages.smartkv_runs <cell>`, one DVC stage per cell of `cells.main`).

- the headline run at `budget`, SmartKV at each matched baseline's measured memory
  (`smartkv@<baseline>`) and the Pareto sweep over `budgets`, on the `split` seeds;
- the ablations: the headline config with one component changed per run (random allocation,
  static cumulative importance, the window signal, the oracle importance of the whole FP16
  generation), on `ablations_seeds` of the split (null: all of them).

The ablations share this stage because they share its prefill: each prompt's tracked prefill
(the statistics every run reads, and the oracle's FP16 generation) is paid once, not once per
stage. Their params (`budget`, `decay`, `realloc_freq`, `smartkv`) are the headline's anyway.

-> data/smartkv/<cell>.parquet and data/ablations/<cell>.parquet (+ data/timings/ of each); the
`smartkv_metrics` stage writes metrics/smartkv.json (per-run means over every cell, read by `dvc exp show`
and the sweeps stage). A budget below a context's floor gives rows with `error` set.
"""

from __future__ import annotations

import json

from smartkv.study import get
from smartkv.study.cells import find
from smartkv.study.driver import evaluate_runs
from smartkv.study.match import budgets
from smartkv.study.params import ParamError, device_setting, model_settings, seed_subset, study_split
from smartkv.study.runs import ablation_runs, smartkv_runs
from stages.common import MATCHED_BUDGETS, TASKS_FILE, cell_arg, stage_main, write_results


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    cell = find(params, "main", cell_arg())
    split = study_split(params)
    if not MATCHED_BUDGETS.is_file():
        raise ParamError(f"{MATCHED_BUDGETS} not found: run the match stage first (`dvc repro match`)")
    runs = smartkv_runs(params, budgets(json.loads(MATCHED_BUDGETS.read_text()), split))
    ablations = ablation_runs(params)
    clash = sorted({r.label for r in runs} & {r.label for r in ablations})
    if clash:
        raise ParamError(f"ablations: label(s) {', '.join(clash)} already name a SmartKV run (headline, "
                         "matched or `budgets`); give each ablation its own label")
    # `ablations_seeds` bounds the ablations on the test split; a dev sweep (one seed by
    # default) runs them on every dev seed.
    only = seed_subset(params, "ablations_seeds") if split == "test" else None
    df = evaluate_runs(params, runs + ablations, TASKS_FILE, split=split, desc=f"smartkv {cell.name}",
                       run_seeds=None if only is None else {r.label: only for r in ablations}, cell=cell)
    is_ablation = df["run"].isin({r.label for r in ablations})
    shared = {k: get(params, k, None) for k in ("model", "dtype", "split", "budget", "smartkv", "decay", "realloc_freq")}
    device = device_setting(params)
    write_results(df[~is_ablation].reset_index(drop=True), "smartkv", cell.name,
                  shared | {"budgets": get(params, "budgets")}, device)
    write_results(df[is_ablation].reset_index(drop=True), "ablations", cell.name,
                  shared | {k: get(params, k, None) for k in ("ablations", "ablations_seeds")}, device)


if __name__ == "__main__":
    main()
