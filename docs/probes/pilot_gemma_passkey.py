"""Pilot (measurement only): greedy repeated-filler passkey on an embedded model, FP16 and KIVI-2.

The classic passkey prompt (Mohtashami & Jaggi 2023): "The grass is green..." repeated, a
five-digit pass key at a random depth, then the question. Dev seeds only (>= 100).
Usage: PYTHONPATH=$PWD python docs/probes/pilot_gemma_passkey.py [model] [lengths...]
"""

import json
import sys
import time

import torch

from smartkv.runner import RunSpec, decode, encode, fork, prefill
from smartkv.models import load_model
from smartkv.tasks.filler import SentenceStream, rng_for
from smartkv.tasks.haystack import build_haystack

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HEADER = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n\n")
FOOTER = "\n\nWhat is the pass key? The pass key is"
SEEDS = range(100, 105)
RUNS = [RunSpec("fp16", "fp16"), RunSpec("kivi-2", "kivi", {"bits": 2})]


def prompt(tok, length, seed):
    rng = rng_for("passkey-repeated", seed, length)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.1, 0.9)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = build_haystack(tok, length, stream=SentenceStream(rng, make=lambda r: NOISE), header=HEADER,
                         needles=[(needle, depth)], footer=FOOTER, what="passkey")
    return hay.prompt, key, depth


def main():
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m"
    lengths = [int(x) for x in sys.argv[2:]] or [1024, 2048, 4096]
    t0 = time.perf_counter()
    model, tok = load_model(name)
    print(f"load {time.perf_counter() - t0:.1f}s", flush=True)
    for length in lengths:
        found = {r.label: 0 for r in RUNS}
        for seed in SEEDS:
            text, key, depth = prompt(tok, length, seed)
            ids, mask = encode(tok, [text])
            t = time.perf_counter()
            pre = prefill(model, ids, mask)
            row = {"length": length, "tokens": int(ids.shape[1]), "seed": seed, "depth": round(depth, 2), "key": key,
                   "prefill_s": round(pre.seconds, 1)}
            for run in RUNS:
                cache, _ = fork(pre, run, model)
                new, secs = decode(model, pre, cache, 8)
                answer = tok.decode(new[0], skip_special_tokens=True)
                found[run.label] += key in answer
                row[run.label] = answer.strip()
                row[run.label + "_ratio"] = round(cache.memory_report()["ratio"], 3)
            row["total_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(row), flush=True)
        print(json.dumps({"length": length, "found": found, "n": len(SEEDS)}), flush=True)


if __name__ == "__main__":
    main()
