"""RULER's needle-in-a-haystack family (Hsieh et al. 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?", Sec. 3.1): single, multi-key, multi-value and
multi-query retrieval of "special magic numbers" keyed by word pairs.

Differences from RULER, kept on purpose: our own filler instead of Paul Graham essays, and
six-digit values with at most three or four of them, so every answer fits in ~32 generated
tokens on a small model. The queried (or first) needle sits at `depth`; the others sit at
positions drawn from the seed that stay the same across depths.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import Any, Callable

from smartkv.tasks.filler import SentenceStream, key_phrases, rng_for
from smartkv.tasks.haystack import build_haystack
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample

HEADER = (
    "Some special magic numbers are hidden in the following text. Memorize them carefully; "
    "you will be asked about them afterwards.\n\n"
)


@dataclass
class _Case:
    needles: list[str]
    fracs: list[float | None]  # None: placed at the sample's depth
    question: str
    answers: list[str]


def _values(rng: Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(100_000, 1_000_000), n)]


def _ask_one(key: str) -> str:
    return (
        f"\n\nWhat is the special magic number for {key} mentioned in the text above? "
        f"The special magic number for {key} is"
    )


def _case_single(rng: Random) -> _Case:
    [key], [value] = key_phrases(rng, 1), _values(rng, 1)
    return _Case([f"The special magic number for {key} is: {value}."], [None], _ask_one(key), [value])


def _case_multikey(rng: Random, num_keys: int = 4) -> _Case:
    keys, values = key_phrases(rng, num_keys), _values(rng, num_keys)
    needles = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
    fracs = [None] + [rng.random() for _ in keys[1:]]
    return _Case(needles, fracs, _ask_one(keys[0]), [values[0]])


def _case_multivalue(rng: Random, num_values: int = 3) -> _Case:
    [key], values = key_phrases(rng, 1), _values(rng, num_values)
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    fracs = [None] + [rng.random() for _ in values[1:]]
    question = (
        f"\n\nWhat are all the special magic numbers for {key} mentioned in the text above? "
        f"The special magic numbers for {key} are"
    )
    return _Case(needles, fracs, question, values)


def _case_multiquery(rng: Random, num_queries: int = 3) -> _Case:
    keys, values = key_phrases(rng, num_queries), _values(rng, num_queries)
    needles = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
    fracs = [None] + [rng.random() for _ in keys[1:]]
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    question = (
        f"\n\nWhat are the special magic numbers for {listed} mentioned in the text above? "
        f"The special magic numbers for {listed} are"
    )
    return _Case(needles, fracs, question, values)


def _generate(
    task: str, make_case: Callable[..., _Case], tokenizer: Any, n_per_cell: int,
    lengths: list[int], depths: list[float], seed: int, **case_kw: Any,
) -> list[Sample]:
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = (task, seed, length, i)
            case = make_case(rng_for(*key, "case"), **case_kw)
            for depth in depths:
                needles = [(t, depth if f is None else f) for t, f in zip(case.needles, case.fracs)]
                hay = build_haystack(
                    tokenizer, length, stream=SentenceStream(rng_for(*key, "filler")),
                    header=HEADER, needles=needles, footer=case.question, what=task,
                )
                samples.append(Sample(
                    task=task,
                    sample_id=f"{task}-s{seed}-L{length}-d{depth:.3f}-{i}",
                    prompt=hay.prompt,
                    answers=list(case.answers),
                    metric="ruler_all",
                    context_length=length,
                    depth=depth,
                    meta={
                        "needle_char_span": hay.needle_spans[0],
                        "needle_char_spans": hay.needle_spans,
                        "haystack_char_span": hay.haystack_span,
                    },
                ))
    return samples


@register_task("ruler_single", "RULER single needle: one key -> one number")
def generate_single(tokenizer, *, n_per_cell, lengths, depths, seed):
    return _generate("ruler_single", _case_single, tokenizer, n_per_cell, lengths, depths, seed)


@register_task("ruler_multikey", "RULER multi-key: distractor keys, one queried")
def generate_multikey(tokenizer, *, n_per_cell, lengths, depths, seed, num_keys: int = 4):
    return _generate("ruler_multikey", _case_multikey, tokenizer, n_per_cell, lengths, depths, seed,
                     num_keys=num_keys)


@register_task("ruler_multivalue", "RULER multi-value: one key with several numbers, all asked")
def generate_multivalue(tokenizer, *, n_per_cell, lengths, depths, seed, num_values: int = 3):
    return _generate("ruler_multivalue", _case_multivalue, tokenizer, n_per_cell, lengths, depths, seed,
                     num_values=num_values)


@register_task("ruler_multiquery", "RULER multi-query: several keys asked at once")
def generate_multiquery(tokenizer, *, n_per_cell, lengths, depths, seed, num_queries: int = 3):
    return _generate("ruler_multiquery", _case_multiquery, tokenizer, n_per_cell, lengths, depths, seed,
                     num_queries=num_queries)
