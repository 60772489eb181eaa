"""Scorers by name: (prediction, answers, meta) -> score in [0, 1].

- `contains`: needle-in-a-haystack passkey, 1 if any gold answer is a substring.
- `ruler_all` / `ruler_part`: RULER's string_match_all / string_match_part (Hsieh et al. 2024):
  case-insensitive substring match, averaged over / maxed over the gold answers.
- `qa_f1`, `rouge_l`, `classification`, `retrieval`, `count`, `code_sim`: LongBench's metrics
  (Bai et al. 2023, `metrics.py`), re-written from their definitions; each is the max over the
  gold answers, as LongBench's `scorer` takes it.

`score` also applies LongBench's first-line rule when meta["first_line_only"] is set.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Any, Callable

Scorer = Callable[[str, list[str], dict], float]


def _contains(prediction: str, answers: list[str], meta: dict) -> float:
    return float(any(a in prediction for a in answers))


def _ruler_all(prediction: str, answers: list[str], meta: dict) -> float:
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def _ruler_part(prediction: str, answers: list[str], meta: dict) -> float:
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench normalization: lower case, drop punctuation and English articles,
    collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _qa_f1(prediction: str, answers: list[str], meta: dict) -> float:
    pred = normalize_answer(prediction).split()
    return max(token_f1(pred, normalize_answer(a).split()) for a in answers)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # LongBench's `rouge` package does not stem; neither do we.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _rouge_l(prediction: str, answers: list[str], meta: dict) -> float:
    scorer = _rouge_scorer()
    return max(scorer.score(a, prediction)["rougeL"].fmeasure for a in answers)


def _classification(prediction: str, answers: list[str], meta: dict) -> float:
    classes = meta.get("all_classes")
    if not classes:
        raise ValueError("classification needs meta['all_classes'], the list of class names")

    def one(gold: str) -> float:
        matched = [c for c in classes if c in prediction]
        # A class that is a substring of the gold class (e.g. "city" in "other city") matched only
        # because the gold one did; LongBench discards it rather than count it as a wrong guess.
        matched = [c for c in matched if not (c in gold and c != gold)]
        return 1.0 / len(matched) if gold in matched else 0.0

    return max(one(a) for a in answers)


def _retrieval(prediction: str, answers: list[str], meta: dict) -> float:
    def one(gold: str) -> float:
        ids = re.findall(r"Paragraph (\d+)", gold)
        if not ids:
            raise ValueError(f"retrieval gold answer {gold!r} has no 'Paragraph N'")
        numbers = re.findall(r"\d+", prediction)
        # Credit shrinks with every other number named, so listing all paragraphs scores low.
        return numbers.count(ids[0]) / len(numbers) if numbers else 0.0

    return max(one(a) for a in answers)


def _count(prediction: str, answers: list[str], meta: dict) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return max(numbers.count(str(a).strip()) / len(numbers) for a in answers)


def _code_sim(prediction: str, answers: list[str], meta: dict) -> float:
    from rapidfuzz import fuzz

    # The first line that is neither a markdown fence nor a comment is the model's next line.
    line = next(
        (l for l in prediction.lstrip("\n").split("\n") if "`" not in l and "#" not in l and "//" not in l),
        "",
    )
    return max(fuzz.ratio(line, a) / 100.0 for a in answers)


SCORERS: dict[str, Scorer] = {
    "contains": _contains,
    "ruler_all": _ruler_all,
    "ruler_part": _ruler_part,
    "qa_f1": _qa_f1,
    "rouge_l": _rouge_l,
    "classification": _classification,
    "retrieval": _retrieval,
    "count": _count,
    "code_sim": _code_sim,
}


def score(metric: str, prediction: str, answers: list[str], meta: dict[str, Any] | None = None) -> float:
    """Score `prediction` against `answers` with scorer `metric`."""
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(sorted(SCORERS))}")
    if not answers:
        raise ValueError(f"metric {metric!r} needs at least one gold answer, got none")
    meta = meta or {}
    if meta.get("first_line_only"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    return float(SCORERS[metric](prediction, list(answers), meta))
