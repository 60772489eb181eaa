"""RULER's needle-in-a-haystack family (Hsieh et al. 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?", Sec. 3.1): single, multi-key, multi-value and
multi-query retrieval of "special magic numbers" keyed by word pairs.

Differences from RULER, kept on purpose so that the default 135M model can do the tasks at
1k-4k tokens (calibration, DESIGN.md): the repeated-filler haystack of the passkey task
(RULER's "noise" haystack; `haystack="prose"` gives our varied sentences instead), and
`digits`-digit values with few needles, so every answer fits in a few tokens. The queried
(or first) needle sits at `depth`; the others at drawn positions. Every prompt draws its own
keys, values, positions and filler block, so each prompt is its own cluster.

`target` (scored teacher-forced) is the answer as the model writes it: the value, or the
values in the order they appear in the text joined with ", ".
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import Any, Callable

from smartkv.tasks.filler import SentenceStream, cycle_maker, key_phrases, repeated_block, rng_for
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
    # Passkey-style multi-value: "{nth}" in a needle is filled with its ordinal in text
    # order, and the target walks the values in that order (see `_ordinal_target`).
    thing: str = ""


def _values(rng: Random, n: int, digits: int = 6) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10 ** digits), n)]


def haystack_stream(kind: str, *key: object) -> SentenceStream:
    """The prompt's filler: `repeat` (a drawn block of plain statements, repeated) or `prose`."""
    if kind == "repeat":
        return SentenceStream(rng_for(*key, "filler"), cycle_maker(repeated_block(rng_for(*key, "block"))))
    if kind == "prose":
        return SentenceStream(rng_for(*key, "filler"))
    raise ValueError(f"haystack={kind!r} is not a haystack kind; allowed: repeat, prose")


def _ask_one(key: str) -> str:
    return (
        f"\n\nWhat is the special magic number for {key} mentioned in the text above? "
        f"The special magic number for {key} is"
    )


# Passkey style (style="passkey"): the needle sentence of the passkey task, keyed by a plain
# noun, which the default model tells apart far better than RULER's word pairs.
THINGS = ["cat", "dog", "horse", "owl", "fox", "bear", "goat", "frog", "duck", "wolf", "lion", "mouse",
          "apple", "lamp", "boat", "door", "coat", "cup", "drum", "kite", "bell", "ring", "shoe", "tent"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
STYLES = ("ruler", "passkey")


def _ask_passkey(thing: str) -> str:
    return f"\n\nWhat is the pass key for the {thing}? The pass key for the {thing} is"


def _case_multikey_passkey(rng: Random, num_keys: int, digits: int) -> _Case:
    things, values = rng.sample(THINGS, num_keys), _values(rng, num_keys, digits)
    needles = [f"The pass key for the {t} is {v}. Remember it." for t, v in zip(things, values)]
    fracs = [None] + [rng.random() for _ in things[1:]]
    return _Case(needles, fracs, _ask_passkey(things[0]), [values[0]])


def _case_multivalue_passkey(rng: Random, num_values: int, digits: int) -> _Case:
    if num_values > len(ORDINALS):
        raise ValueError(f"ruler_multivalue: style='passkey' takes at most {len(ORDINALS)} values, got {num_values}")
    [thing], values = rng.sample(THINGS, 1), _values(rng, num_values, digits)
    needles = [f"The {{nth}} pass key for the {thing} is {v}. Remember it." for v in values]
    fracs = [None] + [rng.random() for _ in values[1:]]
    question = (f"\n\nWhat are the {num_values} pass keys for the {thing}? "
                f"The first pass key for the {thing} is")
    return _Case(needles, fracs, question, values, thing=thing)


def _ordinal_target(thing: str, ordered: list[str]) -> str:
    """' 48213. The second pass key for the cat is 90317' for values in text order."""
    parts = [f" {ordered[0]}"] + [f". The {ORDINALS[k]} pass key for the {thing} is {v}"
                                  for k, v in enumerate(ordered[1:], start=1)]
    return "".join(parts)


def _case_single(rng: Random, digits: int = 6) -> _Case:
    [key], [value] = key_phrases(rng, 1), _values(rng, 1, digits)
    return _Case([f"The special magic number for {key} is {value}."], [None], _ask_one(key), [value])


def _case_multikey(rng: Random, num_keys: int = 4, digits: int = 6, style: str = "ruler") -> _Case:
    if style == "passkey":
        return _case_multikey_passkey(rng, num_keys, digits)
    keys, values = key_phrases(rng, num_keys), _values(rng, num_keys, digits)
    needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
    fracs = [None] + [rng.random() for _ in keys[1:]]
    return _Case(needles, fracs, _ask_one(keys[0]), [values[0]])


def _case_multivalue(rng: Random, num_values: int = 3, digits: int = 6, style: str = "ruler") -> _Case:
    if style == "passkey":
        return _case_multivalue_passkey(rng, num_values, digits)
    [key], values = key_phrases(rng, 1), _values(rng, num_values, digits)
    needles = [f"One of the special magic numbers for {key} is {v}." for v in values]
    fracs = [None] + [rng.random() for _ in values[1:]]
    question = (
        f"\n\nWhat are all the special magic numbers for {key} mentioned in the text above? "
        f"The special magic numbers for {key} are"
    )
    return _Case(needles, fracs, question, values)


def _case_multiquery(rng: Random, num_queries: int = 3, digits: int = 6) -> _Case:
    keys, values = key_phrases(rng, num_queries), _values(rng, num_queries, digits)
    needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
    fracs = [None] + [rng.random() for _ in keys[1:]]
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    question = (
        f"\n\nWhat are the special magic numbers for {listed} mentioned in the text above? "
        f"The special magic numbers for {listed} are"
    )
    return _Case(needles, fracs, question, values)


def _in_text_order(case: _Case, placed: list[tuple[str, float]]) -> list[str]:
    """`case.answers` in the order their needles appear (stable for needles in one slot)."""
    where = {}
    for k, (text, frac) in enumerate(placed):
        for a in case.answers:
            if a in text and a not in where:
                where[a] = (frac, k)
    return sorted(case.answers, key=lambda a: where[a])


def _generate(
    task: str, make_case: Callable[..., _Case], tokenizer: Any, n_per_cell: int,
    lengths: list[int], depths: list[float], seed: int, haystack: str = "repeat", **case_kw: Any,
) -> list[Sample]:
    haystack_stream(haystack)  # a bad kind fails before any prompt is built
    if case_kw.get("style", "ruler") not in STYLES:
        raise ValueError(f"{task}: style={case_kw['style']!r}; allowed: {', '.join(STYLES)}")
    samples = []
    for length in lengths:
        for depth in depths:
            for i in range(n_per_cell):
                key = (task, seed, length, f"{depth:.3f}", i)
                case = make_case(rng_for(*key, "case"), **case_kw)
                needles = [(t, depth if f is None else f) for t, f in zip(case.needles, case.fracs)]
                if case.thing:  # ordinals follow the needles' order in the text
                    rank = sorted(range(len(needles)), key=lambda k: (needles[k][1], k))
                    for pos, k in enumerate(rank):
                        needles[k] = (needles[k][0].replace("{nth}", ORDINALS[pos]), needles[k][1])
                hay = build_haystack(
                    tokenizer, length, stream=haystack_stream(haystack, *key),
                    header=HEADER, needles=needles, footer=case.question, what=task,
                )
                # Multi-value answers follow the text; multi-query answers follow the question.
                ordered = _in_text_order(case, needles) if task == "ruler_multivalue" else case.answers
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
                    target=_ordinal_target(case.thing, ordered) if case.thing else " " + ", ".join(ordered),
                ))
    return samples


@register_task("ruler_single", "RULER single needle: one key -> one number")
def generate_single(tokenizer, *, n_per_cell, lengths, depths, seed, haystack: str = "repeat", digits: int = 6):
    return _generate("ruler_single", _case_single, tokenizer, n_per_cell, lengths, depths, seed,
                     haystack=haystack, digits=digits)


@register_task("ruler_multikey", "RULER multi-key: distractor keys, one queried")
def generate_multikey(tokenizer, *, n_per_cell, lengths, depths, seed, haystack: str = "repeat",
                      num_keys: int = 4, digits: int = 6, style: str = "ruler"):
    return _generate("ruler_multikey", _case_multikey, tokenizer, n_per_cell, lengths, depths, seed,
                     haystack=haystack, num_keys=num_keys, digits=digits, style=style)


@register_task("ruler_multivalue", "RULER multi-value: one key with several numbers, all asked")
def generate_multivalue(tokenizer, *, n_per_cell, lengths, depths, seed, haystack: str = "repeat",
                        num_values: int = 3, digits: int = 6, style: str = "ruler"):
    return _generate("ruler_multivalue", _case_multivalue, tokenizer, n_per_cell, lengths, depths, seed,
                     haystack=haystack, num_values=num_values, digits=digits, style=style)


@register_task("ruler_multiquery", "RULER multi-query: several keys asked at once")
def generate_multiquery(tokenizer, *, n_per_cell, lengths, depths, seed, haystack: str = "repeat",
                        num_queries: int = 3, digits: int = 6):
    return _generate("ruler_multiquery", _case_multiquery, tokenizer, n_per_cell, lengths, depths, seed,
                     haystack=haystack, num_queries=num_queries, digits=digits)
