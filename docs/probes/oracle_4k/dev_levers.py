"""Which importance signal ranks 4k-token needles as the oracle does? Chosen on a dev seed.

`probe.py` showed on the test needles at 4k that the oracle ranking (importance from the whole
FP16 generation) answers 90/90 at INT3's bytes where the committed config answers 73/90, and
that the low tier is not in play there (dropping eviction or the 2-bit width changes nothing:
no token goes below 3 bits at 0.25). So the ranking is the bottleneck. This probe tries the
ranking levers `SmartKVConfig` has, on dev seed 100 only (30 fresh 4k needles: 6 per depth),
at the same budget, from one tracked prefill:

- `default`: the committed config (signal ema, prior 0.5, pool 1, per layer);
- `prior-0.25`, `prior-0`: less of the uniform prior mixed into the EMA;
- `window`, `window-pool5`: SnapKV's observation window of the prompt's last 64 queries
  (pooled over 5 neighbours as kvpress's SnapKVPress), then the EMA over decode queries;
- `per-head`: importance and allocation per KV head (AdaKV-style) instead of per layer;
- `rotated`: the Hadamard key rotation (a low-tier lever, kept as a control);
- `normalized`: ZipCache's accumulated attention over the number of queries that saw the token,
  added to the same rows afterwards with `add normalized` (the pick is re-read with it).

The rule, fixed before the run: the variant with the most needles found, ties broken by the
mean answer log-likelihood, is the pick. Its test-seed figure is not re-run here: probe.py
already ran `rotated@int3` on the 90 test needles (before this pick, so it is a diagnosis, not
a confirmation). Nothing here changes a default.

    python docs/probes/oracle_4k/dev_levers.py write docs/probes/oracle_4k/dev_rows.parquet
    python docs/probes/oracle_4k/dev_levers.py add docs/probes/oracle_4k/dev_rows.parquet normalized
    python docs/probes/oracle_4k/dev_levers.py report docs/probes/oracle_4k/dev_rows.parquet
    python docs/probes/oracle_4k/dev_levers.py main-dev docs/probes/oracle_4k/dev_rows.parquet docs/probes/oracle_4k/main_dev_rows.parquet > docs/probes/oracle_4k/main_dev_report.md

`main-dev` puts the chosen lever beside the default on the main grid's dev needles (seed 100, 30
at 1k and 5 at 2k, `data/tasks.parquet`), at the headline budget: a default must not buy 4k by
losing the lengths the main study runs. Dev seeds, so it may inform a default; it reports no result.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd

from smartkv.io import atomic_write_parquet, read_parquet_with_meta
from smartkv.models import load_tokenizer
from smartkv.stats.paired import mcnemar_exact
from smartkv.study.grid import task_plan, task_samples

sys.path.insert(0, str(Path(__file__).parent))
from probe import KEY, LENGTH, TASK, discordant, evaluate, setup  # noqa: E402

DEV_SEED, PER_DEPTH = 100, 6
LEVERS = {
    "default": {},
    "prior-0.25": {"prior": 0.25},
    "prior-0": {"prior": 0.0},
    "window": {"signal": "window"},
    "window-pool5": {"signal": "window", "pool": 5},
    "per-head": {"granularity": "head"},
    "rotated": {"key_rotation": True},
    "normalized": {"signal": "normalized"},  # added after the first seven ran (`add`): it was not in the first batch
}


def dev_tasks(params: dict, s: dict) -> pd.DataFrame:
    """The dev needles: seed 100, `PER_DEPTH` per depth, the extra_cells niah layout at 4k."""
    niah = params["extra_cells"]["tasks"][TASK]
    plan = task_plan({"tasks": {TASK: {**niah, "lengths": [LENGTH], "n_per_cell": PER_DEPTH}},
                      "max_new_tokens": params["max_new_tokens"], "longbench": {"enabled": False}})
    tokenizer = load_tokenizer(s["model"])
    return pd.DataFrame([{**x.to_row(), "seed": DEV_SEED, "split": "dev"}
                         for t in plan for x in task_samples(t, tokenizer, DEV_SEED)])


def add(path: str, labels: list[str]) -> None:
    """Evaluate more `LEVERS` on the same dev needles and add their rows to `path`."""
    params, s, sub, spec = setup()
    old = pd.read_parquet(path)
    unknown = [x for x in labels if x not in LEVERS or x in set(old["run"])]
    if unknown:
        sys.exit(f"add: {unknown} are not new labels of LEVERS ({', '.join(LEVERS)})")
    _, meta = read_parquet_with_meta("data/extra_cells_tasks.parquet")
    runs = [dataclasses.replace(spec, label=k, params={**spec.params, **LEVERS[k]}) for k in labels]
    new = evaluate(sub, runs, dev_tasks(params, s), meta, "dev", "levers")
    both = pd.concat([old, new], ignore_index=True).sort_values(["run", *KEY]).reset_index(drop=True)
    atomic_write_parquet(both, Path(path), meta)


def write(out: str) -> None:
    params, s, sub, spec = setup()
    rows = dev_tasks(params, s)
    _, meta = read_parquet_with_meta("data/extra_cells_tasks.parquet")
    runs = [dataclasses.replace(spec, label=k, params={**spec.params, **v}) for k, v in LEVERS.items()]
    atomic_write_parquet(evaluate(sub, runs, rows, meta, "dev", "levers"), Path(out), meta)


def chosen(dev: pd.DataFrame) -> str:
    g = dev.groupby("run").agg(correct=("score", "sum"), ll=("answer_logprob", "mean"))
    return g.sort_values(["correct", "ll"], ascending=False).index[0]


def dev_table(dev: pd.DataFrame, labels) -> None:
    """The dev rows' table: each of `labels` (in that order, those present) against `default`."""
    print("| run | correct | correct by depth (0.1 / 0.3 / 0.5 / 0.7 / 0.9) | answer log-lik. | KL from FP16 | "
          "kv_ratio | needle bits | vs default: alone right / default alone right, exact p |")
    print("|---|---|---|---|---|---|---|---|")
    base = dev[dev.run == "default"]
    for run in [x for x in labels if x in set(dev["run"])]:
        r = dev[dev.run == run]
        t, b = discordant(r, base)
        depth = " / ".join(str(v) for v in r.groupby("depth").score.sum().astype(int).values)
        print(f"| `{run}` | {int(r.score.sum())}/{len(r)} | {depth} | {r.answer_logprob.mean():.3f} | "
              f"{r.kl_fp16.mean():.4f} | {r.kv_ratio.mean():.3f} | {r.needle_bits.mean():.2f} | "
              f"{t} / {b}, {mcnemar_exact(t, b):.3g} |")


def report(path: str) -> None:
    dev = pd.read_parquet(path)
    print(f"# Ranking levers at 4k on dev seed {DEV_SEED} ({dev.sample_id.nunique()} needles, INT3's bytes)\n")
    dev_table(dev, LEVERS)
    print(f"\nChosen by the rule (most found, then answer log-lik.): `{chosen(dev)}`.")


def main_dev(dev_path: str, out: str) -> None:
    params, s, sub, spec = setup()
    pick = chosen(pd.read_parquet(dev_path))
    from smartkv.study.runs import headline_run

    head = headline_run(params)
    runs = [head, dataclasses.replace(head, label=pick, params={**head.params, **LEVERS[pick]})]
    tasks, meta = read_parquet_with_meta("data/tasks.parquet")
    rows = tasks[(tasks.split == "dev") & (tasks.task == TASK)]
    new = evaluate(params, runs, rows, meta, "dev", "levers")
    atomic_write_parquet(new, Path(out), meta)
    base = new[new.run == head.label]
    print(f"# `{pick}` beside the default on the main grid's dev needles (seed {DEV_SEED}, budget "
          f"{head.params['budget']})\n")
    print("| run | found (1k / 2k) | answer log-lik. | KL from FP16 | kv_ratio | vs default: alone right / default alone right, exact p |")
    print("|---|---|---|---|---|---|")
    for label in (head.label, pick):
        r = new[new.run == label]
        t, b = discordant(r, base)
        by = " / ".join(str(int(v)) for v in r.groupby("context_length").score.sum().values)
        print(f"| `{label}` | {int(r.score.sum())}/{len(r)} ({by}) | {r.answer_logprob.mean():.3f} | "
              f"{r.kl_fp16.mean():.4f} | {r.kv_ratio.mean():.3f} | {t} / {b}, {mcnemar_exact(t, b):.3g} |")
    d = new[new.run == pick].set_index(KEY).answer_logprob - base.set_index(KEY).answer_logprob
    print(f"\nPaired Δ answer log-lik. ({pick} − default): mean {d.mean():+.4f}, "
          f"{int((d > 0).sum())} prompts up, {int((d < 0).sum())} down.")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "add" and len(sys.argv) >= 4:
        add(sys.argv[2], sys.argv[3:])
    elif cmd in ("write", "report") and len(sys.argv) == 3:
        (write if cmd == "write" else report)(sys.argv[2])
    elif cmd == "main-dev" and len(sys.argv) == 4:
        main_dev(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: dev_levers.py write|report ROWS.parquet | add ROWS.parquet LABEL... | "
                 "main-dev ROWS.parquet OUT.parquet")
