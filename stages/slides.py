"""Stage `slides`: the talk (12 slides, and one per comparison on the independent prompts), slides.pdf
at the repository root, from the study's results.

Reads what the `report` stage reads (summaries, tests, metrics, the PNGs in plots/) and
words the same findings (smartkv/report/findings.py); the PDF carries no creation date.
"""

from __future__ import annotations

import logging
from pathlib import Path

from smartkv.study.labels import HEADLINE
from stages.common import DATA, METRICS, PLOTS, stage_main
from stages.report import setup

log = logging.getLogger("stages.slides")
SLIDES = Path("slides.pdf")


@stage_main
def main(params: dict) -> None:
    from smartkv.io import read_parquet_with_meta
    from smartkv.report.findings import METRIC_FILES, load_metrics
    from smartkv.report.slides import render_slides

    summary, _ = read_parquet_with_meta(DATA / "summary.parquet")
    tests, _ = read_parquet_with_meta(DATA / "tests.parquet")
    abl_tests, _ = read_parquet_with_meta(DATA / "ablation_tests.parquet")
    n = int(summary[summary["run"] == HEADLINE]["n_samples"].sum()) if len(summary) else 0
    # the matched-comparison stages feed the limitations slide, as they feed REPORT's
    metrics = load_metrics(METRICS, METRIC_FILES + ("second_model", "extra_cells", "passages", "passages_calibration", "cells"))
    render_slides(summary, tests, abl_tests, metrics, setup(params, n), PLOTS, SLIDES)
    log.info("wrote %s", SLIDES)


if __name__ == "__main__":
    main()
