"""Stage `sweeps`: the finished DVC experiments -> metrics/sweeps.json and plots/sweeps.{png,pdf}.

Experiments are not a file DVC can track, so this stage depends only on its code: run it
with `dvc repro --force sweeps` once the queue has finished (README, "Sweeps"). With no
experiments it writes a summary that says so.
"""

from __future__ import annotations

import logging

from smartkv.study.sweeps import dvc_experiments, finished, plot, summarize
from stages.common import METRICS, PLOTS, stage_main

log = logging.getLogger("stages.sweeps")


@stage_main
def main(params: dict) -> None:
    from smartkv.io import atomic_write_json

    summary = summarize(finished(dvc_experiments()), params)
    atomic_write_json(METRICS / "sweeps.json", summary)
    plot(summary, PLOTS / "sweeps")
    log.info("sweeps: %d experiments (%d on dev seeds)%s", summary["n_experiments"], summary["n_dev"],
             f"; {summary['note']}" if "note" in summary else "")


if __name__ == "__main__":
    main()
