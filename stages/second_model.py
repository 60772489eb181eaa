"""Stage `second_model`: the headline comparisons on a second model family (default Gemma-3-270M).

Its own needle prompts (its tokenizer), FP16 and the `second_model.runs` baselines, each
`second_model.match` baseline's bytes measured per cell, SmartKV at exactly those bytes, exact
McNemar with Holm (smartkv/matched_study.py). -> data/second_model_tasks.parquet,
data/second_model.parquet (+ data/timings/second_model.parquet), metrics/second_model.json,
metrics/second_model_table.md.
"""

from __future__ import annotations

from stages.common import stage_main
from stages.matched_stage import run_section


@stage_main
def main(params: dict) -> None:
    run_section(params, "second_model")


if __name__ == "__main__":
    main()
