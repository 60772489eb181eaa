"""Stage `baselines@<cell>`: FP16, uniform INTk, KIVI and transformers' QuantizedCache on one cell.

`python -m stages.baselines <cell>`, one DVC stage per cell of `cells.main` (dvc.yaml foreach;
smartkv/study/cells.py). Runs on the dev and the test seeds alike, so that neither a sweep on
dev seeds nor the study on test seeds ever re-runs it. -> data/baselines/<cell>.parquet (one row
per run x sample: prediction, score, measured KV bytes, and the revision, machine and torch that
made it) and data/timings/baselines/<cell>.parquet (wall clock).
"""

from __future__ import annotations

from smartkv.study import get
from smartkv.study.cells import find
from smartkv.study.driver import evaluate_runs
from smartkv.study.params import device_setting, model_settings
from smartkv.study.runs import baseline_runs
from stages.common import TASKS_FILE, cell_arg, stage_main, write_results


@stage_main
def main(params: dict) -> None:
    model_settings(params)
    cell = find(params, "main", cell_arg())
    runs = baseline_runs(params)
    df = evaluate_runs(params, runs, TASKS_FILE, split=None, desc=f"baselines {cell.name}", cell=cell)
    write_results(df, "baselines", cell.name, {k: get(params, k) for k in ("model", "dtype", "baselines")},
                  device_setting(params))


if __name__ == "__main__":
    main()
