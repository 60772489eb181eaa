"""Evaluate runs on the prepared task sets: one prefill per sample, shared by the runs.

Results and timings are kept apart. A results frame holds only what the same code and
data reproduce bit for bit on one machine (predictions, scores, bytes), so the hash DVC
records for it depends on content alone; wall-clock columns go to a timings frame, which
only the `latency` stage reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # the kvpress peers stage reads tasks with this module under another transformers
    from smartkv.runner import RunSpec

from smartkv.study.cells import Cell
from smartkv.study.params import ParamError, model_settings, placement
from smartkv.study.labels import matched_baseline

log = logging.getLogger(__name__)

# Decay of the shared prefill's importance tracker for runs that track no attention (every
# baseline): nothing reads it, so it is a constant, not a param dependency.
BASELINE_DECAY = 0.9
# Wall-clock columns of `smartkv.evaluate.evaluate`'s rows: they differ on every run.
TIMING_COLUMNS = ("prefill_s", "fork_s", "forced_s", "reference_s", "decode_s", "tokens_per_s")
# What identifies a row, repeated in the timings frame so it can be joined back.
ROW_KEYS = ("run", "method", "family", "split", "task", "sample_id", "seed", "context_length", "new_tokens")


def read_tasks(path: str | Path, split: str | None = None) -> dict[int, list]:
    """Prepared samples per seed (of one split, or all)."""
    from smartkv.io import read_parquet_with_meta
    from smartkv.tasks.sample import Sample

    if not Path(path).is_file():
        raise ParamError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    df, _ = read_parquet_with_meta(path)
    if split is not None:
        df = df[df["split"] == split]
    out: dict[int, list] = {}
    for row in df.to_dict("records"):
        out.setdefault(int(row["seed"]), []).append(Sample.from_row(row))
    return out


def split_of_seeds(path: str | Path) -> dict[int, str]:
    from smartkv.io import read_parquet_with_meta

    df, _ = read_parquet_with_meta(path)
    return {int(s): str(sp) for s, sp in df.groupby("seed")["split"].first().items()}


def evaluate_runs(params: dict, runs: list[RunSpec], tasks_file: str | Path, split: str | None,
                  desc: str, seeds: list[int] | None = None,
                  run_seeds: dict[str, list[int]] | None = None, cell: Cell | None = None) -> pd.DataFrame:
    """Every run on every prepared sample of `split` (None: every seed), seed by seed; only
    `seeds` of them when given, only `cell`'s prompts when given (smartkv/study/cells.py), and a
    run named in `run_seeds` only on its seeds there.

    One row per (run, sample, seed), in a stable order (seed, task, sample, run order);
    with the timing columns, which `split_timings` takes apart before writing.
    """
    import torch
    from tqdm.auto import tqdm

    from smartkv.evaluate import evaluate
    from smartkv.models import load_model
    from smartkv.study.runs import with_seed  # here, not at the top: the result readers import this module

    model_name, dtype = model_settings(params)
    tasks = read_tasks(tasks_file, split)
    if seeds is not None:
        tasks = {s: v for s, v in tasks.items() if s in seeds}
    if not tasks:
        raise ParamError(f"{tasks_file} has no samples for split {split!r}: re-run the prepare stage")
    if cell is not None:
        mine = cell.take([(seed, x) for seed, v in sorted(tasks.items()) for x in v], sample=lambda p: p[1])
        if not mine:  # a split with fewer prompts than shards (a dev sweep): this shard holds none
            log.warning("cell %s has no prompts of split %s in %s: it writes no rows", cell.name, split, tasks_file)
            return pd.DataFrame(columns=[*ROW_KEYS, "error", "matched_to"])
        tasks = {}
        for seed, x in mine:
            tasks.setdefault(seed, []).append(x)
    splits = split_of_seeds(tasks_file)
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, dtype=dtype, **placement(params))
    # Runs that track attention must share the prefill's decay and observation window: one
    # evaluate (one prefill per sample) per (decay, obs_window).
    groups = []
    for seed, samples in sorted(tasks.items()):
        by_tracking: dict[tuple, list] = {}
        for r in (with_seed(r, seed) for r in runs if seed in (run_seeds or {}).get(r.label, [seed])):
            cfg = r.config()
            key = (float(getattr(cfg, "decay", BASELINE_DECAY)), getattr(cfg, "obs_window", None))
            by_tracking.setdefault(key, []).append(r)
        # A run tied to one cell of the grid (matched per task and length) sees only that cell's samples.
        cells = sorted({(s.task, int(s.context_length)) for s in samples})
        for key, group in by_tracking.items():
            for task, length in cells:
                at = [r for r in group if r.applies_to(task, length)]
                mine = [s for s in samples if s.task == task and int(s.context_length) == length]
                missing = {r.label for r in group if r.context_length is not None} - {r.label for r in at}
                if missing:
                    log.warning("no matched budget for %s at %d tokens for %s: those runs skip its %d samples",
                                task, length, ", ".join(sorted(missing)), len(mine))
                if at:
                    groups.append((seed, mine, key[0], at))
    # One bar over the whole stage (its ETA is the stage's); evaluate's own bar shows the group.
    total = tqdm(total=sum(len(s) * len(g) for _, s, _, g in groups), desc=f"{desc} (all seeds)", unit="run",
                 position=0)
    frames = []
    for i, (seed, samples, decay, group) in enumerate(groups):
        frames.append(evaluate(model, tokenizer, samples, group, seed=seed, decay=decay,
                               desc=f"{desc} seed {seed} [{i + 1}/{len(groups)}]"))
        total.update(len(samples) * len(group))
    total.close()
    df = pd.concat(frames, ignore_index=True)
    df["split"] = df["seed"].map(splits)
    df["matched_to"] = df["run"].map(matched_baseline)
    order = {r.label: i for i, r in enumerate(runs)}
    df = df.sort_values(["seed", "task", "sample_id", "run"], key=lambda s: s.map(order) if s.name == "run" else s,
                        kind="stable").reset_index(drop=True)
    errors = df[df["error"] != ""]
    if len(errors):
        log.warning("%d of %d rows below their budget's floor (score NaN): %s", len(errors), len(df),
                    ", ".join(sorted(set(errors["run"]))))
    return df


def split_timings(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results without wall-clock columns, timings keyed by ROW_KEYS)."""
    timing = [c for c in TIMING_COLUMNS if c in df.columns]
    keys = [c for c in ROW_KEYS if c in df.columns]
    return df.drop(columns=timing), df[keys + timing].copy()


def read_cells(paths: list[str | Path]) -> pd.DataFrame:
    """One stage's rows from the files of its cells: each is sorted (seed, task, sample, run order)
    and the cells partition the prompts, so a stable sort on (seed, task, sample) of their union is
    the order one stage-wide run writes."""
    from smartkv.io import read_parquet_with_meta

    frames = [read_parquet_with_meta(p)[0] for p in paths]
    # a shard without prompts (a split smaller than the cell list) adds no rows, and no dtypes either
    frames = [f for f in frames if len(f)] or frames[:1]
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["seed", "task", "sample_id"], kind="stable").reset_index(drop=True)


def read_results(stages: list[list[str | Path]], split: str | None = None) -> pd.DataFrame:
    """Per-sample results of several stages (each given as its cell files, or one file), one
    stage after the other, restricted to one split's seeds."""
    df = pd.concat([read_cells(files) for files in stages], ignore_index=True)
    return df if split is None else df[df["split"] == split].reset_index(drop=True)


def run_metrics(df: pd.DataFrame) -> dict:
    """{"runs": {label: {score_mean, kv_ratio, n_prompts, n_errors, nll_mean}}}: per-prompt means
    of one stage's rows, for `dvc exp show` and the sweeps summary (the stats stage does the rest)."""
    out = {}
    for run, g in df.groupby("run", sort=False):
        ok = g[g["error"] == ""]
        scored = ok[ok["metric"] != "perplexity"]["score"].dropna()
        nll = ok["nll"].dropna() if "nll" in ok else pd.Series(dtype=float)
        m = {"score_mean": float(scored.mean()) if len(scored) else None,
             "kv_ratio": float(ok["kv_ratio"].mean()) if len(ok) else None,
             "n_prompts": int(len(scored)), "n_errors": int(len(g) - len(ok)),
             "nll_mean": float(nll.mean()) if len(nll) else None}
        out[str(run)] = {k: v for k, v in m.items() if v is not None}
    return {"runs": out}
