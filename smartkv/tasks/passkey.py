"""Passkey retrieval in the classic repeated filler (Mohtashami & Jaggi 2023, "Landmark
Attention"; the format of LongLoRA's and InfLLM's passkey tests).

The haystack repeats one line ("The grass is green. The sky is blue. ..."), so the needle is
the only content in it. The default model finds the key reliably at 1k-2k tokens here while
it fails our varied-filler NIAH at 2k (DESIGN.md, "Calibration"): a task full precision
solves is what a KV-cache comparison needs. The pass key depends on (seed, length, i), not
on depth.
"""

from __future__ import annotations

from typing import Any

from smartkv.tasks.filler import SentenceStream, rng_for
from smartkv.tasks.haystack import build_haystack
from smartkv.tasks.needle_sample import passkey_sample
from smartkv.tasks.niah import FOOTER, HEADER, needle_text
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _repeat(_rng) -> str:
    return FILLER


@register_task("passkey", "passkey retrieval in the classic repeated filler, over length x depth")
def generate(tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int) -> list[Sample]:
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = ("passkey", seed, length, i)
            passkey = str(rng_for(*key).randint(10000, 99999))
            for depth in depths:
                hay = build_haystack(
                    tokenizer, length,
                    stream=SentenceStream(rng_for(*key, "filler"), make=_repeat),
                    header=HEADER, needles=[(needle_text(passkey), depth)], footer=FOOTER, what="passkey",
                )
                samples.append(passkey_sample("passkey", f"passkey-s{seed}-L{length}-d{depth:.3f}-{i}", hay, passkey,
                                              length, depth))
    return samples
