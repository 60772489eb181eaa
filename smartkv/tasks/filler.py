"""Our own filler text: varied simple English sentences and pronounceable nonsense words.

Needle-in-a-haystack (Kamradt 2023) and RULER (Hsieh et al. 2024) hide needles in essays or
in a repeated "The grass is green..." noise. We generate the haystack ourselves from small
word lists so the study is offline, license-free and deterministic from a seed. Filler
holds no digits, so a numeric needle is the only number in the haystack.
"""

from __future__ import annotations

import random
from typing import Callable

SUBJECTS = [
    "the farmer", "a young teacher", "the old sailor", "my neighbor", "the baker",
    "a quiet student", "the gardener", "her brother", "the painter", "a tired doctor",
    "the carpenter", "our guide", "the musician", "a curious child", "the librarian",
    "the shepherd", "a traveling merchant", "the fisherman", "his aunt", "the mayor",
]
VERBS = [
    "carried", "painted", "found", "cleaned", "watched", "borrowed", "repaired", "described",
    "planted", "sold", "noticed", "folded", "opened", "measured", "admired", "packed",
    "wrapped", "moved", "counted", "polished",
]
OBJECTS = [
    "a wooden chair", "the blue basket", "an old map", "the garden gate", "a heavy book",
    "the copper kettle", "a paper kite", "the green umbrella", "a bag of apples",
    "the broken clock", "a small boat", "the wool blanket", "a glass jar", "the iron key",
    "a box of candles", "the silver spoon", "a pair of boots", "the linen shirt",
    "a basket of bread", "the painted fence",
]
PLACES = [
    "near the river", "in the market", "behind the barn", "at the station", "on the hill",
    "inside the kitchen", "by the lake", "in the small village", "under the bridge",
    "along the road", "in the quiet library", "beside the mill", "at the harbor",
    "in the orchard", "on the porch", "across the field",
]
TIMES = [
    "In the morning", "Before lunch", "Late in the evening", "After the rain", "On a cold day",
    "Just before dawn", "During the festival", "On a windy afternoon", "After supper",
    "At the end of the week",
]
ADJECTIVES = [
    "calm", "bright", "gentle", "dusty", "warm", "narrow", "crowded", "peaceful", "golden",
    "muddy", "pleasant", "windy", "silent", "busy", "cheerful", "gray",
]
NOUNS = [
    "day", "street", "meadow", "afternoon", "room", "season", "journey", "evening", "garden",
    "week", "harbor", "road",
]

_TEMPLATES: list[Callable[[random.Random], str]] = [
    lambda r: f"{_cap(r.choice(SUBJECTS))} {r.choice(VERBS)} {r.choice(OBJECTS)} {r.choice(PLACES)}.",
    lambda r: f"{r.choice(TIMES)}, {r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(OBJECTS)}.",
    lambda r: f"It was a {r.choice(ADJECTIVES)} {r.choice(NOUNS)} {r.choice(PLACES)}.",
    lambda r: f"{_cap(r.choice(SUBJECTS))} said that the {r.choice(NOUNS)} felt {r.choice(ADJECTIVES)}.",
    lambda r: f"{_cap(r.choice(SUBJECTS))} and {r.choice(SUBJECTS)} walked {r.choice(PLACES)}.",
    lambda r: f"Nobody remembered who {r.choice(VERBS)} {r.choice(OBJECTS)} {r.choice(PLACES)}.",
    lambda r: f"The {r.choice(NOUNS)} was {r.choice(ADJECTIVES)}, and {r.choice(SUBJECTS)} smiled.",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def rng_for(*parts: object) -> random.Random:
    """A private RNG keyed by `parts`; str seeds hash with SHA-512, so runs are reproducible
    regardless of PYTHONHASHSEED."""
    return random.Random("|".join(str(p) for p in parts))


def filler_sentence(rng: random.Random) -> str:
    return rng.choice(_TEMPLATES)(rng)


class SentenceStream:
    """An append-only list of sentences drawn lazily from one RNG.

    Sizing a prompt asks for prefixes of different lengths; because the list only grows, the
    first n sentences are the same whatever was asked before, so results stay deterministic.
    """

    def __init__(self, rng: random.Random, make: Callable[[random.Random], str] = filler_sentence):
        self._rng = rng
        self._make = make
        self._items: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._items) < n:
            self._items.append(self._make(self._rng))
        return self._items[:n]


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "br", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "l", "r", "s", "k"]


def pseudo_words(rng: random.Random, n: int, *, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct pronounceable nonsense words (2-3 syllables), e.g. 'brolen', 'zaiku'."""
    seen = set(exclude or ())
    out: list[str] = []
    while len(out) < n:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice((2, 2, 3)))
        )
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def english_words() -> list[str]:
    """The distinct single English words of our lists (nouns, adjectives, verbs, objects)."""
    words: set[str] = set(ADJECTIVES) | set(NOUNS) | set(VERBS)
    for phrase in OBJECTS + SUBJECTS:
        words.add(phrase.split()[-1])
    return sorted(words)


def key_phrases(rng: random.Random, n: int) -> list[str]:
    """`n` distinct hyphenated adjective-noun keys (RULER uses such word pairs as needle keys)."""
    nouns = sorted({p.split()[-1] for p in OBJECTS} | set(NOUNS))
    pool = [f"{a}-{b}" for a in ADJECTIVES for b in nouns]
    return rng.sample(pool, n)


def distinct_word_maker(exclude: set[str] | None = None) -> Callable[[random.Random], str]:
    """A `SentenceStream` maker that yields pseudo-words never seen before (nor in `exclude`)."""
    seen = set(exclude or ())

    def make(rng: random.Random) -> str:
        word = pseudo_words(rng, 1, exclude=seen)[0]
        seen.add(word)
        return word

    return make


# The passkey haystack of Mohtashami & Jaggi (2023, "Landmark Attention"): a few plain
# statements repeated until the context is full. Small models find a needle in it far more
# reliably than in varied prose (DESIGN.md, "Calibration"). The first five are the original
# block; the rest let every prompt draw its own block, so no two prompts share a haystack.
REPEAT_SENTENCES = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
    "There and back again.", "The snow is white.", "The night is dark.", "The sea is deep.",
    "The road is long.", "The fire is warm.", "The stone is grey.", "The wind is cold.",
    "The river is wide.", "The hill is steep.", "The bread is fresh.", "The bell is loud.",
]


def repeated_block(rng: random.Random, size: int = 5) -> list[str]:
    """A prompt's own filler block: `size` distinct statements of `REPEAT_SENTENCES` in a drawn order."""
    return rng.sample(REPEAT_SENTENCES, size)


def cycle_maker(block: list[str]) -> Callable[[random.Random], str]:
    """A `SentenceStream` maker that repeats `block` forever (it ignores the RNG)."""
    state = {"next": 0}

    def make(_rng: random.Random) -> str:
        sentence = block[state["next"] % len(block)]
        state["next"] += 1
        return sentence

    return make
