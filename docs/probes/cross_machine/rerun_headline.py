"""Re-run the headline comparisons' runs on every test needle prompt with the committed code, on
the machine at hand, and compare them with the committed rows: how far float noise across
machines moves the study's headline verdicts.

    python docs/probes/cross_machine/rerun_headline.py write OUT.parquet
    python docs/probes/cross_machine/rerun_headline.py compare OUT.parquet > report.md

`write` evaluates, as the stages do (the baselines from an untracked prefill, the SmartKV runs
from the smartkv stage's tracked one, `static-cumulative` with them so that the prefill tracks
every row as it does there), INT3, KIVI-2 and SmartKV at their committed matched bytes on the
210 test needle prompts. `compare` reports per run the flips against the committed rows and
the |delta| of the answer log-likelihood, then the exact McNemar of each headline pair on the
committed rows, on the re-run rows, and with each side from a different machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from smartkv.io import atomic_write_parquet, read_parquet_with_meta
from smartkv.stats.paired import mcnemar_exact
from smartkv.study.driver import TIMING_COLUMNS, evaluate_runs
from smartkv.study.match import budgets
from smartkv.study.runs import ablation_runs, baseline_runs, smartkv_runs

PAIRS = [("smartkv@int3", "int3"), ("smartkv@kivi-2", "kivi-2")]
KEY = ["run", "sample_id", "seed"]


def write(out: str) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    tasks, meta = read_parquet_with_meta("data/tasks.parquet")
    needles = tasks[(tasks.split == "test") & (tasks.task == "niah")]
    matched = budgets(json.loads(Path("metrics/matched_budgets.json").read_text()), "test")
    base = [r for r in baseline_runs(params) if r.label in {b for _, b in PAIRS}]
    ours = [r for r in smartkv_runs(params, matched) if r.label in {t for t, _ in PAIRS}]
    ours += [r for r in ablation_runs(params) if r.label == "static-cumulative"]
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.parquet"
        atomic_write_parquet(needles, path, meta)
        for stage, runs in (("baselines", base), ("smartkv", ours)):
            df = evaluate_runs(params, runs, path, split="test", desc=stage)
            frames.append(df.drop(columns=[c for c in df.columns if c in TIMING_COLUMNS]).assign(stage=stage))
    pd.concat(frames).sort_values(KEY).reset_index(drop=True).to_parquet(out)


def committed() -> pd.DataFrame:
    parts = [pd.read_parquet(f"data/{name}.parquet") for name in ("baselines", "smartkv", "ablations")]
    df = pd.concat(parts, ignore_index=True)
    return df[(df["split"] == "test") & (df["task"] == "niah")]


def discordant(t: pd.DataFrame, b: pd.DataFrame) -> tuple[int, int]:
    m = t.merge(b, on=["sample_id", "seed"], suffixes=("_t", "_b"))
    return int(((m.score_t == 1) & (m.score_b == 0)).sum()), int(((m.score_t == 0) & (m.score_b == 1)).sum())


def compare(path: str) -> None:
    new, old = pd.read_parquet(path), committed()
    print("| run | prompts | flips (to right / to wrong) | answer log-lik. max abs delta | mean abs delta | kv_ratio max abs delta |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in new["run"].unique():
        m = new[new.run == run].merge(old[old.run == run], on=["sample_id", "seed"], suffixes=("_n", "_o"))
        d = (m.answer_logprob_n - m.answer_logprob_o).abs()
        up, down = int((m.score_n > m.score_o).sum()), int((m.score_n < m.score_o).sum())
        print(f"| {run} | {len(m)} | {up + down} ({up} / {down}) | {d.max():.3g} | {d.mean():.3g} | "
              f"{(m.kv_ratio_n - m.kv_ratio_o).abs().max():.3g} |")
    print()
    print("| SmartKV | baseline | rows | discordant t / b | exact McNemar p |")
    print("| --- | --- | --- | --- | --- |")
    for t, b in PAIRS:
        for label, tt, bb in (("committed", old, old), ("re-run", new, new),
                              ("SmartKV re-run, baseline committed", new, old),
                              ("SmartKV committed, baseline re-run", old, new)):
            nt, nb = discordant(tt[tt.run == t], bb[bb.run == b])
            print(f"| {t} | {b} | {label} | {nt} / {nb} | {mcnemar_exact(nt, nb):.3g} |")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        compare(sys.argv[2])
