"""Needle-in-a-haystack passkey retrieval (Kamradt 2023; the passkey form of Mohtashami &
Jaggi 2023, "Landmark Attention").

A five-digit pass key sits at `depth` in our own filler; the model must repeat it. The
haystack and pass key depend on (seed, length, i) but not on depth, so along the depth axis
of the grid only the needle's position changes.
"""

from __future__ import annotations

from typing import Any

from smartkv.tasks.filler import SentenceStream, rng_for
from smartkv.tasks.haystack import build_haystack
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample

HEADER = (
    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FOOTER = "\n\nWhat is the pass key? The pass key is"


def needle_text(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


@register_task("niah", "needle-in-a-haystack passkey retrieval over length x depth")
def generate(tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int) -> list[Sample]:
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = ("niah", seed, length, i)
            passkey = str(rng_for(*key, "passkey").randint(10000, 99999))
            needle = needle_text(passkey)
            for depth in depths:
                hay = build_haystack(
                    tokenizer, length,
                    stream=SentenceStream(rng_for(*key, "filler")),
                    header=HEADER, needles=[(needle, depth)], footer=FOOTER, what="niah",
                )
                samples.append(Sample(
                    task="niah",
                    sample_id=f"niah-s{seed}-L{length}-d{depth:.3f}-{i}",
                    prompt=hay.prompt,
                    answers=[passkey],
                    metric="contains",
                    context_length=length,
                    depth=depth,
                    meta={"needle_char_span": hay.needle_spans[0], "haystack_char_span": hay.haystack_span},
                ))
    return samples
