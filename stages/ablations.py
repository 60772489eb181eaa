"""Stage `ablations`: SmartKV at the headline budget with one component changed per run.

Random allocation, fixed after prefill (realloc_freq=0), static importance (cumulative) vs
EMA, DP vs greedy, layer-aware vs equal per-layer budgets, and the oracle allocation
(importance from the whole FP16 generation) for the regret figure. The headline run itself
(greedy, EMA) comes from data/smartkv.parquet, not recomputed. -> data/ablations.parquet.
"""

from __future__ import annotations

from stages.common import RESULTS, ablation_runs, evaluate_runs, get, model_settings, stage_main


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    runs = ablation_runs(params)
    config = {k: get(params, k) for k in ("model", "dtype", "budget", "smartkv", "decay", "realloc_freq", "ablations")}
    evaluate_runs(params, runs, RESULTS["ablations"], "ablations", config)


if __name__ == "__main__":
    main()
