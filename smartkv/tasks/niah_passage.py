"""Needle in a haystack of real text: every prompt its own passage, depth, key and phrasing.

    <instruction>
    <a passage of the World English Bible ... The pass key is 48213. Remember it. ...>
    What is the pass key? The pass key is

The classic layout (`niah` with `block: classic`) fixes the haystack per (length, depth), so the
study's 245 needle prompts were 10 texts once the digits are masked (issue 33, DESIGN.md "A
prompt is not a sample"). Here each prompt gets:

- its own passage: contiguous text of its own slot of the split's stream
  (`smartkv.tasks.bible_corpus`), so no two prompts of a split, of any seed and length, share
  corpus text, and the passage is the prompt's cluster (`Sample.cluster`, and
  `passage_cluster` of the stats, which masks the key's digits, gives every prompt its own);
- dev and test from disjoint books: seeds >= 100 read the New Testament, seeds 0-99 the Old;
- its own depth, drawn uniformly in [0.05, 0.95]; the needle goes at the sentence boundary
  nearest to it, and `depth` records where it went (the fraction of passage characters before
  the needle), `meta["depth_drawn"]` the draw;
- its own five-digit key and its own needle phrasing, drawn from `TEMPLATES`. Every template
  states "the pass key is <key>" once, so the question asks for one thing, and the key's digits
  are the only digits in the prompt.

`question: number` asks for "the pass key, a five-digit number" instead of "the pass key":
on dev, SmolLM2 otherwise often answers "a key that is used to open doors"
(docs/probes/independent_prompts/).

Format kwargs piloted for the FP16 calibration (docs/probes/independent_prompts/), each default
the task as first built. Every variant draws the same passage slot, depth and key per
(seed, length, i), so variants pair prompt for prompt:

- `phrasing: classic` uses the classic two-statement needle of `niah` ("The pass key is K.
  Remember it. K is the pass key.") in every prompt instead of a drawn template (the template is
  still drawn, and recorded, so the keys do not move); the key then appears twice;
- `instruction: ask` names the pass key in the instruction before the passage, as RULER puts the
  query there: "... Find the pass key hidden in the text below; you will be asked for it."

On dev (seeds 100-101, SmolLM2-135M), `layout: line, phrasing: classic, instruction: ask` found
10/10 at each of 1k, 2k and 4k; the default found 6/10, 5/10, 7/10 (the probe's README).

The `depths` grid argument is ignored (the task registers with `uses_depth=False`): a cell is a
length, and `n_per_cell` prompts are drawn per length. The prompt is sized by words to the largest
passage that fits the token target, so it ends where the words run out, mid-sentence or not.
`per_seed` is how many prompts per length each seed may ask for: an integer (the same for every
length), or {length class: n} (1024, 2048, 4096) for a study that wants more short prompts than
long ones. It sets the slots, so changing it moves every passage, and more per seed means fewer
seeds fit (`bible_corpus.slot`).
"""

from __future__ import annotations

import re
from typing import Any

from smartkv.tasks import bible_corpus
from smartkv.tasks.filler import rng_for
from smartkv.tasks.haystack import Haystack
from smartkv.tasks.needle_sample import passkey_sample
from smartkv.tasks.niah import HEADER
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample
from smartkv.tasks.sizing import count_tokens

TASK = "niah_passage"
DEPTH_RANGE = (0.05, 0.95)
TEMPLATES = (
    "The pass key is {key}. Remember it.",
    "Remember this: the pass key is {key}.",
    "Here is the important information: the pass key is {key}.",
    "Note well that the pass key is {key}.",
    "The pass key you will be asked about is {key}. Keep it in mind.",
    "Important: the pass key is {key}. Do not forget it.",
)
# `phrasing: classic`: the needle the repeated-filler `niah` calibrated at FP16 1.0
CLASSIC = "The pass key is {key}. Remember it. {key} is the pass key."
PHRASINGS = ("drawn", "classic")
INSTRUCTIONS = {
    "plain": HEADER.rstrip("\n") + "\n",
    # the question before the passage as well as after it (RULER puts the query in the instruction)
    "ask": "There is an important info hidden inside a lot of irrelevant text. "
           "Find the pass key hidden in the text below; you will be asked for it.\n",
}
LAYOUTS = {
    # the needle between two sentences of the passage, inline
    "inline": (" ", " "),
    # the needle on a line of its own between two sentences
    "line": ("\n", "\n"),
}
QUESTIONS = {
    "plain": "What is the pass key? The pass key is",
    # says what kind of answer is wanted: the default model otherwise often answers "a key that is used to open doors"
    "number": "What is the pass key, a five-digit number? The pass key is",
}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+\S)")
_WORD = re.compile(r"\S+")


def _boundaries(text: str) -> list[int]:
    """Offsets just after each sentence end that another sentence follows (where a needle may go)."""
    return [m.end() for m in _SENTENCE_END.finditer(text)]


def _passage_start(stream: str, start: int, end: int) -> int:
    """The first sentence start in [start, end): the slot's start itself if a book begins there."""
    if start == 0 or stream[start - 1] == "\n":
        return start
    m = _SENTENCE_END.search(stream, start, end)
    if m is None:
        raise ValueError(f"no sentence starts in the passage slot [{start}, {end})")
    return re.compile(r"\S").search(stream, m.end()).start()


def _needle_at(cuts: list[int], n_chars: int, depth: float) -> int:
    """The sentence boundary inside the depth range nearest to `depth` of `n_chars`."""
    lo, hi = DEPTH_RANGE
    inside = [c for c in cuts if c < n_chars and lo <= c / n_chars <= hi]
    if not inside:
        raise ValueError("the passage has no sentence boundary inside the depth range")
    return min(inside, key=lambda c: (abs(c / n_chars - depth), c))


def _assemble(passage: str, cut: int, needle: str, layout: str, question: str,
              instruction: str = "plain") -> Haystack:
    header = INSTRUCTIONS[instruction]
    before, after = LAYOUTS[layout]
    footer = "\n" + QUESTIONS[question]
    head, tail = passage[:cut], passage[cut:].lstrip()
    prompt = header + head + before
    a = len(prompt)
    prompt += needle + after
    hay_end = len(prompt) + len(tail)
    prompt += tail + footer
    return Haystack(prompt, [[a, a + len(needle)]], [len(header), hay_end], len(_boundaries(passage)) + 1)


def build_prompt(tokenizer: Any, target: int, slot_text: str, needle: str, depth: float,
                 layout: str, question: str, instruction: str = "plain") -> tuple[Haystack, str, int]:
    """(haystack, passage, needle cut): the most words of `slot_text` that fit `target` tokens."""
    word_ends = [m.end() for m in _WORD.finditer(slot_text)]
    cuts = _boundaries(slot_text)

    def build(n: int) -> tuple[Haystack, str, int]:
        passage = slot_text[:word_ends[n - 1]]
        cut = _needle_at(cuts, len(passage), depth)
        return _assemble(passage, cut, needle, layout, question, instruction), passage, cut

    def fits(n: int) -> bool:
        return count_tokens(tokenizer, build(n)[0].prompt) <= target

    hi = len(word_ends)
    if fits(hi):
        raise ValueError(f"{TASK}: the passage slot ({len(slot_text)} characters) is shorter than a "
                         f"{target}-token prompt with this tokenizer")
    lo = max(1, min(hi - 1, int(hi * 0.5)))
    while lo > 1 and not fits(lo):
        lo //= 2
    if not fits(lo):
        raise ValueError(f"{TASK}: target length {target} tokens is too short for the instruction and needle")
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return build(lo)


@register_task(TASK, "needle in real text (World English Bible): own passage, depth, key and phrasing per prompt",
               uses_depth=False)
def generate(tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
             per_seed: int | dict[int, int] = 8, layout: str = "inline", question: str = "plain", phrasing: str = "drawn",
             instruction: str = "plain") -> list[Sample]:
    if layout not in LAYOUTS:
        raise ValueError(f"{TASK}: layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
    if question not in QUESTIONS:
        raise ValueError(f"{TASK}: question={question!r}; allowed: {', '.join(QUESTIONS)}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"{TASK}: phrasing={phrasing!r}; allowed: {', '.join(PHRASINGS)}")
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"{TASK}: instruction={instruction!r}; allowed: {', '.join(INSTRUCTIONS)}")
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            split, start, end = bible_corpus.slot(seed, length, i, per_seed)
            stream = bible_corpus.split_text(split).text
            begin = _passage_start(stream, start, end)
            key = (TASK, seed, length, i)
            rng = rng_for(*key)
            drawn = rng.uniform(*DEPTH_RANGE)
            passkey = str(rng.randint(10000, 99999))
            template = rng.randrange(len(TEMPLATES))
            needle = (CLASSIC if phrasing == "classic" else TEMPLATES[template]).format(key=passkey)
            hay, passage, cut = build_prompt(tokenizer, length, stream[begin:end], needle, drawn, layout, question,
                                             instruction)
            sample = passkey_sample(TASK, f"{TASK}-s{seed}-L{length}-{i}", hay, passkey, length, cut / len(passage),
                                    target=f" {passkey}")
            span = [begin, begin + len(passage)]
            sample.meta.update({
                "split": split, "passage_span": span, "books": bible_corpus.split_text(split).books_in(*span),
                "depth_drawn": drawn, "template": template, "layout": layout, "question": question,
                "phrasing": phrasing, "instruction": instruction,
                # JSON keys are strings: the mapping is recorded so, and round-trips through a parquet row
                "per_seed": per_seed if isinstance(per_seed, int) else {str(c): n for c, n in per_seed.items()},
            })
            sample.cluster = f"{TASK}:{split}:{span[0]}-{span[1]}"
            samples.append(sample)
    return samples
