"""Stage `ablations`: SmartKV at the headline budget with one component changed per run.

Random allocation, fixed after prefill (realloc_freq=0), static importance (cumulative) vs
EMA, DP vs greedy, layer-aware vs equal per-layer budgets, and the oracle allocation
(importance from the whole FP16 generation) for the regret figure, on the `split` seeds
(`ablations_seeds` of them, when set: the ablations are secondary comparisons and cost a
prefill per prompt).
The headline run itself comes from data/smartkv.parquet, not recomputed.
-> data/ablations.parquet, data/timings/ablations.parquet.
"""

from __future__ import annotations

from smartkv.study import get
from smartkv.study.driver import evaluate_runs
from smartkv.study.params import model_settings, seed_subset, study_split
from smartkv.study.runs import ablation_runs
from stages.common import TASKS_FILE, stage_main, write_results


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    split = study_split(params)
    runs = ablation_runs(params)
    df = evaluate_runs(params, runs, TASKS_FILE, split=split, desc="ablations",
                       seeds=seed_subset(params, "ablations_seeds"))
    config = {k: get(params, k, None) for k in ("model", "dtype", "split", "budget", "smartkv", "decay",
                                                "realloc_freq", "ablations", "ablations_seeds")}
    write_results(df, "ablations", config)


if __name__ == "__main__":
    main()
