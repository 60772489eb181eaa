"""Needle-in-a-haystack passkey retrieval, in the classic repeated-filler format of
Mohtashami & Jaggi (2023, "Landmark Attention"), over a length x depth grid (Kamradt 2023).

    <instruction> <filler block repeated> The pass key is 48213. Remember it. 48213 is the
    pass key. <filler block repeated> What is the pass key? The pass key is

Every prompt is independent: its own pass key and its own filler block (five statements
drawn from `REPEAT_SENTENCES` in a drawn order), so each prompt is its own cluster and the
prompts of a grid are independent replicates (issue 8: three depths that shared one
haystack and key were one observation, not three).
"""

from __future__ import annotations

from typing import Any

from smartkv.tasks.filler import REPEAT_SENTENCES, SentenceStream, cycle_maker, repeated_block, rng_for
from smartkv.tasks.haystack import build_haystack
from smartkv.tasks.needle_sample import passkey_sample
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FOOTER = "\n\nWhat is the pass key? The pass key is"


def needle_text(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


BLOCKS = ("drawn", "classic")
# How the haystack is laid out around the needle.
# - `sentence`: the needle goes between filler sentences (possibly inside a block), blank lines
#   around the haystack.
# - `block`: the haystack is whole repeats of the block and the needle sits between two repeats,
#   single newlines around it: Landmark Attention's own layout. At 2k-4k tokens SmolLM2-135M
#   answers this layout and not the other (params.yaml, "Calibrated"), so long contexts use it.
LAYOUTS = {
    "sentence": (HEADER, FOOTER),
    "block": (HEADER.rstrip("\n") + "\n", "\n" + FOOTER.lstrip("\n")),
}


def repeated_filler(*key: object, block: str = "drawn", layout: str = "sentence") -> SentenceStream:
    """The prompt's repeated-filler stream: its own block drawn from `key`, or (`classic`) the
    original five sentences in their original order, the same for every prompt. With layout
    `block` each item of the stream is a whole block, so a needle can only fall between blocks."""
    if block not in BLOCKS:
        raise ValueError(f"niah: block={block!r}; allowed: {', '.join(BLOCKS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"niah: layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
    sentences = REPEAT_SENTENCES[:5] if block == "classic" else repeated_block(rng_for(*key, "block"))
    if layout == "block":
        sentences = [" ".join(sentences)]
    return SentenceStream(rng_for(*key, "filler"), cycle_maker(sentences))


@register_task("niah", "needle-in-a-haystack passkey retrieval over length x depth (repeated filler)")
def generate(tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
             block: str = "drawn", layout: str = "sentence") -> list[Sample]:
    repeated_filler(block=block, layout=layout)  # a bad block or layout fails before any prompt is built
    header, footer = LAYOUTS[layout]
    samples = []
    for length in lengths:
        for depth in depths:
            for i in range(n_per_cell):
                sample_id = f"niah-s{seed}-L{length}-d{depth:.3f}-{i}"
                key = ("niah", seed, length, f"{depth:.3f}", i)
                passkey = str(rng_for(*key, "passkey").randint(10000, 99999))
                hay = build_haystack(
                    tokenizer, length, stream=repeated_filler(*key, block=block, layout=layout),
                    header=header, needles=[(needle_text(passkey), depth)], footer=footer, what="niah",
                )
                samples.append(passkey_sample("niah", sample_id, hay, passkey, length, depth, target=f" {passkey}"))
    return samples
