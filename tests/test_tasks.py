"""Task generators, LongBench loading and scorers: fast, no model, no network."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from smartkv.scoring import SCORERS, score
from smartkv.tasks import TASKS, Sample, generate_task, load_longbench, register_task, task_names
from smartkv.tasks.longbench import truncate_middle
from smartkv.tasks.filler import REPEAT_SENTENCES
from smartkv.tasks.niah import needle_text

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"


class WordTokenizer:
    """One token per word with its trailing white space, so decode(encode(x)) == x exactly."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.inv: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.findall(r"\s+|\S+\s*", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inv)
                self.inv.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.inv[i] for i in ids)


class CharTokenizer:
    """One token per character and no decode: exercises the character-truncation fallback."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


TOK = WordTokenizer()
GENERATED = [n for n in sorted(TASKS) if n != "longbench"]
LENGTHS = [600, 1500]
DEPTHS = [0.0, 0.5, 1.0]
DRAWN_DEPTH = {"niah_passage"}


def ntok(text):
    return len(TOK.encode(text))


@pytest.fixture(scope="module")
def generated():
    return {n: generate_task(n, TOK, n_per_cell=2, lengths=LENGTHS, depths=DEPTHS, seed=7) for n in GENERATED}


def test_every_task_is_registered():
    assert set(task_names()) == {
        "niah", "niah_passage", "passkey", "ruler_single", "ruler_multikey", "ruler_multivalue", "ruler_multiquery",
        "ruler_vt", "ruler_cwe", "ruler_fwe", "perplexity", "longbench",
    }


@pytest.mark.parametrize("name", GENERATED)
def test_samples_are_well_formed(generated, name):
    samples = generated[name]
    cells = len(LENGTHS) * 2 * (len(DEPTHS) if TASKS[name].uses_depth else 1)
    assert len(samples) == cells
    assert len({s.sample_id for s in samples}) == len(samples)
    for s in samples:
        assert s.task == name
        assert s.metric in SCORERS or s.metric == "perplexity"
        assert s.context_length in LENGTHS
        # Sized by tokens: never over the target, at most 3% under it.
        assert 0.97 * s.context_length <= ntok(s.prompt) <= s.context_length
        json.dumps(s.meta)
        assert s.cluster
        if s.target and name != "perplexity":
            # The teacher-forced gold continuation is itself a right answer.
            assert s.target.startswith(" ")
            assert score(s.metric, s.target, s.answers, s.meta) == 1.0
        if name == "perplexity":
            assert s.answers == [] and s.depth is None
        else:
            assert s.answers and all(isinstance(a, str) and a for a in s.answers)
            # Every gold answer must be recoverable from the context itself.
            for a in s.answers:
                assert a in s.prompt
            assert score(s.metric, " ".join(s.answers), s.answers, s.meta) == 1.0
            assert score(s.metric, "I do not know.", s.answers, s.meta) == 0.0
        if TASKS[name].uses_depth:
            assert s.depth in DEPTHS
        elif name in DRAWN_DEPTH:  # the task draws each prompt's depth itself (tests/test_tasks_passage.py)
            assert 0.05 <= s.depth <= 0.95
        else:
            assert s.depth is None


@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_samples_other_seed_other_values(generated, name):
    again = generate_task(name, TOK, n_per_cell=2, lengths=LENGTHS, depths=DEPTHS, seed=7)
    assert again == generated[name]
    other = generate_task(name, TOK, n_per_cell=2, lengths=LENGTHS, depths=DEPTHS, seed=8)
    assert [s.prompt for s in other] != [s.prompt for s in generated[name]]
    if name != "perplexity":
        assert [s.answers for s in other] != [s.answers for s in generated[name]]


@pytest.mark.parametrize("name", ["niah", "ruler_single", "ruler_multikey", "ruler_multivalue", "ruler_multiquery"])
def test_needle_sits_at_its_depth(generated, name):
    for s in generated[name]:
        a, b = s.meta["needle_char_span"]
        h0, h1 = s.meta["haystack_char_span"]
        assert s.answers[0] in s.prompt[a:b]
        # Depth counts filler only: take the other needles (and their separators) out first.
        others = [(x, y) for x, y in s.meta.get("needle_char_spans", [[a, b]]) if (x, y) != (a, b)]
        before = sum(y - x + 1 for x, y in others if x < a)
        filler = (h1 - h0) - (b - a + 1) - sum(y - x + 1 for x, y in others)
        assert abs((a - h0 - before) / filler - s.depth) < 0.02


def test_niah_is_the_classic_repeated_filler_passkey(generated):
    for s in generated["niah"]:
        assert s.prompt.startswith("There is an important info hidden inside a lot of irrelevant text.")
        assert s.prompt.endswith("\n\nWhat is the pass key? The pass key is")
        needle = needle_text(s.answers[0])
        assert s.prompt.count(needle) == 1 and s.target == f" {s.answers[0]}"
        h0, h1 = s.meta["haystack_char_span"]
        filler = s.prompt[h0:h1].replace(needle, " ")
        sentences = [x.strip() + "." for x in filler.split(".") if x.strip()]
        assert set(sentences) <= set(REPEAT_SENTENCES)
        assert len(set(sentences)) == 5  # the prompt's own block of five, repeated
        assert len(sentences) >= 4 * 5


def test_niah_classic_block_is_the_original_filler():
    samples = generate_task("niah", TOK, n_per_cell=2, lengths=[600], depths=[0.5], seed=3, block="classic")
    for s in samples:
        h0, h1 = s.meta["haystack_char_span"]
        assert s.prompt[h0:].startswith(" ".join(REPEAT_SENTENCES[:5]))
    assert samples[0].answers != samples[1].answers  # keys still differ per prompt
    with pytest.raises(ValueError, match="block='essay'; allowed: drawn, classic"):
        generate_task("niah", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=3, block="essay")


def test_niah_block_layout_puts_the_needle_between_whole_blocks():
    samples = generate_task("niah", TOK, n_per_cell=2, lengths=[600], depths=[0.1, 0.5, 0.9], seed=4, layout="block")
    default = generate_task("niah", TOK, n_per_cell=2, lengths=[600], depths=[0.1, 0.5, 0.9], seed=4)
    for s, d in zip(samples, default):
        assert s.answers == d.answers  # same key and block: only the layout differs
        assert s.prompt.endswith(".\nWhat is the pass key? The pass key is")
        assert "\n\n" not in s.prompt
        h0, h1 = s.meta["haystack_char_span"]
        n0, n1 = s.meta["needle_char_span"]
        before, after = s.prompt[h0:n0].strip(), s.prompt[n1:h1].strip()
        block = " ".join(x.strip() + "." for x in after.split(".")[:5])
        # the haystack on either side is whole repeats of the prompt's own five-sentence block
        for side in (before, after):
            if side:
                assert side.count(block) * (len(block) + 1) == len(side) + 1
    with pytest.raises(ValueError, match="layout='inline'; allowed: sentence, block"):
        generate_task("niah", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=3, layout="inline")


@pytest.mark.parametrize("name", ["niah", "ruler_multikey", "ruler_multivalue", "ruler_vt"])
def test_every_prompt_is_its_own_cluster(generated, name):
    """No two prompts share a haystack or a key (issue 8: shared material made 18 prompts 6 clusters)."""
    samples = generated[name]
    assert len({s.cluster for s in samples}) == len(samples)
    assert all(s.cluster == s.sample_id for s in samples)
    assert len({s.answers[0] for s in samples}) == len(samples)
    h = [s.prompt[slice(*s.meta["haystack_char_span"])] for s in samples]
    # The filler differs across prompts of one cell and across depths of one length.
    first_sentences = {x[:200] for x in h}
    assert len(first_sentences) >= len(samples) // 2


def test_multikey_has_distractor_needles(generated):
    for s in generated["ruler_multikey"]:
        spans = s.meta["needle_char_spans"]
        assert len(spans) == 4
        values = [re.search(r"\d{6}", s.prompt[a:b]).group() for a, b in spans]
        assert values[0] == s.answers[0] and len(set(values)) == 4
        assert s.prompt.count(s.answers[0]) == 1


def test_variable_tracking_chain_is_in_order(generated):
    for s in generated["ruler_vt"]:
        names = s.answers
        first = s.prompt.index(f"VAR {names[0]} = {s.meta['value']}.")
        hops = [s.prompt.index(f"VAR {names[h]} = VAR {names[h - 1]}.") for h in range(1, len(names))]
        assert [first] + hops == sorted([first] + hops)


def test_variable_tracking_value_query_needs_a_distractor_chain():
    samples = generate_task("ruler_vt", TOK, n_per_cell=3, lengths=[600], depths=[], seed=3,
                            query="value", num_hops=2, num_chains=2)
    for s in samples:
        value = s.answers[0]
        assert s.target == f" {value}" and s.meta["value"] == value
        assert len(re.findall(r"VAR [A-Z]{5} = \d{5}\.", s.prompt)) == 2  # two chains, two values
        last = re.search(r"What is the value of VAR ([A-Z]{5})\?", s.prompt).group(1)
        # Walk the chain back from the asked variable to its value.
        name = last
        for _ in range(3):
            m = re.search(rf"VAR {name} = (VAR ([A-Z]{{5}})|(\d{{5}}))\.", s.prompt)
            if m.group(3):
                break
            name = m.group(2)
        assert m.group(3) == value
    with pytest.raises(ValueError, match="num_chains >= 2"):
        generate_task("ruler_vt", TOK, n_per_cell=1, lengths=[600], depths=[], seed=3, query="value")
    with pytest.raises(ValueError, match="query='who'"):
        generate_task("ruler_vt", TOK, n_per_cell=1, lengths=[600], depths=[], seed=3, query="who")


def test_passkey_style_multikey_and_multivalue():
    mk = generate_task("ruler_multikey", TOK, n_per_cell=2, lengths=[600], depths=[0.2, 0.8], seed=5,
                       style="passkey", num_keys=3, digits=5)
    for s in mk:
        found = re.findall(r"The pass key for the (\w+) is (\d{5})\. Remember it\.", s.prompt)
        assert len(found) == 3 and len({t for t, _ in found}) == 3
        asked = re.search(r"What is the pass key for the (\w+)\?", s.prompt).group(1)
        assert dict(found)[asked] == s.answers[0] and s.target == f" {s.answers[0]}"
    mv = generate_task("ruler_multivalue", TOK, n_per_cell=2, lengths=[600], depths=[0.2, 0.8], seed=5,
                       style="passkey", num_values=3, digits=5)
    for s in mv:
        found = re.findall(r"The (first|second|third) pass key for the (\w+) is (\d{5})\.", s.prompt)
        # Ordinals follow the text, whichever needle sits at the sample's depth.
        assert [o for o, _, _ in found] == ["first", "second", "third"]
        thing = found[0][1]
        assert sorted(v for _, _, v in found) == sorted(s.answers)
        assert s.prompt.endswith(f"The first pass key for the {thing} is")
        assert s.target == (f" {found[0][2]}. The second pass key for the {thing} is {found[1][2]}"
                            f". The third pass key for the {thing} is {found[2][2]}")
    with pytest.raises(ValueError, match="style='essay'; allowed: ruler, passkey"):
        generate_task("ruler_multikey", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=3, style="essay")


def test_haystack_kinds():
    prose = generate_task("ruler_multikey", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=3, haystack="prose")
    rep = generate_task("ruler_multikey", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=3)
    assert prose[0].answers == rep[0].answers and prose[0].prompt != rep[0].prompt
    assert "The grass is green." not in prose[0].prompt
    with pytest.raises(ValueError, match="haystack='essays'.*allowed: repeat, prose"):
        generate_task("ruler_multikey", TOK, n_per_cell=1, lengths=[600], depths=[0.5], seed=3, haystack="essays")


def test_cwe_common_words_dominate(generated):
    for s in generated["ruler_cwe"]:
        body = s.prompt.split("\n\n")[1]
        counts = Counter(re.findall(r"\d+\. (\S+)", body))
        assert all(counts[w] == s.meta["freq_common"] for w in s.answers)
        others = [c for w, c in counts.items() if w not in s.answers]
        assert max(others) == s.meta["freq_uncommon"] < s.meta["freq_common"]


def test_fwe_answers_are_the_most_frequent(generated):
    for s in generated["ruler_fwe"]:
        body = s.prompt.split("\n\n")[1]
        ranked = Counter(body.split()).most_common(4)
        assert [w for w, _ in ranked[:3]] == s.answers
        assert ranked[2][1] > ranked[3][1]


def test_perplexity_continuation(generated):
    for s in generated["perplexity"]:
        cont = s.meta["continuation"]
        assert cont.startswith(" ") and 512 <= ntok(cont) <= 512 + 30  # at least 512: a sentence over
        assert s.target == cont
        assert s.meta["continuation_tokens"] == ntok(cont)
        # Continuation is new text following the context, not a copy of its end.
        assert not s.prompt.endswith(cont.strip())


def test_sample_row_round_trip_through_parquet(tmp_path, generated):
    pd = pytest.importorskip("pandas")
    samples = generated["niah"][:2] + generated["perplexity"][:1] + generated["ruler_vt"][:1]
    rows = [s.to_row() for s in samples]
    assert all(isinstance(r["answers"], str) and isinstance(r["meta"], str) for r in rows)
    assert [Sample.from_row(r) for r in rows] == samples
    path = tmp_path / "tasks.parquet"
    pd.DataFrame(rows).to_parquet(path)
    back = [Sample.from_row(r) for r in pd.read_parquet(path).to_dict("records")]
    assert back == samples  # NaN depth from pandas comes back as None


# ---- errors ----------------------------------------------------------------------------

def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="no_such_task") as exc:
        generate_task("no_such_task", TOK, n_per_cell=1, lengths=[100], depths=[0.5], seed=0)
    assert "niah" in str(exc.value)


def test_empty_grid_keys_are_named():
    with pytest.raises(ValueError, match="lengths"):
        generate_task("niah", TOK, n_per_cell=1, lengths=[], depths=[0.5], seed=0)
    with pytest.raises(ValueError, match="depths"):
        generate_task("niah", TOK, n_per_cell=1, lengths=[600], depths=[], seed=0)
    with pytest.raises(ValueError, match="depths"):
        generate_task("niah", TOK, n_per_cell=1, lengths=[600], depths=[1.5], seed=0)
    with pytest.raises(ValueError, match="n_per_cell"):
        generate_task("niah", TOK, n_per_cell=0, lengths=[600], depths=[0.5], seed=0)
    # Tasks without a needle take no depths.
    assert len(generate_task("ruler_vt", TOK, n_per_cell=1, lengths=[600], depths=[], seed=0)) == 1


def test_too_short_length_is_explained():
    with pytest.raises(ValueError, match="too short"):
        generate_task("niah", TOK, n_per_cell=1, lengths=[10], depths=[0.5], seed=0)


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="niah"):
        register_task("niah", "again")(lambda *a, **k: [])


# ---- LongBench ---------------------------------------------------------------------------

def test_longbench_fixture_loads():
    tasks = ["hotpotqa", "trec", "passage_retrieval_en"]
    samples = load_longbench(tasks, FIXTURE, 4000, TOK, n_per_task=2, seed=0)
    assert len(samples) == 6
    by_task = {s.task: s for s in samples}
    assert by_task["longbench_hotpotqa"].metric == "qa_f1"
    assert by_task["longbench_trec"].metric == "classification"
    assert by_task["longbench_passage_retrieval_en"].metric == "retrieval"
    for s in samples:
        assert not s.meta["truncated"]
        assert s.meta["dataset"] == s.task.removeprefix("longbench_")
        assert s.context_length == 4000
    trec = by_task["longbench_trec"]
    assert trec.meta["first_line_only"] and "City" in trec.meta["all_classes"]
    assert load_longbench(tasks, FIXTURE, 4000, TOK, n_per_task=2, seed=0) == samples
    assert len(load_longbench(["trec"], FIXTURE, 4000, TOK, n_per_task=10, seed=0)) == 3


def test_longbench_middle_truncation_keeps_head_and_tail():
    [full] = [s for s in load_longbench(["hotpotqa"], FIXTURE, 10_000, TOK, 3, 0) if s.sample_id.startswith("hq-001")]
    [cut] = [s for s in load_longbench(["hotpotqa"], FIXTURE, 40, TOK, 3, 0) if s.sample_id.startswith("hq-001")]
    assert ntok(full.prompt) > 40 and cut.meta["truncated"]
    ids = TOK.encode(full.prompt)
    assert cut.prompt == TOK.decode(ids[:20]) + TOK.decode(ids[-20:])
    assert cut.prompt.startswith("Answer the question using the passages below.")
    assert cut.prompt.endswith("Question: Which river flows past the town where the glass museum stands?\nAnswer:")


def test_truncation_without_decode_cuts_characters():
    text = "HEAD " + "filler words " * 200 + " TAIL?"
    out, truncated = truncate_middle(text, CharTokenizer(), 100)
    assert truncated and len(out) <= 100 and len(out) > 80
    assert out.startswith("HEAD ") and out.endswith(" TAIL?")
    assert truncate_middle("short", CharTokenizer(), 100) == ("short", False)


def test_longbench_through_registry_spans_lengths():
    samples = generate_task("longbench", TOK, n_per_cell=2, lengths=[40, 4000], depths=[], seed=0,
                            source=FIXTURE, tasks=["hotpotqa", "trec"])
    assert len(samples) == 8 and len({(s.task, s.sample_id) for s in samples}) == 8
    assert {s.context_length for s in samples} == {40, 4000}


def test_longbench_missing_sources_are_named(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_longbench(["hotpotqa"], missing, 1000, TOK, 1, 0)
    with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
        load_longbench(["qasper"], FIXTURE, 1000, TOK, 1, 0)
    with pytest.raises(ValueError, match="not_a_dataset"):
        load_longbench(["not_a_dataset"], FIXTURE, 1000, TOK, 1, 0)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RuntimeError, match="local folder"):
        load_longbench(["hotpotqa"], None, 1000, TOK, 1, 0)


# ---- scorers ------------------------------------------------------------------------------

def test_substring_scorers():
    assert score("contains", "The pass key is 12345.", ["12345"]) == 1.0
    assert score("contains", "The pass key is 1234.", ["12345"]) == 0.0
    assert score("ruler_all", "Numbers: 111, 333", ["111", "222", "333"]) == pytest.approx(2 / 3)
    assert score("ruler_all", "ABCDE and fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert score("ruler_part", "only 222 here", ["111", "222"]) == 1.0
    assert score("ruler_part", "none here", ["111", "222"]) == 0.0


def test_qa_f1_exact_values():
    # Normalized: pred [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7.
    assert score("qa_f1", "The cat sat on a mat!", ["cat on mat"]) == pytest.approx(6 / 7)
    assert score("qa_f1", "Paris", ["London", "paris."]) == 1.0  # max over answers
    assert score("qa_f1", "Berlin", ["Paris"]) == 0.0


def test_rouge_l_exact_value():
    # LCS 5 of 6 predicted and 5 gold tokens: P = 5/6, R = 1, F = 10/11.
    assert score("rouge_l", "the cat sat on the mat", ["the cat on the mat"]) == pytest.approx(10 / 11)
    assert score("rouge_l", "", ["the cat"]) == 0.0


def test_longbench_classification_retrieval_count_code():
    classes = {"all_classes": ["City", "Country", "Animal"]}
    assert score("classification", "City", ["City"], classes) == 1.0
    assert score("classification", "City or Country", ["City"], classes) == 0.5
    assert score("classification", "Animal", ["City"], classes) == 0.0
    nested = {"all_classes": ["city", "other city", "date"]}
    assert score("classification", "other city", ["other city"], nested) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        score("classification", "City", ["City"], {})
    assert score("retrieval", "Paragraph 3", ["Paragraph 3"]) == 1.0
    assert score("retrieval", "Paragraph 3 or Paragraph 4", ["Paragraph 3"]) == 0.5
    assert score("retrieval", "I cannot tell", ["Paragraph 3"]) == 0.0
    assert score("count", "There are 5 unique paragraphs.", ["5"]) == 1.0
    assert score("count", "Either 5 or 6.", ["5"]) == 0.5
    assert score("code_sim", "```python\n# next\nx = foo(1)\n```", ["x = foo(1)"]) == 1.0
    assert score("code_sim", "x = foo(2)", ["x = foo(1)"]) == pytest.approx(0.9)


def test_first_line_rule_and_unknown_metric():
    meta = {"all_classes": ["City", "Animal"], "first_line_only": True}
    pred = "City\nQuestion: Which bird sings?\nType: Animal"
    assert score("classification", pred, ["City"], meta) == 1.0
    assert score("classification", pred, ["City"], {**meta, "first_line_only": False}) == 0.5
    with pytest.raises(ValueError, match="bleu") as exc:
        score("bleu", "x", ["x"])
    assert "qa_f1" in str(exc.value)
    with pytest.raises(ValueError, match="gold answer"):
        score("qa_f1", "x", [])
