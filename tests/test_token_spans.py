"""Needle spans in tokens: from offsets (fast tokenizers) and from decoded prefixes (slow ones)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer, ByT5Tokenizer

from smartkv.demo import needle_tokens
from smartkv.evaluate import needle_token_span
from smartkv.models import default_model_dir
from smartkv.tasks.sample import Sample
from smartkv.token_spans import char_span_tokens, decoded_span_tokens

TEXT = "Le café ouvre à 7h. The pass key is 48213. Remember it: 48213. Ünïcödé ends here."


def _byt5_tokens(text: str, a: int, b: int) -> tuple[int, int]:
    """ByT5 gives one token per UTF-8 byte (no BOS): the span's tokens are its bytes."""
    return len(text[:a].encode()), len(text[:b].encode())


@pytest.mark.parametrize("piece", ["café", "48213", "Ünïcödé", "à 7h", "L", "here."])
def test_slow_tokenizer_needle_tokens_from_decoded_prefixes(piece):
    tok = ByT5Tokenizer()  # a pure-Python tokenizer, built without files: no offsets mapping
    assert not tok.is_fast
    a = TEXT.index(piece)
    b = a + len(piece)
    expected = _byt5_tokens(TEXT, a, b)
    assert char_span_tokens(tok, TEXT, (a, b)) == expected
    # the two callers agree: evaluate's inclusive range, the demo's half-open one
    sample = Sample(task="t", sample_id="s", prompt=TEXT, answers=["48213"], metric="exact", context_length=0,
                    meta={"needle_char_span": [a, b]})
    assert needle_token_span(tok, sample) == (expected[0], expected[1] - 1)
    assert needle_tokens(tok, TEXT, (a, b)) == expected


def test_span_missing_from_what_a_slow_tokenizer_decodes_gives_none():
    tok = ByT5Tokenizer()
    # a span past the text's end covers no token
    assert char_span_tokens(tok, TEXT, (len(TEXT) + 5, len(TEXT) + 9)) is None


def test_slow_tokenizer_that_does_not_decode_the_text_back(tmp_path):
    """A lower-casing WordPiece tokenizer decodes "48213." as "48213 .": the span is found in
    what it decodes to, at the occurrence nearest to where it stood (the second pass key)."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = "[PAD] [UNK] [CLS] [SEP] [MASK] the pass key is 482 ##13 . remember it : grass".split()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    text = "The pass key is 48213. Remember it: 48213. Grass"
    pieces = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    a = text.index("48213", 20)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) != text
    start, end = char_span_tokens(tok, text, (a, a + 5))
    assert pieces[start:end] == ["482", "##13"] and start > pieces.index("remember")
    start, end = char_span_tokens(tok, text, (text.index("Grass"), len(text)))
    assert pieces[start:end] == ["grass"]


@pytest.fixture(scope="module")
def fast_tokenizer():
    path = default_model_dir()
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the default model's tokenizer is not converted under {path} "
                    "(the first `load_model('default')` converts it)")
    return AutoTokenizer.from_pretrained(str(path))


def test_decoded_prefixes_match_offsets_on_a_fast_tokenizer(fast_tokenizer):
    """The fallback, forced on a fast tokenizer, finds the tokens its offsets name."""
    assert fast_tokenizer.is_fast
    rng = random.Random(0)
    text = TEXT * 3
    spans = [(text.index("48213"), text.index("48213") + 5), (0, 4), (len(text) - 6, len(text))]
    for _ in range(20):
        a = rng.randrange(len(text) - 1)
        spans.append((a, rng.randrange(a + 1, min(len(text), a + 30) + 1)))
    for span in spans:
        assert decoded_span_tokens(fast_tokenizer, text, span) == char_span_tokens(fast_tokenizer, text, span), span
