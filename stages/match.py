"""Stage `match`: each baseline in `match` measured on the task set -> metrics/matched_budgets.json.

`{split: {label: {kv_ratio, kv_ratio_min, kv_ratio_max, n_prompts}}}`; the smartkv stage
runs `smartkv@<label>` at exactly that `kv_ratio` on its split.
"""

from __future__ import annotations

from smartkv.study.match import measure
from smartkv.study.runs import match_labels
from stages.common import MATCHED_BUDGETS, read_results, stage_main


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json

    labels = match_labels(params)
    atomic_write_json(MATCHED_BUDGETS, measure(read_results("baselines"), labels))


if __name__ == "__main__":
    main()
