"""Stage `smartkv`: the headline run at `budget` and the Pareto sweep over `budgets`.

-> data/smartkv.parquet. A budget below a context's floor gives rows with `error` set.
"""

from __future__ import annotations

from stages.common import RESULTS, evaluate_runs, get, model_settings, smartkv_runs, stage_main


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    runs = smartkv_runs(params)
    config = {k: get(params, k) for k in ("model", "dtype", "budget", "budgets", "smartkv", "decay", "realloc_freq")}
    evaluate_runs(params, runs, RESULTS["smartkv"], "smartkv", config)


if __name__ == "__main__":
    main()
