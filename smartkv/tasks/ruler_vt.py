"""RULER variable tracking (Hsieh et al. 2024, Sec. 3.2 "Multi-hop Tracing").

A chain "VAR ABCDE = 12345. VAR FGHIJ = VAR ABCDE. ..." is scattered, in order, through our
filler; the model must list every variable that ends up holding the value. Optional extra
chains with other values act as distractors. The answer is the chain's variable names,
scored with string_match_all as in RULER. Depth does not apply: the chain spans the context.
"""

from __future__ import annotations

import string
from random import Random
from typing import Any

from smartkv.tasks.filler import rng_for
from smartkv.tasks.haystack import build_haystack
from smartkv.tasks.ruler_niah import haystack_stream
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample

HEADER = "Memorize and track the chains of variable assignment hidden in the following text.\n\n"


QUERIES = ("names", "value")


def _var_names(rng: Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


@register_task("ruler_vt", "RULER variable tracking: follow chains of assignments", uses_depth=False)
def generate(
    tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
    num_hops: int = 3, num_chains: int = 1, haystack: str = "repeat", query: str = "names",
) -> list[Sample]:
    """`num_hops` assignments after the first make a chain of num_hops + 1 variables (RULER
    uses 4 hops; 3 keeps the answer within ~32 generated tokens). The haystack is the
    passkey task's repeated filler (`haystack="prose"`: varied sentences).

    query="names" asks RULER's question (every variable bound to the value; `target` lists
    the chain in assignment order). query="value" asks the other way along the same chain,
    which a small model can answer: the value of the chain's last variable (`target` is the
    value); it needs num_chains >= 2, so that another chain's value is there to confuse.
    """
    if query not in QUERIES:
        raise ValueError(f"ruler_vt: query={query!r}; allowed: {', '.join(QUERIES)}")
    if query == "value" and num_chains < 2:
        raise ValueError(f"ruler_vt: query='value' needs num_chains >= 2 (got {num_chains}): "
                         "with one chain the only number in the text is the answer")
    haystack_stream(haystack)  # a bad kind fails before any prompt is built
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = ("ruler_vt", seed, length, i)
            rng = rng_for(*key, "case")
            names = _var_names(rng, num_chains * (num_hops + 1))
            values = [str(v) for v in rng.sample(range(10_000, 100_000), num_chains)]
            needles: list[tuple[str, float]] = []
            chains = []
            for c in range(num_chains):
                chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
                chains.append(chain)
                statements = [f"VAR {chain[0]} = {values[c]}."] + [
                    f"VAR {chain[h]} = VAR {chain[h - 1]}." for h in range(1, len(chain))
                ]
                # Ascending positions keep each chain in reading order.
                fracs = sorted(rng.random() for _ in statements)
                needles.extend(zip(statements, fracs))
            if query == "names":
                question = (
                    f"\n\nQuestion: Find all variables that are assigned the value {values[0]} in the "
                    f"text above. Answer: According to the chains of variable assignment in the text "
                    f"above, {len(chains[0])} variables are assigned the value {values[0]}, they are:"
                )
                answers, target = list(chains[0]), " " + " ".join(chains[0])
            else:
                last = chains[0][-1]
                question = (
                    f"\n\nQuestion: What is the value of VAR {last}? Answer: Following the chains of "
                    f"variable assignment in the text above, the value of VAR {last} is"
                )
                answers, target = [values[0]], f" {values[0]}"
            hay = build_haystack(
                tokenizer, length, stream=haystack_stream(haystack, *key),
                header=HEADER, needles=needles, footer=question, what="ruler_vt",
            )
            samples.append(Sample(
                task="ruler_vt",
                sample_id=f"ruler_vt-s{seed}-L{length}-{i}",
                prompt=hay.prompt,
                answers=answers,
                metric="ruler_all",
                context_length=length,
                depth=None,
                meta={"value": values[0], "needle_char_spans": hay.needle_spans,
                      "haystack_char_span": hay.haystack_span},
                target=target,
            ))
    return samples
