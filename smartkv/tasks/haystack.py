"""Hide needles at chosen depths in filler text and size the whole prompt to a token target.

Depth follows the needle-in-a-haystack convention (Kamradt 2023; RULER, Hsieh et al. 2024):
0.0 puts the needle at the start of the haystack, 1.0 at its end, measured in filler
sentences. Needles go between sentences so none of them is cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smartkv.tasks.filler import SentenceStream
from smartkv.tasks.sizing import fit_units


@dataclass
class Haystack:
    prompt: str
    needle_spans: list[list[int]]  # [start, end) char offsets of each needle in `prompt`
    haystack_span: list[int]  # [start, end) of the haystack (filler + needles) in `prompt`
    n_sentences: int


def _assemble(header: str, sentences: list[str], needles: list[tuple[str, float]], footer: str) -> Haystack:
    n = len(sentences)
    slots: dict[int, list[int]] = {}
    for j, (_, frac) in enumerate(needles):
        slots.setdefault(round(frac * n), []).append(j)
    pieces: list[tuple[str, int | None]] = []  # (text, needle index or None)
    for p in range(n + 1):
        pieces.extend((needles[j][0], j) for j in slots.get(p, []))
        if p < n:
            pieces.append((sentences[p], None))
    spans: list[list[int]] = [[0, 0] for _ in needles]
    parts = [header]
    pos = len(header)
    for k, (text, j) in enumerate(pieces):
        if k:
            parts.append(" ")
            pos += 1
        if j is not None:
            spans[j] = [pos, pos + len(text)]
        parts.append(text)
        pos += len(text)
    parts.append(footer)
    return Haystack("".join(parts), spans, [len(header), pos], n)


def build_haystack(
    tokenizer: Any,
    target: int,
    *,
    stream: SentenceStream,
    header: str,
    needles: list[tuple[str, float]],
    footer: str,
    what: str,
) -> Haystack:
    """The prompt header + filler-with-needles + footer with the most filler that fits `target`.

    `needles` are (text, depth) pairs; needles at the same sentence slot keep their order,
    so an ordered chain (variable tracking) stays in order when depths are ascending.
    """
    _, hay = fit_units(
        lambda n: _assemble(header, stream.take(n), needles, footer),
        lambda h: h.prompt,
        tokenizer,
        target,
        what=what,
    )
    return hay
