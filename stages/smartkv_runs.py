"""Stage `smartkv`: the headline run at `budget`, SmartKV at each matched baseline's measured
memory (`smartkv@<baseline>`), and the Pareto sweep over `budgets`, on the `split` seeds.

-> data/smartkv.parquet, data/timings/smartkv.parquet, metrics/smartkv.json (per-run
means, read by `dvc exp show` and the sweeps stage). A budget below a context's floor gives
rows with `error` set.
"""

from __future__ import annotations

import json

from smartkv.study import get
from smartkv.study.driver import evaluate_runs, run_metrics
from smartkv.study.match import budgets
from smartkv.study.params import ParamError, model_settings, study_split
from smartkv.study.runs import smartkv_runs
from stages.common import MATCHED_BUDGETS, METRICS, TASKS_FILE, stage_main, write_results


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json

    model_settings(params)
    split = study_split(params)
    if not MATCHED_BUDGETS.is_file():
        raise ParamError(f"{MATCHED_BUDGETS} not found: run the match stage first (`dvc repro match`)")
    runs = smartkv_runs(params, budgets(json.loads(MATCHED_BUDGETS.read_text()), split))
    df = evaluate_runs(params, runs, TASKS_FILE, split=split, desc="smartkv")
    config = {k: get(params, k) for k in ("model", "dtype", "split", "budget", "budgets", "smartkv", "decay",
                                          "realloc_freq")}
    write_results(df, "smartkv", config)
    atomic_write_json(METRICS / "smartkv.json", run_metrics(df))


if __name__ == "__main__":
    main()
