"""Why SmartKV does not beat INT3 on 4k-token needles: the ranking or the low tier?

The `extra_cells` stage measured SmartKV at INT3's bytes on 90 test needles of 4,096 tokens:
73/90 against INT3's 78/90 (9 / 14 discordant). This probe re-runs that cell with the committed
code and, from the same tracked prefill, variants of the same config at the same measured
budget, each changing one thing:

- `smartkv@int3`: the committed config again (also a cross-machine check of the committed rows);
- `oracle@int3`: importance from the whole FP16 generation, known up front (a perfect ranking
  of what decoding reads): if it closes the gap, the ranking is the bottleneck;
- `no-evict@int3` (widths 2, 3, 4, 8) and `no-2bit@int3` (0, 3, 4, 8): which part of the low
  tier costs, eviction or 2 bits;
- `rotated@int3`: the Hadamard key rotation, the issue's lever for a low tier that survives.

These are test seeds: the probe diagnoses, it chooses nothing (no default changes from it).

    python docs/probes/oracle_4k/probe.py write OUT.parquet     # ~30 min on 2 cores
    python docs/probes/oracle_4k/probe.py report OUT.parquet > docs/probes/oracle_4k/report.md
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from smartkv import matched_study as ms
from smartkv.io import atomic_write_parquet, read_parquet_with_meta
from smartkv.stats.multiplicity import holm
from smartkv.stats.paired import mcnemar_exact
from smartkv.study.driver import TIMING_COLUMNS, evaluate_runs
from smartkv.study.runs import smartkv_runs

TASK, LENGTH = "niah", 4096
MATCHED = "smartkv@int3"
VARIANTS = {  # label -> (params overridden, oracle)
    MATCHED: ({}, False),
    "oracle@int3": ({}, True),
    "no-evict@int3": ({"bits": [2, 3, 4, 8]}, False),
    "no-2bit@int3": ({"bits": [0, 3, 4, 8]}, False),
    "rotated@int3": ({"key_rotation": True}, False),
}
KEY = ["sample_id", "seed"]


def committed() -> pd.DataFrame:
    df = pd.read_parquet("data/extra_cells.parquet")
    return df[(df.task == TASK) & (df.context_length == LENGTH)]


def setup() -> tuple[dict, dict, dict, object]:
    """params.yaml, its extra_cells settings, the params the runs see, and the committed
    `smartkv@int3` spec at INT3's bytes measured in this cell (the probes' common start)."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    s = ms.settings(params, "extra_cells")
    sub = {**params, "model": s["model"]}
    old = committed()
    budget = float(old.loc[old.run == MATCHED, "budget"].iloc[0])
    spec = next(r for r in smartkv_runs(sub, {"int3": budget}) if r.label == MATCHED)
    return params, s, sub, spec


def evaluate(sub: dict, runs: list, rows: pd.DataFrame, meta: dict, split: str, desc: str) -> pd.DataFrame:
    """`runs` on the prompts `rows` as the stages evaluate them (one prefill per prompt), without
    the timing columns, sorted by run and prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.parquet"
        atomic_write_parquet(rows, path, meta)
        df = evaluate_runs(sub, runs, path, split=split, desc=desc)
    df = df.drop(columns=[c for c in df.columns if c in TIMING_COLUMNS])
    return df.sort_values(["run", *KEY]).reset_index(drop=True)


def write(out: str) -> None:
    params, s, sub, spec = setup()
    runs = [dataclasses.replace(spec, label=label, params={**spec.params, **over}, oracle=oracle)
            for label, (over, oracle) in VARIANTS.items()]
    tasks, meta = read_parquet_with_meta("data/extra_cells_tasks.parquet")
    cell = tasks[(tasks.task == TASK) & (tasks.context_length == LENGTH)]
    atomic_write_parquet(evaluate(sub, runs, cell, meta, "test", "oracle_4k"), Path(out), meta)


def discordant(t: pd.DataFrame, b: pd.DataFrame) -> tuple[int, int]:
    m = t.merge(b, on=KEY, suffixes=("_t", "_b"))
    return int(((m.score_t == 1) & (m.score_b == 0)).sum()), int(((m.score_t == 0) & (m.score_b == 1)).sum())


def report(path: str) -> None:
    new, old = pd.read_parquet(path), committed()
    int3 = old[old.run == "int3"]
    print(f"# 4k needles: ranking or low tier ({len(int3)} test prompts, niah@{LENGTH})\n")
    print("Committed rows (`data/extra_cells.parquet`):", ", ".join(
        f"`{r}` {int(old[old.run == r].score.sum())}/{len(old[old.run == r])}" for r in old.run.unique()))
    print("\nThe committed config re-run here against its committed rows:")
    m = new[new.run == MATCHED].merge(old[old.run == MATCHED], on=KEY, suffixes=("_n", "_o"))
    d = (m.answer_logprob_n - m.answer_logprob_o).abs()
    print(f"{int((m.score_n != m.score_o).sum())} of {len(m)} outcomes flipped; answer log-lik. max |delta| "
          f"{d.max():.3g}, mean {d.mean():.3g}.\n")
    rows = []
    for run in VARIANTS:
        r = new[new.run == run]
        t, b = discordant(r, int3)
        depth = r.groupby("depth").score.sum().astype(int)
        ok, bad = r[r.score == 1], r[r.score == 0]
        rows.append({"run": run, "correct": int(r.score.sum()), "n": len(r), "t": t, "b": b,
                     "p": mcnemar_exact(t, b), "ll": r.answer_logprob.mean(), "kl": r.kl_fp16.mean(),
                     "ratio": r.kv_ratio.mean(), "depth": " / ".join(str(v) for v in depth.values),
                     "needle_ok": ok.needle_bits.mean(), "needle_bad": bad.needle_bits.mean(),
                     "hay": r.haystack_bits.mean()})
    p_holm = holm([x["p"] for x in rows])
    print("Each run against committed INT3 (78/90) on the same prompts; Holm over the rows. "
          "Depths 0.1 / 0.3 / 0.5 / 0.7 / 0.9, 18 prompts each.\n")
    print("| run | correct | alone right / INT3 alone right | exact p | Holm p | answer log-lik. | KL from FP16 | "
          "kv_ratio | correct by depth | needle bits (right / wrong) | haystack median bits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x, ph in zip(rows, p_holm):
        print(f"| `{x['run']}` | {x['correct']}/{x['n']} | {x['t']} / {x['b']} | {x['p']:.3g} | {ph:.3g} | "
              f"{x['ll']:.3f} | {x['kl']:.4f} | {x['ratio']:.3f} | {x['depth']} | "
              f"{x['needle_ok']:.2f} / {x['needle_bad']:.2f} | {x['hay']:.2f} |")
    print(f"\n`int3` committed: answer log-lik. {int3.answer_logprob.mean():.3f}, KL {int3.kl_fp16.mean():.4f}, "
          f"correct by depth {' / '.join(str(v) for v in int3.groupby('depth').score.sum().astype(int).values)}.")
    wrong = new[(new.run == MATCHED) & (new.score == 0)]
    print(f"\n`{MATCHED}`'s wrong predictions here (teacher-forced argmax over the answer):",
          ", ".join(sorted(set(repr(p) for p in wrong.prediction))[:12]))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "report"):
        sys.exit("usage: probe.py write|report OUT.parquet")
    (write if sys.argv[1] == "write" else report)(sys.argv[2])
