"""Which tokens of a prompt cover a span of its characters (the needle of a retrieval task).

Fast tokenizers report each token's character offsets (`return_offsets_mapping`). Slow
(pure Python) tokenizers do not: with them the offsets are measured by decoding prefixes of
the token ids. `P(i)`, the length of the text the first `i` tokens decode to, grows with
`i`, so the first and last token of a span are found by bisection, in O(log n) decodes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def char_span_tokens(tokenizer, text: str, span) -> tuple[int, int] | None:
    """Half-open range [start, end) of the tokens of `tokenizer(text, add_special_tokens=True)`
    that overlap characters [span[0], span[1]) of `text`; None where no token does (or, with a
    slow tokenizer whose decoding does not give `text` back, where the span cannot be found)."""
    a, b = int(span[0]), int(span[1])
    if getattr(tokenizer, "is_fast", False):
        offs = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)["offset_mapping"]
        inside = [i for i, (lo, hi) in enumerate(offs) if hi > a and lo < b]
        return (inside[0], inside[-1] + 1) if inside else None
    return decoded_span_tokens(tokenizer, text, (a, b))


def decoded_span_tokens(tokenizer, text: str, span: tuple[int, int]) -> tuple[int, int] | None:
    """`char_span_tokens` without offsets: from the lengths of decoded prefixes (any tokenizer)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])

    prefixes: dict[int, str] = {}

    def prefix(i: int) -> str:  # the text the first i tokens decode to
        if i not in prefixes:
            prefixes[i] = tokenizer.decode(ids[:i], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return prefixes[i]

    def chars(i: int) -> int:  # P(i)
        return len(prefix(i))

    a, b = _in_decoded(tokenizer, ids, text, span)
    if a is None or a >= b:
        return None
    start = _first(lambda i: chars(i + 1) > a, len(ids))  # first token that ends past the span's start
    end = _first(lambda i: chars(i) >= b, len(ids) + 1)  # first token that starts at or after its end
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # A token that changes nothing in the decoded text (the first byte of a multi-byte
    # character, where decoding drops incomplete bytes) belongs with the token that completes it.
    while start > 0 and ids[start - 1] not in special and prefix(start - 1) == prefix(start):
        start -= 1
    return (start, end) if start < end else None


def _in_decoded(tokenizer, ids: list[int], text: str, span: tuple[int, int]) -> tuple[int | None, int | None]:
    """The span in the coordinates of the decoded text: the same where decoding gives `text`
    back; else the occurrence of the span's text nearest to where it stood."""
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    a, b = span
    if decoded == text:
        b = min(b, len(text))  # as offsets do: a span past the end covers what is there
        return (a, b) if a < b else (None, None)
    piece = text[a:b]
    hits = _occurrences(decoded, piece)
    if not hits and len(decoded.lower()) == len(decoded):  # lower-casing tokenizers (positions kept)
        hits = _occurrences(decoded.lower(), piece.lower())
    if not hits:
        log.warning("%s does not decode this prompt back to its text and the span's text %r is not in what it "
                    "decodes to: no tokens for it", type(tokenizer).__name__, piece[:40])
        return None, None
    at = min(hits, key=lambda h: abs(h - a))
    return at, at + len(piece)


def _occurrences(text: str, piece: str) -> list[int]:
    hits, at = [], text.find(piece) if piece else -1
    while at >= 0:
        hits.append(at)
        at = text.find(piece, at + 1)
    return hits


def _first(pred, n: int) -> int:
    """Least i in [0, n) with pred(i) true (pred monotone); n where none is."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
