"""LongBench v1 (Bai et al. 2023, "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding"): real long-context tasks, loaded from a local folder of LongBench's own JSONL
files or from the Hugging Face hub, prompted and truncated as LongBench's `pred.py` does.

Prompt templates follow the structure of LongBench's `dataset2prompt` (instruction, context,
the instruction restated, the question) in our own words; generation budgets follow its
`dataset2maxlen`; metrics follow its `dataset2metric`. Samples are named
``longbench_<dataset>`` so each dataset keeps its own metric in the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from random import Random
from typing import Any

from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample
from smartkv.tasks.sizing import count_tokens

_QA_MULTI = (
    "Answer the question using the passages below. Reply with the answer only, no other words.\n\n"
    "The passages:\n{context}\n\n"
    "Answer the question using the passages above. Reply with the answer only, no other words.\n\n"
    "Question: {input}\nAnswer:"
)
_CODE = "Complete the code below.\n{context}Next line of code:\n"

PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story (a novel or a film script) and a question about it. Answer as briefly as "
        "you can, in a single phrase if possible, with no explanation.\n\nStory: {context}\n\n"
        "Now answer the question about the story as briefly as you can, in a single phrase if possible, "
        "with no explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer in a single phrase or sentence if you "
        "can. If the article does not answer it, write \"unanswerable\". For a yes/no question, answer "
        "\"yes\", \"no\" or \"unanswerable\". Give no explanation.\n\nArticle: {context}\n\n"
        "Answer the question about the article in a single phrase or sentence if you can; write "
        "\"unanswerable\" if it cannot be answered; answer \"yes\", \"no\" or \"unanswerable\" to a "
        "yes/no question. Give no explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the text below and answer briefly.\n\n{context}\n\n"
        "Answer the question below from the text above. Give only the answer, no other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "hotpotqa": _QA_MULTI,
    "2wikimqa": _QA_MULTI,
    "musique": _QA_MULTI,
    "gov_report": (
        "Below is a report from a government agency. Write a one-page summary of it.\n\n"
        "Report:\n{context}\n\nNow write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "Below is a meeting transcript, followed by a query that asks a question or gives an "
        "instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\n"
        "Now answer the query from the transcript above in one or more sentences.\n\n"
        "Query: {input}\nAnswer:"
    ),
    "multi_news": (
        "Below are several news articles. Write a one-page summary of all of them.\n\n"
        "News:\n{context}\n\nNow write a one-page summary of all the news above.\n\nSummary:"
    ),
    "trec": "Classify the type of the last question. Some example questions with their types come first.\n\n{context}\n{input}",
    "triviaqa": (
        "Answer the question from the passage. Give only the answer, no other words. Some examples "
        "come first.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue in a few short sentences. Some examples come first.\n\n{context}\n\n{input}",
    "passage_count": (
        "Below are paragraphs taken from Wikipedia; some may appear more than once. Read them carefully "
        "and count how many different paragraphs there are once duplicates are removed.\n\n{context}\n\n"
        "Give the number of distinct paragraphs. Reply with the number only, such as 1, 2 or 3.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Below are 30 paragraphs from Wikipedia and then an abstract. Find the paragraph the abstract "
        "was written from.\n\n{context}\n\nHere is the abstract.\n\n{input}\n\n"
        "Reply with the number of the paragraph the abstract comes from, in the form \"Paragraph 1\", "
        "\"Paragraph 2\" and so on.\n\nThe answer is: "
    ),
    "lcc": _CODE,
    "repobench-p": "Complete the code below.\n{context}{input}Next line of code:\n",
}

METRICS: dict[str, str] = {
    **{t: "qa_f1" for t in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")},
    **{t: "rouge_l" for t in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
    "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

# Few-shot tasks whose models continue the pattern past one answer; LongBench's eval.py keeps
# only the first line of the prediction for these.
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum"}


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a minimal tokenizer without the keyword
        return tokenizer.decode(ids)


def truncate_middle(prompt: str, tokenizer: Any, max_tokens: int) -> tuple[str, bool]:
    """LongBench's middle truncation: over `max_tokens`, keep the first and last half of the
    tokens (the instruction and the question live at the two ends).

    Without `tokenizer.decode`, cut characters instead: keep the same fraction of characters
    as of tokens, half from each end, then shrink by 5% until the text fits.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return prompt, False
    half = max_tokens // 2
    if callable(getattr(tokenizer, "decode", None)):
        return _decode(tokenizer, ids[:half]) + _decode(tokenizer, ids[len(ids) - half:]), True
    keep = int(len(prompt) * max_tokens / len(ids))
    while True:
        head, tail = prompt[: keep // 2], prompt[len(prompt) - keep // 2:]
        if count_tokens(tokenizer, head + tail) <= max_tokens or keep <= 1:
            return head + tail, True
        keep = int(keep * 0.95)


def read_records(task: str, source: str | Path | None) -> list[dict[str, Any]]:
    """LongBench records of `task` from `<source>/<task>.jsonl`, or from the hub if source is None."""
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"LongBench folder not found: {folder}")
        path = folder / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"LongBench task file not found: {path}")
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    try:
        import datasets  # optional extra: pip install smartkv[longbench]
    except ImportError as exc:
        raise RuntimeError(
            "LongBench from the hub needs the `datasets` package, which is not installed; "
            "pass a local folder instead (source=...) holding <task>.jsonl files in LongBench's "
            "JSONL schema (the unzipped data.zip of THUDM/LongBench)"
        ) from exc
    try:
        return [dict(r) for r in datasets.load_dataset("THUDM/LongBench", task, split="test")]
    except Exception as exc:  # offline, or a datasets release that no longer runs the hub script
        raise RuntimeError(
            f"could not load LongBench task {task!r} from the hub ({type(exc).__name__}: {exc}); "
            "pass a local folder instead (source=...) holding <task>.jsonl files in LongBench's JSONL schema"
        ) from exc


def make_sample(record: dict[str, Any], task: str, tokenizer: Any, max_context_tokens: int) -> Sample:
    prompt = PROMPTS[task].format(context=record["context"], input=record["input"])
    prompt, truncated = truncate_middle(prompt, tokenizer, max_context_tokens)
    return Sample(
        task=f"longbench_{task}",
        sample_id=f"{record['_id']}-L{max_context_tokens}",
        prompt=prompt,
        answers=[str(a) for a in record["answers"]],
        metric=METRICS[task],
        context_length=max_context_tokens,
        depth=None,
        meta={
            "dataset": task,
            "all_classes": record.get("all_classes"),
            "length": record.get("length"),
            "language": record.get("language"),
            "max_new_tokens": MAX_NEW_TOKENS[task],
            "first_line_only": task in FIRST_LINE_ONLY,
            "truncated": truncated,
            "n_prompt_tokens": count_tokens(tokenizer, prompt),
        },
    )


def _check_tasks(task_names: list[str]) -> None:
    unknown = [t for t in task_names if t not in PROMPTS]
    if unknown:
        raise ValueError(f"unknown LongBench task(s) {unknown}; known: {', '.join(sorted(PROMPTS))}")
    if not task_names:
        raise ValueError("task_names is empty; name at least one LongBench task")


def _select(records: list[dict[str, Any]], n: int, seed: int, task: str) -> list[dict[str, Any]]:
    if n >= len(records):
        return records
    # A seeded subset, kept in file order so a larger n extends rather than reshuffles.
    keep = sorted(Random(f"longbench|{task}|{seed}").sample(range(len(records)), n))
    return [records[k] for k in keep]


def load_longbench(
    task_names: list[str],
    source: str | Path | None,
    max_context_tokens: int,
    tokenizer: Any,
    n_per_task: int,
    seed: int,
) -> list[Sample]:
    """Up to `n_per_task` seeded samples of each LongBench task, middle-truncated to fit."""
    _check_tasks(list(task_names))
    samples = []
    for task in task_names:
        for record in _select(read_records(task, source), n_per_task, seed, task):
            samples.append(make_sample(record, task, tokenizer, max_context_tokens))
    return samples


@register_task("longbench", "LongBench v1 datasets from a local JSONL folder or the hub", uses_depth=False)
def generate(
    tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
    source: str | Path | None = None, tasks: list[str] | None = None,
) -> list[Sample]:
    """Each length is a `max_context_tokens`; `tasks` defaults to every dataset with a template."""
    names = list(tasks) if tasks is not None else sorted(PROMPTS)
    _check_tasks(names)
    samples = []
    for task in names:
        records = _select(read_records(task, source), n_per_cell, seed, task)
        for length in lengths:
            samples.extend(make_sample(r, task, tokenizer, length) for r in records)
    return samples
