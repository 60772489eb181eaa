"""Every method's bytes, part by part, against a closed form from the geometry (issue 35).

    python docs/probes/byte_formula/bytes_table.py [contexts...]   # default 1024 4096 -> bytes_table.md

On the default model, one needle prompt per context (`smartkv.bench.bench_prompt`), prefilled once,
each method forked from it and decoded 8 tokens. A part's closed form uses only the model's geometry,
the token counts each layer reports (how many tokens sit in FP16, how many values at each width) and
the format: b/8 bytes per b-bit value, one FP16 scale and zero-point (4 bytes) per group, a 4-byte
index per stored unit, 2 bytes per FP16 value, KIVI's formula from its paper (tests/test_kivi.py).
The tracker is storage-sized (its tensors grow in steps), so it is shown measured only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from smartkv.bench import bench_prompt
from smartkv.last_query import attend_last_query
from smartkv.models import load_model
from smartkv.runner import RunSpec, decode, encode, fork, prefill

RUNS = [RunSpec("fp16", "fp16"), RunSpec("int4", "uniform", {"bits": 4}), RunSpec("int2", "uniform", {"bits": 2}),
        RunSpec("kivi-2", "kivi", {"bits": 2}), RunSpec("kivi-4", "kivi", {"bits": 4}),
        RunSpec("smartkv-b0.25", "smartkv", {"budget": 0.25}),
        RunSpec("smartkv-b0.15-evict", "smartkv", {"budget": 0.15, "bits": (0, 2, 3, 4, 8)})]
NEW = 8


def formula(run: RunSpec, cache, cfg) -> dict[str, int]:
    """Closed-form bytes per part, summed over layers."""
    d, hkv = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads, \
        cfg.num_key_value_heads
    values = 2 * hkv * d  # K and V of one token in one layer
    out: dict[str, int] = {}

    def add(part, n):
        out[part] = out.get(part, 0) + int(n)

    for layer in cache.layers:
        if run.method == "fp16":
            add("fp16", 2 * values * layer.get_seq_length())
        elif run.method == "kivi":
            g, bits = layer.group_size, layer.bits
            per_group = g * bits // 8 + 4
            add("codes+scales", (layer.n_qkeys + layer.n_qvalues) * hkv * d // g * per_group)
            add("window", 2 * (layer.keys.numel() + layer.values.numel()))
        else:
            hist = layer.bits_histogram()
            group = min(layer.spec.group_size, d)  # no group straddles two heads
            n_values = sum(n for b, n in hist.items() if 0 < b < 16)
            add("codes", sum(n * b for b, n in hist.items() if 0 < b < 16) // 8)
            add("scales", n_values // group * 4)
            if run.method == "smartkv":
                # one int32 per stored unit; a unit is a token's K and V (or each apart), per head or not
                add("index", 4 * n_values // (values // layer.units_per_row))
                add("sinks+window", 2 * hist.get(16, 0))
                if layer.k_scale is not None:
                    add("key_stats", 2 * (layer.k_scale.numel() + layer.k_shift.numel()))
    return out


def measured(run: RunSpec, cache) -> dict[str, int]:
    parts = cache.memory_report()["breakdown"]
    if run.method == "kivi":
        return {"codes+scales": parts.get("codes", 0) + parts.get("scales", 0), "window": parts.get("window", 0)}
    if run.method == "smartkv":
        parts = {**parts, "sinks+window": parts.get("sinks", 0) + parts.get("window", 0)}
        parts.pop("sinks", None), parts.pop("window", None)
    return {k: v for k, v in parts.items() if v}


def main(contexts: list[int]) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_model("default")
    lines = ["| context | method | part | closed form | measured | equal |", "| --- | --- | --- | --- | --- | --- |"]
    for n in contexts:
        ids, mask = encode(tok, [bench_prompt(tok, n)], device=model.device)
        pre = attend_last_query(model, prefill(model, ids, mask))
        for run in RUNS:
            cache, _ = fork(pre, run, model)
            decode(model, pre, cache, NEW, min_new_tokens=NEW)
            got = measured(run, cache)  # first: reading KIVI's bytes applies the flush its last step owes
            want = formula(run, cache, model.config)
            for part in sorted(set(want) | set(got)):
                w, g = want.get(part), got.get(part, 0)
                lines.append(f"| {ids.shape[1]} | {run.label} | {part} | {'—' if w is None else w} | {g} | "
                             f"{'—' if w is None else ('yes' if w == g else 'NO')} |")
            total = cache.memory_report()
            lines.append(f"| {ids.shape[1]} | {run.label} | **total** (ratio {total['ratio']:.4f}) | | "
                         f"{total['kv_bytes']} | |")
            print(lines[-1], flush=True)
    out = Path(__file__).with_suffix(".md")
    out.write_text(__doc__.split("\n\n")[0] + "\n\n" + "\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [1024, 4096])
