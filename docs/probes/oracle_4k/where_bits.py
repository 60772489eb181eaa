"""Where the oracle puts its bits at 4k that the committed ranking does not.

probe.py: at INT3's bytes the oracle ranking finds all 18 depth-0.7 test needles, the committed
EMA ranking 4. dev_levers.py: no ranking lever of SmartKVConfig finds them either, though
`prior: 0` gives the needle more bits than the oracle does. So what does the oracle protect?
For each depth-0.7 test needle (one per test seed), this forks the committed config and the
oracle from one prefill, lets each allocate (one decode step), and compares the bits every
prompt token holds, by region and by layer, and lists the tokens the oracle lifts most.

    python docs/probes/oracle_4k/where_bits.py > docs/probes/oracle_4k/where_bits.md   # ~5 min
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe import LENGTH, TASK, setup  # noqa: E402

from smartkv.evaluate import needle_token_span  # noqa: E402
from smartkv.io import read_parquet_with_meta  # noqa: E402
from smartkv.models import load_model  # noqa: E402
from smartkv.runner import decode, encode, fork, oracle_tracker, prefill  # noqa: E402
from smartkv.tasks.sample import Sample  # noqa: E402

DEPTH = 0.7


def bits(cache, n: int) -> np.ndarray:
    """[layers, tokens]: each prompt token's bits, mean over KV heads and K/V (16 = FP16)."""
    return torch.stack([layer.bits_map()[0, :, :n].mean(dim=(0, 2)) for layer in cache.layers]).numpy()


@torch.no_grad()
def main() -> None:
    params, s, sub, spec = setup()
    tasks, _ = read_parquet_with_meta("data/extra_cells_tasks.parquet")
    rows = tasks[(tasks.task == TASK) & (tasks.context_length == LENGTH) & (tasks.depth == DEPTH)
                 & tasks.sample_id.str.endswith("-0")]
    model, tokenizer = load_model(s["model"], dtype=params["dtype"])
    cfg = spec.config()
    oracle_spec = dataclasses.replace(spec, oracle=True)
    regions_all, layers_all, lifted = [], [], []
    for row in rows.to_dict("records"):
        sample = Sample.from_row(row)
        ids, mask = encode(tokenizer, [sample.prompt])
        n = ids.shape[1]
        pre = prefill(model, ids, mask, cfg.decay, cfg.obs_window)
        maps = {}
        for label, r in (("committed", spec), ("oracle", oracle_spec)):
            cache, _ = fork(pre, r, model)
            if r.oracle:
                t = cache.tracker
                cache.tracker = oracle_tracker(model, pre, int(sample.meta.get("max_new_tokens", 8))).copy(
                    keep=t.keep, dtype=t.dtype, per_head=t.per_head)
            new, _ = decode(model, pre, cache, 1)  # the first answer token: the allocation is made
            maps[label] = (bits(cache, n - 1), tokenizer.decode(new[0]))
        a, o = maps["committed"][0], maps["oracle"][0]
        first, last = needle_token_span(tokenizer, sample)
        m = a.shape[1]
        region = np.full(m, "haystack", dtype=object)
        region[max(0, first - 64):last + 65] = "needle ±64"
        region[first:last + 1] = "needle"
        region[m - 96:] = "last 96 (question)"
        region[:cfg.sink_tokens] = "sinks"
        for name in ("needle", "needle ±64", "haystack", "last 96 (question)"):
            sel = region == name
            regions_all.append((name, a[:, sel].mean(), o[:, sel].mean(), int(sel.sum())))
        layers_all.append((a[:, first:last + 1].mean(axis=1), o[:, first:last + 1].mean(axis=1),
                           a[:, region == "haystack"].mean(axis=1), o[:, region == "haystack"].mean(axis=1)))
        gain = (o - a).mean(axis=0)
        for i in np.argsort(-gain)[:8]:
            where = "needle" if first <= i <= last else f"{i - first:+d} from needle" if abs(i - first) < 200 else (
                f"{i - m:+d} from end" if i > m - 200 else f"position {i}")
            lifted.append((row["seed"], tokenizer.decode([int(ids[0, i])]), where, float(gain[i])))
        print(f"seed {row['seed']}: answer {sample.answers[0]!r}; first token committed "
              f"{maps['committed'][1]!r}, oracle {maps['oracle'][1]!r}; needle tokens {first}-{last} of {m}",
              file=sys.stderr)
    print(f"# Where the oracle's bits go at 4k ({len(rows)} depth-{DEPTH} test needles, INT3's bytes)\n")
    print("Mean bits per token (over layers, KV heads, K and V; 16 = FP16: the last 96 hold the 32-token FP16 window):\n")
    print("| region | tokens per prompt | committed | oracle |")
    print("|---|---|---|---|")
    for name in ("needle", "needle ±64", "haystack", "last 96 (question)"):
        r = [x for x in regions_all if x[0] == name]
        print(f"| {name} | {np.mean([x[3] for x in r]):.0f} | {np.mean([x[1] for x in r]):.2f} | "
              f"{np.mean([x[2] for x in r]):.2f} |")
    L = np.array(layers_all)  # [prompts, 4, layers]
    print("\nNeedle bits by layer (mean over prompts), committed → oracle; haystack likewise:\n")
    print("| layer | needle committed | needle oracle | haystack committed | haystack oracle |")
    print("|---|---|---|---|---|")
    for li in range(L.shape[2]):
        c = L[:, :, li].mean(axis=0)
        print(f"| {li} | {c[0]:.2f} | {c[1]:.2f} | {c[2]:.2f} | {c[3]:.2f} |")
    print("\nTokens the oracle lifts most (mean over layers of oracle − committed bits), 8 per prompt:\n")
    print("| seed | token | where | Δ bits |")
    print("|---|---|---|---|")
    for seed, tok, where, g in lifted:
        print(f"| {seed} | {tok!r} | {where} | {g:+.2f} |")


if __name__ == "__main__":
    main()
