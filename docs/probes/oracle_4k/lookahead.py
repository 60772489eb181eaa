"""How much of the 4k oracle is in the first few decode queries? Lookahead importance, on a dev seed.

`probe.py` found that the oracle ranking (importance from the whole FP16 generation) answers
90/90 test needles at INT3's bytes, where the committed config answers 73/90; `dev_levers.py`
found that no prompt-only ranking lever `SmartKVConfig` has finds the depth-0.7 needles (0/6
each on dev seed 100). The oracle's extra knowledge is the attention of the answer's own queries.

This probe asks how few of them are enough. `lookahead-k` ranks with the prefill statistics plus
the attention of the first k FP16 decode queries (the last prompt token's, then k - 1 greedy FP16
answer tokens'), i.e. the oracle cut after k steps. A deployable cache could do the same: keep
the prefill in FP16 for k more steps (the peak memory is the FP16 prefill's anyway), read their
attention, then quantize. The answer is still read through the quantized cache from its first
token: the k FP16 steps inform the ranking only, so every run's answer sees the same bytes.
The price is k extra single-token forwards before the cache is quantized, with the FP16 copy
held meanwhile.

Runs, at the committed `smartkv@int3` spec and budget, one prefill per needle:
`default` (the committed config), `lookahead-1`, `-2`, `-4`, `-8`, and `oracle` (the whole
generation, as probe.py). Dev seed 100 only (30 fresh 4k needles, 6 per depth, the same ones as
dev_levers.py). The rule, fixed before the run: the smallest k whose needles found are within
one of the oracle's is the candidate; nothing here changes a default.

    python docs/probes/oracle_4k/lookahead.py write docs/probes/oracle_4k/lookahead_rows.parquet
    python docs/probes/oracle_4k/lookahead.py report docs/probes/oracle_4k/lookahead_rows.parquet > docs/probes/oracle_4k/lookahead_report.md
    python docs/probes/oracle_4k/lookahead.py main-dev docs/probes/oracle_4k/lookahead_rows.parquet docs/probes/oracle_4k/lookahead_main_dev_rows.parquet > docs/probes/oracle_4k/lookahead_main_dev.md
    python docs/probes/oracle_4k/lookahead.py test docs/probes/oracle_4k/lookahead_rows.parquet docs/probes/oracle_4k/lookahead_test_rows.parquet > docs/probes/oracle_4k/lookahead_test.md

    python docs/probes/oracle_4k/lookahead.py main-test docs/probes/oracle_4k/lookahead_rows.parquet docs/probes/oracle_4k/lookahead_main_test_rows.parquet > docs/probes/oracle_4k/lookahead_main_test.md

`main-dev` puts the candidate beside the default on the main grid's dev needles (seed 100, 1k and
2k, `data/tasks.parquet`) at the headline budget: a lever must not buy 4k by losing the lengths
the main study runs. `test` then runs the candidate and the default once on the 90 test needles
at 4k that tuning never saw (`data/extra_cells_tasks.parquet`), paired with committed INT3.
`main-test` does the same for the main study's `smartkv@int3` spec on its 210 test needles (1k
and 2k, `data/tasks.parquet`), with the cell-by-cell check (`smartkv.cell_check`) beside committed INT3.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd

import smartkv.evaluate as ev
from smartkv import runner
from smartkv.io import atomic_write_parquet, read_parquet_with_meta
from smartkv.stats.paired import mcnemar_exact

sys.path.insert(0, str(Path(__file__).parent))
from dev_levers import DEV_SEED, dev_table, dev_tasks  # noqa: E402
from probe import KEY, LENGTH, TASK, committed, discordant, evaluate, setup  # noqa: E402

STEPS = {"default": None, "lookahead-1": 1, "lookahead-2": 2, "lookahead-4": 4, "lookahead-8": 8,
         "oracle": 0}  # label -> FP16 decode steps read (0: the whole generation; None: no oracle)


def _install(labels: list[str]) -> None:
    """Route each run to its tracker: smartkv.evaluate hands one oracle to every run of a
    prefill, so the probe hands it a dict (one tracker per step count the `labels` read, each
    decoded from its own copy of the prefill's) and picks the run's entry here."""
    one_run = ev._one_run
    steps = sorted({STEPS[x] for x in labels if STEPS[x] is not None})

    def _trackers(model, pre, limit: int) -> dict[int, object]:
        return {k: runner.oracle_tracker(model, pre, min(k, limit) if k else limit) for k in steps}

    def pick(model, tokenizer, sample, pre, run, target, ref_logprobs, oracle, mode, limit):
        tracker = oracle.get(STEPS[run.label]) if oracle is not None and STEPS[run.label] is not None else None
        return one_run(model, tokenizer, sample, pre, run, target, ref_logprobs, tracker, mode, limit)

    ev.oracle_tracker, ev._one_run = _trackers, pick


def write(out: str) -> None:
    params, s, sub, spec = setup()
    _install(list(STEPS))
    runs = [dataclasses.replace(spec, label=label, oracle=steps is not None) for label, steps in STEPS.items()]
    _, meta = read_parquet_with_meta("data/extra_cells_tasks.parquet")
    atomic_write_parquet(evaluate(sub, runs, dev_tasks(params, s), meta, "dev", "lookahead"), Path(out), meta)


def candidate(dev: pd.DataFrame) -> str | None:
    """The rule: the smallest k whose needles found are within one of the oracle's."""
    found = dev.groupby("run").score.sum()
    near = [x for x in STEPS if STEPS[x] and x in found and found[x] >= found["oracle"] - 1]
    return near[0] if near else None


def _candidate_or_exit(dev_path: str, cmd: str) -> str:
    pick = candidate(pd.read_parquet(dev_path))
    if pick is None:
        sys.exit(f"{cmd}: no candidate on the dev rows (no k within one needle of the oracle)")
    return pick


def _pair_table(new: pd.DataFrame, labels: list[str], base: pd.DataFrame, by: str) -> None:
    print(f"| run | found | by {by} | answer log-lik. | KL from FP16 | kv_ratio | vs `{base.run.iloc[0]}`: "
          "alone right / it alone right, exact p |")
    print("|---|---|---|---|---|---|---|")
    for label in labels:
        r = new[new.run == label]
        t, b = discordant(r, base)
        split = " / ".join(str(int(v)) for v in r.groupby(by).score.sum().values)
        print(f"| `{label}` | {int(r.score.sum())}/{len(r)} | {split} | {r.answer_logprob.mean():.3f} | "
              f"{r.kl_fp16.mean():.4f} | {r.kv_ratio.mean():.3f} | {t} / {b}, {mcnemar_exact(t, b):.3g} |")


def main_dev(dev_path: str, out: str) -> None:
    from smartkv.study.runs import headline_run

    pick = _candidate_or_exit(dev_path, "main-dev")
    params = setup()[0]
    _install(["default", pick])
    head = headline_run(params)
    runs = [dataclasses.replace(head, label="default", oracle=False), dataclasses.replace(head, label=pick, oracle=True)]
    tasks, meta = read_parquet_with_meta("data/tasks.parquet")
    new = evaluate(params, runs, tasks[(tasks.split == "dev") & (tasks.task == TASK)], meta, "dev", "lookahead")
    atomic_write_parquet(new, Path(out), meta)
    print(f"# `{pick}` beside the default on the main grid's dev needles (seed {DEV_SEED}, budget "
          f"{head.params['budget']})\n")
    _pair_table(new, ["default", pick], new[new.run == "default"], "context_length")


def test(dev_path: str, out: str) -> None:
    pick = _candidate_or_exit(dev_path, "test")
    params, s, sub, spec = setup()
    _install(["default", pick])
    runs = [dataclasses.replace(spec, label="default", oracle=False), dataclasses.replace(spec, label=pick, oracle=True)]
    tasks, meta = read_parquet_with_meta("data/extra_cells_tasks.parquet")
    cell = tasks[(tasks.task == TASK) & (tasks.context_length == LENGTH)]
    new = evaluate(sub, runs, cell, meta, "test", "lookahead")
    atomic_write_parquet(new, Path(out), meta)
    int3 = committed()
    int3 = int3[int3.run == "int3"]
    print(f"# `{pick}` on the {len(int3)} test needles at 4k (INT3's bytes), paired with committed INT3 "
          f"({int(int3.score.sum())}/{len(int3)})\n")
    _pair_table(new, ["default", pick], int3, "depth")
    t, b = discordant(new[new.run == pick], new[new.run == "default"])
    print(f"\n`{pick}` against `default` (both run here): {t} / {b}, exact p {mcnemar_exact(t, b):.3g}.")


def main_test(dev_path: str, out: str) -> None:
    import json

    from smartkv.cell_check import cell_check, describe
    from smartkv.study.match import budgets
    from smartkv.study.runs import smartkv_runs

    pick = _candidate_or_exit(dev_path, "main-test")
    params = setup()[0]
    _install(["default", pick])
    matched = budgets(json.loads(Path("metrics/matched_budgets.json").read_text()), "test")
    specs = [r for r in smartkv_runs(params, matched) if r.label == "smartkv@int3"]
    runs = [dataclasses.replace(r, label=lab, oracle=lab != "default") for lab in ("default", pick) for r in specs]
    tasks, meta = read_parquet_with_meta("data/tasks.parquet")
    new = evaluate(params, runs, tasks[(tasks.split == "test") & (tasks.task == TASK)], meta, "test", "lookahead")
    atomic_write_parquet(new, Path(out), meta)
    base = pd.read_parquet("data/baselines.parquet")
    int3 = base[(base.run == "int3") & (base.task == TASK) & (base.split == "test")]
    print(f"# `{pick}` on the main study's {len(int3)} test needles (`smartkv@int3`'s spec and bytes), "
          f"paired with committed INT3 ({int(int3.score.sum())}/{len(int3)})\n")
    _pair_table(new, ["default", pick], int3, "context_length")
    t, b = discordant(new[new.run == pick], new[new.run == "default"])
    print(f"\n`{pick}` against `default` (both run here): {t} / {b}, exact p {mcnemar_exact(t, b):.3g}.\n")
    both = pd.concat([new, int3], ignore_index=True)
    for label in ("default", pick):
        print("- " + describe(cell_check(both, label, "int3")))


def report(path: str) -> None:
    dev = pd.read_parquet(path)
    print(f"# Lookahead importance at 4k on dev seed {DEV_SEED} ({dev.sample_id.nunique()} needles, INT3's bytes)\n")
    print("`lookahead-k`: the prefill's statistics plus the attention of the first k FP16 decode queries; "
          "`oracle`: of the whole FP16 generation. The answer is read through the quantized cache in every run.\n")
    dev_table(dev, STEPS)
    pick = candidate(dev)
    print("\nThe rule (smallest k within one needle of the oracle): "
          + (f"`{pick}`." if pick else "no k up to 8 comes within one needle of the oracle."))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd in ("write", "report") and len(sys.argv) == 3:
        (write if cmd == "write" else report)(sys.argv[2])
    elif cmd in ("main-dev", "test", "main-test") and len(sys.argv) == 4:
        {"main-dev": main_dev, "test": test, "main-test": main_test}[cmd](sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: lookahead.py write|report ROWS.parquet | main-dev|test|main-test DEV_ROWS.parquet OUT.parquet")
