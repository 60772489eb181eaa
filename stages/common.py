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
PEERS_FILE = DATA / "peers.parquet"
# The model stages' results, cell by cell (smartkv/study/cells.py): part -> the `cells` group that
# names its files, data/<part>/<cell>.parquet (wall clock: data/timings/<part>/<cell>.parquet).
# The peers (one kvpress process) still write one file.
CELL_PARTS = {"baselines": "main", "smartkv": "main", "ablations": "main",
              "extra_cells/baselines": "extra_cells", "extra_cells/smartkv": "extra_cells",
              "second_model/baselines": "second_model", "second_model/smartkv": "second_model",
              "passages/baselines": "passages", "passages/smartkv": "passages", "passages/peers": "passages"}
PARTS = (*CELL_PARTS, "peers")
TIMINGS_PEERS = DATA / "timings" / "peers.parquet"
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


def cell_arg() -> str:
    """A cell stage's one command-line argument: its cell's name (dvc.yaml passes `${item}`)."""
    from smartkv.study.params import ParamError

    if len(sys.argv) != 2:
        raise ParamError(f"usage: python -m {Path(sys.argv[0]).stem} <cell>: one cell name of params.yaml's `cells` "
                         f"list (got {sys.argv[1:]!r})")
    return sys.argv[1]


def cell_file(part: str, cell: str, timings: bool = False) -> Path:
    return (DATA / "timings" if timings else DATA) / part / f"{cell}.parquet"


def part_files(part: str, params: dict, timings: bool = False) -> list[Path]:
    """The files that hold a part's rows: one per cell listed in params, in the list's order."""
    from smartkv.study.cells import cell_list

    if part == "peers":
        return [TIMINGS_PEERS if timings else PEERS_FILE]
    return [cell_file(part, c.name, timings) for c in cell_list(params, CELL_PARTS[part])]


def section_cells(section: str, params: dict, parts: tuple[str, ...] = ("baselines", "smartkv")) -> tuple[list, list]:
    """(cells of `cells.<section>` every one of `parts` has written, the cells some part has not).

    A section lands cell by cell (`make cells`), and its readers may report the cells that have
    landed before the rest (`dvc repro --single-item section_tests@<section>`): they read the
    finished cells only and say which are missing, rather than fail or pair a half-run cell."""
    from smartkv.study.cells import cell_list

    done, missing = [], []
    for c in cell_list(params, section):
        (done if all(cell_file(f"{section}/{p}", c.name).is_file() for p in parts) else missing).append(c.name)
    return done, missing


def read_section(section: str, params: dict | None = None, parts: tuple[str, ...] = ("baselines", "smartkv")):
    """(the rows of the section's finished cells, the names of the cells not finished yet)."""
    from smartkv.study.driver import read_results as read
    from smartkv.study.params import ParamError

    params = load_params() if params is None else params
    done, missing = section_cells(section, params, parts)
    if not done:
        raise ParamError(f"no cell of `{section}` has finished every part ({', '.join(parts)}): run its cells first "
                         f"(`make cells ONLY='{section}_*'`)")
    return read([[cell_file(f"{section}/{p}", c) for c in done] for p in parts]), missing


def row_provenance(device: str = "cpu") -> dict[str, str]:
    """What made a results row: the code's revision, the machine, the torch build."""
    import torch

    from smartkv.io import machine_name

    return {"revision": last_code_revision(), "machine": machine_name(device), "torch": torch.__version__}


def last_code_revision() -> str:
    """The last commit that changed code or params (outputs excluded), "-dirty" when they differ from it.

    Not HEAD: a commit of outputs alone (`make cells` lands one per cell) changes no result, so a cell
    re-run after it reproduces its rows byte for byte."""
    import subprocess

    excluded = [f":(exclude){p}" for p in PIPELINE_OUTPUTS]
    try:
        rev = subprocess.run(["git", "log", "-1", "--format=%H", "--", ".", *excluded], capture_output=True,
                             text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return code_revision(rev) if rev else "unknown"


def write_results(df, part: str, cell: str, config: dict, device: str = "cpu") -> None:
    """One cell of a model stage: results (with their provenance per row) to data/<part>/<cell>.parquet,
    wall clock to data/timings/<part>/<cell>.parquet."""
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.study.driver import split_timings

    results, timings = split_timings(df)
    results = results.assign(**row_provenance(device))
    prov = provenance(config | {"cell": cell})
    atomic_write_parquet(results, cell_file(part, cell), prov)
    atomic_write_parquet(timings, cell_file(part, cell, timings=True), prov)
    log.info("wrote %s: %d rows (%d runs); timings in %s", cell_file(part, cell), len(results),
             results["run"].nunique() if len(results) else 0, cell_file(part, cell, timings=True))


def read_results(*parts: str, split: str | None = None, params: dict | None = None):
    """Per-sample results of the named parts (the union of their cells), on one split's seeds."""
    from smartkv.study.driver import read_results as read

    from smartkv.study.params import ParamError

    params = load_params() if params is None else params
    files = [part_files(p, params) for p in parts]
    missing = [f for fs in files for f in fs if not f.is_file()]
    if missing:
        raise ParamError(f"{len(missing)} cell file(s) not written yet, e.g. {missing[0]}: run the stages that write "
                         "them first (`dvc repro`, or `dvc status` to see which)")
    return read(files, split)


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
