"""Stage `errors`: where SmartKV fails and its matched baseline does not, and the reverse.

Reads data/{baselines,peers,smartkv}.parquet (the `split` seeds) and writes
- data/errors.parquet: every prompt where exactly one side of a tested pair is right
  (`direction`: "smartkv fails" / "baseline fails"), with both predictions, the prompt's
  length and depth, and SmartKV's bits on the needle and the haystack;
- metrics/errors.json: per pair the discordant counts, per run the failure rate against
  length, depth and task (exact 95% CIs), and the needle's bits in successes and failures;
- plots/errors.{png,pdf}. See smartkv/analysis/errors.py for what is paired and why.
"""

from __future__ import annotations

import logging

from smartkv.study.params import stats_settings, study_split
from smartkv.study.labels import HEADLINE
from stages.common import DATA, METRICS, PLOTS, read_results, stage_main

log = logging.getLogger("stages.errors")
MAX_FIGURE_RUNS = 6  # bars per group stay readable


@stage_main
def main(params: dict) -> None:
    from smartkv.analysis import errors as err
    from smartkv.analysis.errors_figure import errors_figure
    from smartkv.io import atomic_write_json, atomic_write_parquet, provenance

    split = study_split(params)
    tolerance = stats_settings(params)["memory_tolerance"]
    df = read_results("baselines", "peers", "smartkv", split=split)
    matches = err.pairs(df, tolerance)
    paired = err.paired_outcomes(df, matches)
    flips = err.discordant(paired)
    targets = list(dict.fromkeys(matches["target"]))
    runs = ([HEADLINE] if HEADLINE in set(df["run"]) and HEADLINE not in targets else []) + targets
    strata = err.failure_strata(df, list(dict.fromkeys(runs + list(matches["baseline"]))))
    bits = err.needle_bits(df, runs)
    prov = provenance({"split": split, "memory_tolerance": tolerance})
    atomic_write_parquet(flips, DATA / "errors.parquet", prov)
    atomic_write_json(METRICS / "errors.json", err.errors_json(split, err.pair_counts(paired), strata, bits))
    errors_figure(strata, bits, runs[:MAX_FIGURE_RUNS], PLOTS / "errors")
    log.info("errors: %d pairs, %d discordant prompts (%d where SmartKV fails)", len(matches), len(flips),
             int((flips["direction"] == err.SMARTKV_FAILS).sum()) if len(flips) else 0)


if __name__ == "__main__":
    main()
