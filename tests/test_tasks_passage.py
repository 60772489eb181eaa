"""`niah_passage`: real-text needle prompts that share no passage (issue 33, "Independent prompts").

Fast: no model; the one-token-per-word tokenizer of test_tasks.py (~5.3 characters a token on
this corpus, more than the real tokenizers' ~4.1-4.4, so the slots are tested near their limit).
"""

from __future__ import annotations

import itertools
import json
import re

import pandas as pd
import pytest

from smartkv.scoring import score
from smartkv.stats.clusters import attach_passage_clusters, passage_cluster
from smartkv.tasks import TASKS, Sample, generate_task
from smartkv.tasks import bible_corpus
from smartkv.tasks.niah_passage import CLASSIC, DEPTH_RANGE, TEMPLATES, _boundaries
from test_tasks import WordTokenizer

TOK = WordTokenizer()
LENGTHS = [600, 1500, 3000]  # one length of each slot class (1, 2 and 4 units)
TEST_SEEDS = [0, 1, 2, 3, 4, 5]
DEV_SEEDS = [100, 101]
N = 3
WINDOW = 50


def ntok(text: str) -> int:
    return len(TOK.encode(text))


def make(seed: int, n: int = N, lengths=LENGTHS, **kw) -> list[Sample]:
    return generate_task("niah_passage", TOK, n_per_cell=n, lengths=lengths, depths=[], seed=seed, **kw)


@pytest.fixture(scope="module")
def by_split() -> dict[str, list[Sample]]:
    return {"test": [s for seed in TEST_SEEDS for s in make(seed)],
            "dev": [s for seed in DEV_SEEDS for s in make(seed)]}


def passage_of(s: Sample) -> str:
    """The prompt's passage without its needle, white space as in the corpus stream (one space)."""
    h0, h1 = s.meta["haystack_char_span"]
    a, b = s.meta["needle_char_span"]
    return re.sub(r"\s+", " ", s.prompt[h0:a] + " " + s.prompt[b:h1]).strip()


def test_registered_without_a_depth_grid():
    assert TASKS["niah_passage"].uses_depth is False
    # `depths` is ignored: a grid given or not, the same prompts
    assert make(3, n=1, lengths=[600]) == generate_task("niah_passage", TOK, n_per_cell=1, lengths=[600],
                                                        depths=[0.1, 0.5], seed=3)


def test_same_seed_same_prompts_other_seed_other_prompts():
    a = make(0, n=2)
    assert a == make(0, n=2)
    b = make(1, n=2)
    assert {s.prompt for s in a}.isdisjoint(s.prompt for s in b)
    assert [s.answers for s in a] != [s.answers for s in b]
    # a prompt depends on (seed, length, i) alone, not on what else the call asks for
    assert make(0, n=1, lengths=[1500])[0] == [s for s in a if s.context_length == 1500][0]


def test_lengths_within_the_tolerance_of_the_other_tasks(by_split):
    for s in itertools.chain(*by_split.values()):
        assert 0.97 * s.context_length <= ntok(s.prompt) <= s.context_length


def test_no_two_prompts_of_a_split_share_corpus_text(by_split):
    for split, samples in by_split.items():
        stream = bible_corpus.split_text(split).text
        spans = sorted(tuple(s.meta["passage_span"]) for s in samples)
        assert len(spans) == len(TEST_SEEDS if split == "test" else DEV_SEEDS) * N * len(LENGTHS)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start  # disjoint stretches of the split's stream
        for s in samples:
            assert s.meta["split"] == split
            a, b = s.meta["passage_span"]
            assert passage_of(s) == re.sub(r"\s+", " ", stream[a:b])  # verbatim corpus text around the needle
        # No 50-character substring of passage text is in two prompts, unless the corpus itself
        # says it at two places (parallel books: Kings and Chronicles, Matthew and Luke).
        owner: dict[str, int] = {}
        shared = set()
        for k, s in enumerate(samples):
            text = passage_of(s)
            for w in {text[j:j + WINDOW] for j in range(len(text) - WINDOW + 1)}:
                if owner.setdefault(w, k) != k:
                    shared.add(w)
        flat = re.sub(r"\s+", " ", stream)  # passages are compared with white space collapsed (a book break too)
        for w in shared:
            assert flat.count(w) >= 2, w
        assert len(shared) < 0.01 * len(owner)  # measured: ~0.6% of the test windows, ~0% of dev's


def test_dev_and_test_read_disjoint_books(by_split):
    dev_books = {t for _, t in bible_corpus.split_text("dev").book_starts}
    test_books = {t for _, t in bible_corpus.split_text("test").book_starts}
    assert dev_books.isdisjoint(test_books) and len(dev_books | test_books) == 66
    assert "Matthew" in dev_books and "Genesis" in test_books
    used = {split: {b for s in samples for b in s.meta["books"]} for split, samples in by_split.items()}
    assert used["dev"] <= dev_books and used["test"] <= test_books
    test_passages = {passage_of(s) for s in by_split["test"]}
    assert all(passage_of(s) not in bible_corpus.split_text("test").text for s in by_split["dev"])
    assert all(p not in bible_corpus.split_text("dev").text for p in test_passages)


def test_depth_is_drawn_in_range_and_the_needle_sits_there(by_split):
    lo, hi = DEPTH_RANGE
    samples = list(itertools.chain(*by_split.values()))
    for s in samples:
        assert lo <= s.meta["depth_drawn"] <= hi and lo <= s.depth <= hi
        h0, h1 = s.meta["haystack_char_span"]
        a, b = s.meta["needle_char_span"]
        # the needle sits at the sentence boundary nearest to the drawn depth (real text: a long
        # sentence can put the nearest one far from it)
        head, tail = s.prompt[h0:a - 1], s.prompt[b + 1:h1]
        text = head + " " + tail
        cuts = [c for c in _boundaries(text) if lo <= c / len(text) <= hi]
        nearest = min(abs(c / len(text) - s.meta["depth_drawn"]) for c in cuts)
        assert abs(len(head) / len(text) - s.meta["depth_drawn"]) <= nearest + 0.005
        passage = (h1 - h0) - (b - a) - 1
        assert abs((a - h0 - 1) / passage - s.depth) < 0.01
        assert s.prompt[a - 2] in ".!?\"')]"  # after a sentence end
    depths = [s.depth for s in samples]
    assert min(depths) < 0.25 and max(depths) > 0.75 and len(set(depths)) == len(depths)


def test_needle_and_key_appear_once_and_phrasings_vary(by_split):
    samples = list(itertools.chain(*by_split.values()))
    for s in samples:
        key = s.answers[0]
        a, b = s.meta["needle_char_span"]
        needle = s.prompt[a:b]
        assert needle == TEMPLATES[s.meta["template"]].format(key=key)
        assert s.prompt.count(needle) == 1
        assert re.findall(r"\d+", s.prompt) == [key]  # the key once, and no other number
        assert re.fullmatch(r"[1-9]\d{4}", key)
        assert s.prompt.endswith("\nWhat is the pass key? The pass key is")
    assert len({s.meta["template"] for s in samples}) == len(TEMPLATES)
    assert len({s.answers[0] for s in samples}) >= 0.95 * len(samples)


def test_scored_as_niah_is(by_split):
    niah = generate_task("niah", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=0)[0]
    for s in itertools.chain(*by_split.values()):
        key = s.answers[0]
        assert (s.metric, s.target) == (niah.metric, f" {key}")
        assert score(s.metric, s.target, s.answers, s.meta) == 1.0
        assert score(s.metric, f" {key}. Remember it.", s.answers, s.meta) == 1.0
        assert score(s.metric, " 12345", s.answers, s.meta) == float(key == "12345")
        json.dumps(s.meta)
        assert Sample.from_row(s.to_row()) == s


def test_every_prompt_is_its_own_cluster(by_split):
    samples = list(itertools.chain(*by_split.values()))
    assert len({s.cluster for s in samples}) == len(samples)
    assert len({passage_cluster(s.task, s.prompt) for s in samples}) == len(samples)
    tasks = pd.DataFrame([{**s.to_row(), "seed": int(s.sample_id.split("-s")[1].split("-")[0])} for s in samples])
    results = tasks[["task", "sample_id", "seed"]].assign(score=1.0)
    assert attach_passage_clusters(results, tasks)["cluster"].nunique() == len(samples)
    # the same passage with another key would be one cluster: the cluster is the passage
    s = samples[0]
    other = s.prompt.replace(s.answers[0], "12345")
    assert passage_cluster(s.task, other) == passage_cluster(s.task, s.prompt)


def test_capacity_holds_the_planned_study():
    test, dev = bible_corpus.split_text("test"), bible_corpus.split_text("dev")
    # params.yaml's passages: 20 / 10 / 4 prompts a seed at 1k / 2k / 4k on test seeds 0-5 (204) and dev 100-101
    plan = {1024: 20, 2048: 10, 4096: 4}
    assert test.max_seeds(plan) >= 6 and dev.max_seeds(plan) >= 2
    assert 6 * sum(plan.values()) >= 200
    # the default (8) fits the test seeds the generic task tests use (7, 8)
    assert test.max_seeds(8) >= 9


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match=r"test passages hold 6 seeds at per_seed=14 \(seeds 0..5\)"):
        make(6, n=1, lengths=[600], per_seed=14)
    with pytest.raises(ValueError, match="per_seed=2 reserves 2 passages"):
        make(0, n=3, lengths=[600], per_seed=2)
    with pytest.raises(ValueError, match="at most 4096 tokens"):
        make(0, n=1, lengths=[8192])
    with pytest.raises(ValueError, match="layout='block'; allowed: inline, line"):
        make(0, n=1, lengths=[600], layout="block")
    with pytest.raises(ValueError, match="question='which'; allowed: plain, number"):
        make(0, n=1, lengths=[600], question="which")
    with pytest.raises(ValueError, match="phrasing='fancy'; allowed: drawn, classic"):
        make(0, n=1, lengths=[600], phrasing="fancy")
    with pytest.raises(ValueError, match="instruction='loud'; allowed: plain, ask"):
        make(0, n=1, lengths=[600], instruction="loud")
    with pytest.raises(ValueError, match="shorter than a 1024-token prompt"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(bible_corpus, "UNIT_CHARS", 4000)  # ~5.3 characters a word: 1024 words overflow 4,000 characters
        make(0, n=1, lengths=[1024])


def test_line_layout_puts_the_needle_on_its_own_line():
    for s in make(100, n=2, lengths=[600], layout="line"):
        a, b = s.meta["needle_char_span"]
        assert s.prompt[a - 1] == "\n" and s.prompt[b] == "\n"


def test_number_question_asks_for_five_digits_and_keeps_the_passage():
    plain, number = make(100, n=2, lengths=[600]), make(100, n=2, lengths=[600], question="number")
    for p, q in zip(plain, number):
        assert q.prompt.endswith("\nWhat is the pass key, a five-digit number? The pass key is")
        assert (q.answers, q.meta["template"], q.meta["depth_drawn"]) == (p.answers, p.meta["template"], p.meta["depth_drawn"])
        assert q.meta["passage_span"][0] == p.meta["passage_span"][0]  # the same slot, sized anew


def same_draws(p: Sample, q: Sample) -> None:
    """A format variant keeps the prompt's key, drawn depth, template draw and passage slot."""
    assert (q.answers, q.meta["template"], q.meta["depth_drawn"]) == (p.answers, p.meta["template"], p.meta["depth_drawn"])
    assert q.meta["passage_span"][0] == p.meta["passage_span"][0]


def test_classic_phrasing_states_the_key_twice_and_keeps_the_draws():
    drawn, classic = make(100, n=3, lengths=[600, 1500]), make(100, n=3, lengths=[600, 1500], phrasing="classic")
    for p, q in zip(drawn, classic):
        same_draws(p, q)
        key = q.answers[0]
        a, b = q.meta["needle_char_span"]
        assert q.prompt[a:b] == CLASSIC.format(key=key) == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert re.findall(r"\d+", q.prompt) == [key, key]  # the key twice, in the needle alone
        assert q.meta["phrasing"] == "classic" and p.meta["phrasing"] == "drawn"
        assert score(q.metric, q.target, q.answers, q.meta) == 1.0


def test_ask_instruction_names_the_pass_key_before_the_passage():
    plain, ask = make(100, n=2, lengths=[600]), make(100, n=2, lengths=[600], instruction="ask")
    for p, q in zip(plain, ask):
        same_draws(p, q)
        h0 = q.meta["haystack_char_span"][0]
        assert q.prompt[:h0] == ("There is an important info hidden inside a lot of irrelevant text. "
                                 "Find the pass key hidden in the text below; you will be asked for it.\n")
        assert p.prompt[:p.meta["haystack_char_span"][0]].endswith("I will quiz you about the important information there.\n")
        assert q.prompt.endswith("\nWhat is the pass key? The pass key is")
        assert q.meta["instruction"] == "ask"


def test_format_kwargs_combine():
    for s in make(101, n=2, lengths=[600], layout="line", phrasing="classic", instruction="ask", question="number"):
        a, b = s.meta["needle_char_span"]
        assert s.prompt[a - 1] == "\n" == s.prompt[b]
        assert s.prompt[a:b] == CLASSIC.format(key=s.answers[0])
        assert s.prompt.startswith("There is an important info hidden inside a lot of irrelevant text. Find the pass key")
        assert s.prompt.endswith("\nWhat is the pass key, a five-digit number? The pass key is")


PER_CLASS = {1024: 5, 2048: 3, 4096: 1}  # a mapping per_seed: more short prompts than long ones


def test_per_length_slots_never_overlap_and_leave_no_reserved_gap():
    """A per-class `per_seed` gives each (seed, length, i) its own units, packed seed by seed."""
    spans = []
    for seed in (0, 1, 2, 100, 101):
        for length, n in ((600, 5), (1500, 3), (3000, 1)):
            for i in range(n):
                spans.append(bible_corpus.slot(seed, length, i, PER_CLASS))
    for split, n_seeds in (("dev", 2), ("test", 3)):
        mine = sorted((a, b) for s, a, b in spans if s == split)
        assert all(b <= a2 for (_, b), (a2, _) in zip(mine, mine[1:])), "two prompts share a unit"
        # the regions are packed: seed s's units start where seed s-1's end (5 + 3x2 + 1x4 = 15 units)
        assert mine[-1][1] == n_seeds * 15 * bible_corpus.UNIT_CHARS
        assert sum(b - a for a, b in mine) == mine[-1][1]
    assert bible_corpus.seed_units(PER_CLASS) == 15
    assert bible_corpus.split_text("test").max_seeds(PER_CLASS) == bible_corpus.split_text("test").n_units // 15


def test_per_length_slots_generate_distinct_prompts_and_round_trip():
    samples = make(0, n=1, lengths=[600, 1500, 3000], per_seed=PER_CLASS)
    assert len({s.cluster for s in samples}) == 3
    assert samples[0].meta["per_seed"] == {"1024": 5, "2048": 3, "4096": 1}
    assert all(Sample.from_row(s.to_row()) == s for s in samples)


def test_per_length_slots_refuse_what_they_do_not_reserve():
    with pytest.raises(ValueError, match=r"prompt 1 of length 3000: per_seed=.* reserves 1 passages"):
        make(0, n=2, lengths=[3000], per_seed=PER_CLASS)
    with pytest.raises(ValueError, match=r"reserves 0 passages"):
        make(0, n=1, lengths=[3000], per_seed={1024: 2})
    with pytest.raises(ValueError, match=r"per_seed=\{512: 2\}.*allowed: length classes 1024, 2048, 4096"):
        make(0, n=1, lengths=[600], per_seed={512: 2})
    with pytest.raises(ValueError, match=r"per_seed='ten'; allowed: a positive integer, or a mapping"):
        make(0, n=1, lengths=[600], per_seed="ten")
