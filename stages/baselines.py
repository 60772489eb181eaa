"""Stage `baselines`: FP16, uniform INTk, KIVI and transformers' QuantizedCache on every task.

-> data/baselines.parquet (one row per run x sample: prediction, score, measured KV bytes, latency).
"""

from __future__ import annotations

from stages.common import RESULTS, baseline_runs, evaluate_runs, get, model_settings, stage_main


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    runs = baseline_runs(params)
    config = {k: get(params, k) for k in ("model", "dtype", "baselines")}
    evaluate_runs(params, runs, RESULTS["baselines"], "baselines", config)


if __name__ == "__main__":
    main()
