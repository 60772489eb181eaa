"""Stage `extra_cells`: the headline comparisons on the cells the main grid leaves out for time.

The main model on 4k-token needles and RULER multikey (params `extra_cells`): FP16 and the
`extra_cells.runs` baselines, each `extra_cells.match` baseline's bytes measured per cell,
SmartKV at exactly those bytes, exact McNemar with Holm (smartkv/matched_study.py).
-> data/extra_cells_tasks.parquet, data/extra_cells.parquet (+ data/timings/extra_cells.parquet),
metrics/extra_cells.json, metrics/extra_cells_table.md.
"""

from __future__ import annotations

from stages.common import stage_main
from stages.matched_stage import run_section


@stage_main
def main(params: dict) -> None:
    run_section(params, "extra_cells")


if __name__ == "__main__":
    main()
