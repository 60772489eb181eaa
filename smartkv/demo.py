"""`python -m smartkv demo`: one passkey prompt, FP16 against SmartKV, side by side.

Prints both answers, the KV bytes each cache holds, and an ASCII map of the bits SmartKV
gave every prompt token, one row per band of layers: enough to see, without plotting
anything, where the budget went (the sinks, the needle, the question, the filler).
"""

from __future__ import annotations

import math

import numpy as np

from smartkv.token_spans import char_span_tokens

# One character per bit width, light to heavy; the legend is printed with the map.
GLYPHS = {0: " ", 1: "_", 2: ".", 3: ":", 4: "+", 5: "=", 6: "=", 7: "=", 8: "#", 16: "F"}


def glyph(bits: float) -> str:
    """The character of the width nearest to `bits` (a cell's mean)."""
    widths = sorted(GLYPHS)
    return GLYPHS[min(widths, key=lambda w: (abs(w - bits), w))]


def ascii_allocation_map(bits: np.ndarray, *, columns: int = 64, band: int = 5,
                         needle: tuple[int, int] | None = None) -> str:
    """Render `bits` [layers, tokens] (bits per value, 16 = FP16) as text.

    Rows are bands of `band` layers (top row = the last layers), columns bins of prompt tokens;
    a cell shows the width nearest to its mean bits. A caret line marks the needle's bins.
    """
    bits = np.asarray(bits, dtype=float)
    if bits.ndim != 2 or bits.shape[1] == 0:
        raise ValueError(f"bits must be [layers, tokens] with at least one token, got shape {bits.shape}")
    if columns < 1 or band < 1:
        raise ValueError(f"columns={columns} and band={band} must be >= 1")
    n_layers, t = bits.shape
    cols = min(columns, t)
    edges = np.linspace(0, t, cols + 1).round().astype(int)
    lines = []
    for top in range(math.ceil(n_layers / band) - 1, -1, -1):
        lo, hi = top * band, min(n_layers, (top + 1) * band)
        cells = "".join(glyph(bits[lo:hi, edges[c]:edges[c + 1]].mean()) for c in range(cols))
        lines.append(f"L{lo:02d}-{hi - 1:02d} |{cells}|")
    pad = " " * len(f"L{0:02d}-{0:02d} |")
    if needle is not None:
        s, e = needle
        marks = "".join("^" if edges[c] < e and edges[c + 1] > s else " " for c in range(cols))
        lines.append(f"{pad}{marks}  ^ needle")
    lines.append(f"{pad}token 0{' ' * max(1, cols - 7 - len(str(t - 1)))}{t - 1}")
    used = sorted({int(w) for w in np.unique(bits)} | {16})
    lines.append("legend: " + "  ".join(f"'{GLYPHS.get(w, '?')}' {w if w != 16 else 'FP16'}{'-bit' if w != 16 else ''}"
                                        for w in used))
    return "\n".join(lines)


def needle_tokens(tokenizer, prompt: str, char_span) -> tuple[int, int] | None:
    """Half-open token range of the needle (slow tokenizers too: smartkv/token_spans.py)."""
    return char_span_tokens(tokenizer, prompt, char_span)


def run_demo(model, tokenizer, *, length: int = 1024, depth: float = 0.5, seed: int = 0, budget: float = 0.25,
             max_new_tokens: int = 8, smartkv_params: dict | None = None) -> dict:
    """FP16 and SmartKV on one passkey prompt from one shared prefill; answers, bytes and the bits map."""
    import torch

    from smartkv.last_query import attend_last_query
    from smartkv.runner import RunSpec, decode, encode, fork, memory_of, prefill
    from smartkv.tasks import generate_task

    sample = generate_task("passkey", tokenizer, n_per_cell=1, lengths=[length], depths=[depth], seed=seed)[0]
    ids, mask = encode(tokenizer, [sample.prompt], device=model.device)
    pre = attend_last_query(model, prefill(model, ids, mask))  # rank from every prompt query
    out = {"prompt_tokens": int(ids.shape[1]), "passkey": sample.answers[0], "runs": {}}
    runs = [RunSpec("fp16", "fp16"), RunSpec("smartkv", "smartkv", {"budget": budget, **(smartkv_params or {})})]
    for run in runs:
        cache, _ = fork(pre, run, model)
        new, seconds = decode(model, pre, cache, max_new_tokens)
        text = tokenizer.decode(new[0], skip_special_tokens=True)
        mem = memory_of(cache)
        out["runs"][run.label] = {"answer": text, "found": sample.answers[0] in text, "kv_bytes": int(mem["kv_bytes"]),
                                  "fp16_kv_bytes": int(mem["fp16_kv_bytes"]), "ratio": float(mem["ratio"]),
                                  "mean_bits": float(mem["mean_bits"]), "decode_s": seconds}
        if run.method == "smartkv":
            n = ids.shape[1] - 1  # prompt tokens held before decoding began
            out["bits"] = torch.stack([layer.bits_map()[0, :, :n].mean(dim=(0, 2)) for layer in cache.layers]).numpy()
    out["needle"] = needle_tokens(tokenizer, sample.prompt, sample.meta["needle_char_span"])
    return out


def render(result: dict, budget: float) -> str:
    lines = [f"passkey prompt: {result['prompt_tokens']} tokens, the pass key is {result['passkey']}", ""]
    for label, r in result["runs"].items():
        verdict = "found" if r["found"] else "MISSED"
        lines.append(f"{label:8s} answer: {r['answer'].strip()!r:24s} {verdict:6s}  KV {r['kv_bytes'] / 2**20:6.2f} MiB "
                     f"({r['ratio']:.3f} of FP16, {r['mean_bits']:.2f} bits/value)")
    lines += ["", f"SmartKV bits per prompt token (budget {budget} of FP16), by band of layers:",
              ascii_allocation_map(result["bits"], needle=result["needle"])]
    return "\n".join(lines)
