"""Stage `smartkv_metrics`: per-run means of the smartkv cells -> metrics/smartkv.json.

What `dvc exp show` and the sweeps summary read for an experiment. A stage of its own (not the
stats stage) so that a sweep, `dvc exp run --queue -S ... smartkv_metrics`, runs the smartkv cells
it changes and this summary of them, and nothing else.
"""

from __future__ import annotations

from smartkv.study.driver import run_metrics
from smartkv.study.params import study_split
from stages.common import METRICS, read_results, stage_main


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json

    atomic_write_json(METRICS / "smartkv.json", run_metrics(read_results("smartkv", split=study_split(params),
                                                                        params=params)))


if __name__ == "__main__":
    main()
