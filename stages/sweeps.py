"""Stage `sweeps`: the finished DVC experiments -> metrics/sweeps.json and plots/sweeps.{png,pdf}.

Experiments are not a file DVC can track, so this stage depends only on its code: run it
with `dvc repro --force sweeps` once the queue has finished (docs/study.md, "Sweeps"). Its summary
is `persist: true` and keeps every experiment it recorded before (experiment refs stay on
the machine that ran them; the summary travels in git). With no experiments it says so.
"""

from __future__ import annotations

import logging

from smartkv.sweeps import dvc_experiments, finished, git_rows, plot, summarize
from stages.common import METRICS, PLOTS, stage_main

log = logging.getLogger("stages.sweeps")


def merged(recorded: list[dict], found: list[dict]) -> list[dict]:
    """The experiments the summary recorded before, plus those found now (a rev found now wins).

    Experiments live in local git refs (`refs/exps`), which a clone does not fetch: without this,
    re-running the stage on a clone (or after `dvc exp remove`) would forget every sweep it had
    summarized. The summary file is the record that travels with the repository."""
    by_rev = {e["rev"]: e for e in recorded if isinstance(e, dict) and "rev" in e}
    by_rev.update({e["rev"]: e for e in found})
    return sorted(by_rev.values(), key=lambda e: (e["name"], e["rev"]))


@stage_main
def main(params: dict) -> None:
    import json

    from smartkv.io import atomic_write_json

    path = METRICS / "sweeps.json"
    recorded = json.loads(path.read_text()).get("experiments", []) if path.is_file() else []
    summary = summarize(merged(recorded, finished(dvc_experiments(), git_rows())), params)
    atomic_write_json(path, summary)
    plot(summary, PLOTS / "sweeps")
    log.info("sweeps: %d experiments (%d on dev seeds)%s", summary["n_experiments"], summary["n_dev"],
             f"; {summary['note']}" if "note" in summary else "")


if __name__ == "__main__":
    main()
