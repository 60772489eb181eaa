"""Run the study's stale stages one at a time, in dependency order, while a time budget allows.

    python scripts/run_cells.py --minutes 50 --commit   # `make cells MINUTES=50`
    python scripts/run_cells.py                         # `make repro`: every stale stage, no commits
    python scripts/run_cells.py --dry-run               # the plan: stages, estimated minutes, ETA

The model stages run cell by cell (smartkv/study/cells.py), so a stage here is usually one cell:
minutes of work. Before a stage starts, its cost is estimated from what the last run of that
stage measured (metrics/cell_costs.json: wall seconds and the machine's GFLOP/s, scaled to this
machine's), and it starts only if it ends inside the budget; otherwise the run stops there and
says what is left. A stage runs only when nothing upstream of it is stale. With `--commit`,
each finished stage's outputs, `dvc.lock` and its measured cost are committed at once, with a
message naming the stage: work stopped at any point keeps every stage that finished.

The machine's speed is a 2048x2048 float32 matmul's GFLOP/s on the threads torch uses.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COSTS = REPO / "metrics" / "cell_costs.json"
DEFAULT_MINUTES = {"model": 10.0, "other": 1.5}  # a stage never timed here: a model cell, or a cheap reader
MODEL_GROUPS = ("baselines", "smartkv", "extra_cells_baselines", "extra_cells_smartkv", "second_model_baselines",
                "second_model_smartkv", "passages_baselines", "passages_smartkv", "section_calibration", "peers",
                "peers_tuning", "passages_peers",
                "attention", "sensitivity", "profile")


def gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    n, start = 8, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048 ** 3 * n / (time.perf_counter() - start) / 1e9


def machine() -> str:
    sys.path.insert(0, str(REPO))
    from smartkv.io import machine_name

    return machine_name("cpu")


def plan() -> tuple[list[str], dict[str, set[str]], dict[str, list[str]]]:
    """(stale stages and everything downstream of them, dependencies first; each one's upstream
    stages; each one's output paths)."""
    import networkx as nx
    from dvc.repo import Repo

    repo = Repo(str(REPO))
    graph = repo.index.graph  # edges: stage -> a stage it depends on
    by_name = {s.addressing: s for s in graph.nodes}
    stale = set(repo.status())
    todo = set(stale)
    for name in stale:
        todo |= {s.addressing for s in nx.ancestors(graph, by_name[name])}  # what reads it
    # dependencies first; among stages that do not depend on each other, dvc.yaml's order (cells in
    # params' order)
    position = {s.addressing: i for i, s in enumerate(repo.index.stages)}
    ordered = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: position.get(s.addressing, 0))
    order = [s.addressing for s in ordered if s.addressing in todo]
    upstream = {n: {s.addressing for s in nx.descendants(graph, by_name[n])} for n in order}
    outs = {n: [str(Path(o.fs_path).relative_to(REPO)) for o in by_name[n].outs] for n in order}
    return order, upstream, outs


def estimate(name: str, costs: dict, speed: float) -> tuple[float, str]:
    """Minutes `name` should take here, and where the figure comes from."""
    group = name.split("@")[0]
    scale = lambda e: e["seconds"] / 60 * e["gflops"] / speed  # noqa: E731
    if name in costs:
        return scale(costs[name]), "measured"
    same = [scale(e) for n, e in costs.items() if n.split("@")[0] == group]
    if same:
        return sum(same) / len(same), f"mean of {len(same)} {group} cells"
    return DEFAULT_MINUTES["model" if group in MODEL_GROUPS else "other"], "default"


def dirty_code() -> list[str]:
    """Changed files other than what the pipeline itself writes (stages.common.PIPELINE_OUTPUTS)."""
    sys.path.insert(0, str(REPO))
    from stages.common import PIPELINE_OUTPUTS

    excluded = [f":(exclude){p}" for p in PIPELINE_OUTPUTS]
    out = subprocess.run(["git", "status", "--porcelain", "--", ".", *excluded], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return [line[3:] for line in out.splitlines()]


def fmt(minutes: float) -> str:
    return f"{minutes:.1f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=None, help="time budget (default: none, run everything stale)")
    ap.add_argument("--commit", action="store_true", help="commit each finished stage (needs committed code)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    ap.add_argument("--only", nargs="+", metavar="GLOB", default=None,
                    help="run only the stale stages whose names match (e.g. 'extra_cells_smartkv@niah-4096*')")
    args = ap.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        print(f"error: --minutes={args.minutes}: must be a positive number of minutes", file=sys.stderr)
        return 2
    if args.commit and dirty_code():
        print(f"error: --commit needs committed code, so every row records a clean revision; changed: "
              f"{', '.join(dirty_code()[:5])}", file=sys.stderr)
        return 2
    os.chdir(REPO)
    # the stages run as `python -m stages.X`: this interpreter's environment comes first on PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    speed = gflops()
    costs = json.loads(COSTS.read_text()) if COSTS.is_file() else {}
    order, upstream, outs = plan()
    if args.only:
        skipped = [n for n in order if not any(fnmatch.fnmatch(n, g) for g in args.only)]
        order = [n for n in order if n not in skipped]
        if skipped:
            print(f"--only: {len(skipped)} other stale stage(s) left for later")
    est = {n: estimate(n, costs, speed) for n in order}
    total = sum(m for m, _ in est.values())
    print(f"{len(order)} stage(s) to run, est. {fmt(total)} on this machine ({speed:.0f} GFLOP/s, {machine()})")
    if args.dry_run:
        for n in order:
            print(f"  {n:48s} {fmt(est[n][0]):>9s}  ({est[n][1]})")
        return 0
    start, done, left = time.perf_counter(), [], []
    for i, name in enumerate(order, 1):
        est[name] = minutes, source = estimate(name, costs, speed)  # the cells measured so far inform it
        elapsed = (time.perf_counter() - start) / 60
        if upstream[name] & (set(left) | (set(skipped) if args.only else set())):
            left.append(name)
            continue
        if args.minutes is not None and elapsed + minutes > args.minutes:
            print(f"[{i}/{len(order)}] {name}: est. {fmt(minutes)} ({source}) does not fit in the "
                  f"{fmt(args.minutes - elapsed)} left; stopping here")
            left.append(name)
            continue
        remaining = sum(est[n][0] for n in order[i - 1:] if n not in left)
        print(f"[{i}/{len(order)}] {name}: est. {fmt(minutes)} ({source}); study ETA {fmt(remaining)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=REPO, env=env)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"error: {name} failed (exit {proc.returncode}); finished before it: {', '.join(done) or 'none'}",
                  file=sys.stderr)
            return proc.returncode
        costs[name] = {"seconds": round(seconds, 1), "gflops": round(speed, 1), "machine": machine()}
        COSTS.write_text(json.dumps(dict(sorted(costs.items())), indent=2) + "\n")
        done.append(name)
        print(f"  {name} done in {fmt(seconds / 60)}", flush=True)
        if args.commit:
            paths = [p for p in [*outs[name], "dvc.lock", str(COSTS.relative_to(REPO))] if (REPO / p).exists()]
            subprocess.run(["git", "add", "--", *paths], cwd=REPO, check=True)
            msg = f"study cell {name}: re-run in {fmt(seconds / 60)} on {machine()} ({speed:.0f} GFLOP/s)"
            subprocess.run(["git", "commit", "-q", "-m", msg], cwd=REPO, check=True)
    print(f"ran {len(done)} stage(s) in {fmt((time.perf_counter() - start) / 60)}; "
          + (f"left stale: {len(left)} ({', '.join(left[:8])}{' ...' if len(left) > 8 else ''}), "
             f"est. {fmt(sum(est[n][0] for n in left))}" if left else "nothing left stale"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
