"""What every DVC stage shares: the entry point (logging, params, exit codes) and file paths.

Every stage is `python -m stages.<name>` from the repository root. It reads `params.yaml`
through `smartkv.study`, which validates everything before any model work; a bad value
stops the stage with one line naming the key (`error: params.yaml: <key>: <why>`) and exit
status 2. Outputs go through `smartkv.io`'s atomic writers, so a failed stage leaves no
half file. Results and their timings are written apart (see `write_results`).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from smartkv.study.params import PARAMS_FILE, load_params

DATA = Path("data")
METRICS = Path("metrics")
PLOTS = Path("plots")
TASKS_FILE = DATA / "tasks.parquet"
RESULTS = {"baselines": DATA / "baselines.parquet", "peers": DATA / "peers.parquet",
           "smartkv": DATA / "smartkv.parquet", "ablations": DATA / "ablations.parquet"}
# Wall-clock timings of the model stages: run-varying, read only by the `latency` stage.
TIMINGS = {name: DATA / "timings" / f"{name}.parquet" for name in RESULTS}
MATCHED_BUDGETS = METRICS / "matched_budgets.json"

log = logging.getLogger("stages")


def stage_main(fn: Callable[[dict], None]) -> Callable[[], None]:
    """Wrap a stage's `main(params)`: logging, params loading, one-line errors with exit 2."""

    @functools.wraps(fn)
    def run() -> None:
        logging.basicConfig(level=os.environ.get("SMARTKV_LOG", "INFO"),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
        from smartkv.errors import ConfigError  # ParamError is one too

        name = Path(sys.argv[0]).stem if fn.__module__ == "__main__" else fn.__module__.rsplit(".", 1)[-1]
        start = time.perf_counter()
        try:
            fn(load_params())
            log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
        except ConfigError as err:
            print(f"error: {PARAMS_FILE}: {err}", file=sys.stderr)
            sys.exit(2)

    return run


def write_results(df, stage: str, config: dict) -> None:
    """A model stage's rows: results to data/<stage>.parquet, wall clock to data/timings/."""
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.study.driver import split_timings

    results, timings = split_timings(df)
    prov = provenance(config)
    atomic_write_parquet(results, RESULTS[stage], prov)
    atomic_write_parquet(timings, TIMINGS[stage], prov)
    log.info("wrote %s: %d rows (%d runs); timings in %s", RESULTS[stage], len(results),
             results["run"].nunique(), TIMINGS[stage])


def read_results(*names: str, split: str | None = None):
    """Per-sample results of the named model stages, on one split's seeds."""
    from smartkv.study.driver import read_results as read

    return read([RESULTS[n] for n in names], split)


# What `dvc repro` itself rewrites before this stage runs: not a change to the code or params
# that made the results, so it does not make the revision "-dirty".
PIPELINE_OUTPUTS = ("data", "metrics", "plots", "dvc.lock", "REPORT.md", "slides.pdf")


def code_revision(revision: str) -> str:
    """HEAD, marked "-dirty" only when code or params differ from it (outputs excluded)."""
    import subprocess

    rev = revision.removesuffix("-dirty")
    if rev == "unknown":
        return rev
    excluded = [f":(exclude){p}" for p in PIPELINE_OUTPUTS]
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", *excluded], capture_output=True,
                               text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return revision
    return rev + ("-dirty" if dirty else "")
