"""Size a prompt to a target number of tokens of the model's own tokenizer.

A context length in the grid means tokens, not characters or words, so every generator
builds its prompt from a count of units (sentences, list items, words) and searches for the
largest count whose prompt still fits. Token counts are monotone in the unit count up to
BPE merges at one boundary, which the search tolerates.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of `text` without BOS/EOS, the way the prompt is measured everywhere here."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def fit_units(
    build: Callable[[int], T],
    text_of: Callable[[T], str],
    tokenizer: Any,
    target: int,
    *,
    what: str = "prompt",
) -> tuple[int, T]:
    """The largest n with tokens(build(n)) <= target, and build(n).

    Estimates tokens per unit from a small probe, then brackets and bisects, so a long
    target costs about a dozen tokenizer calls rather than one per unit.
    """
    cache: dict[int, tuple[int, T]] = {}

    def tokens(n: int) -> int:
        if n not in cache:
            built = build(n)
            cache[n] = (count_tokens(tokenizer, text_of(built)), built)
        return cache[n][0]

    base = tokens(0)
    if base > target:
        raise ValueError(
            f"{what}: target length {target} tokens is too short; the fixed parts alone take {base}"
        )
    probe = 16
    per_unit = max((tokens(probe) - base) / probe, 1e-3)
    guess = max(0, int((target - base) / per_unit))
    step = max(1, guess // 32)
    if tokens(guess) <= target:
        lo, hi = guess, None
        while hi is None:
            if tokens(lo + step) > target:
                hi = lo + step
            else:
                lo += step
                step *= 2
            if lo > 10_000_000:
                raise RuntimeError(f"{what}: prompt does not grow with its unit count")
    else:
        lo, hi = None, guess
        while lo is None:
            n = max(0, hi - step)
            if tokens(n) <= target:
                lo = n
            else:
                hi = n
                step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens(mid) <= target:
            lo = mid
        else:
            hi = mid
    tokens(lo)
    return lo, cache[lo][1]
