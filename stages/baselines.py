"""Stage `baselines`: FP16, uniform INTk, KIVI and transformers' QuantizedCache on every task.

Runs on the dev and the test seeds alike, so that neither a sweep on dev seeds nor the
study on test seeds ever re-runs it. -> data/baselines.parquet (one row per run x sample:
prediction, score, measured KV bytes) and data/timings/baselines.parquet (wall clock).
"""

from __future__ import annotations

from smartkv.study import get
from smartkv.study.driver import evaluate_runs
from smartkv.study.params import model_settings
from smartkv.study.runs import baseline_runs
from stages.common import TASKS_FILE, stage_main, write_results


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    runs = baseline_runs(params)
    df = evaluate_runs(params, runs, TASKS_FILE, split=None, desc="baselines")
    write_results(df, "baselines", {k: get(params, k) for k in ("model", "dtype", "baselines")})


if __name__ == "__main__":
    main()
