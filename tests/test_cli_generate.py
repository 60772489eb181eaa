"""`python -m smartkv generate` on the real default model with the library's defaults, the study's
headline config: a budget below the 2-bit floor runs (the 0-bit tier evicts), and `--json` says what
the policy did (re-allocations, values per width, evicted tokens)."""

from __future__ import annotations

import json

import pytest

from smartkv.cli import main

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PROMPT = FILLER * 12 + "The pass key is 52173. Remember it. " + FILLER * 12 + "What is the pass key? The pass key is"


@pytest.mark.slow
def test_generate_below_the_2_bit_floor_evicts_and_reports_it(capsys):
    assert main(["generate", "--method", "smartkv", "--budget", "0.1", "--prompt", PROMPT, "--max-new-tokens", "3",
                 "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["bits"] == [0, 2, 3, 4, 8] and out["budget_met"] and out["kv_ratio"] <= 0.1
    hist = {int(b): n for b, n in out["bits_histogram"].items()}
    assert hist[0] > 0 and out["reallocations"] >= 1
    tokens = out["prompt_tokens"] + out["new_tokens"] - 1  # what the cache holds
    # evicted tokens per layer on average: values at 0 bits over the values a token holds in every layer
    assert out["evicted_tokens"] == pytest.approx(hist[0] * tokens / sum(hist.values()), abs=0.01)
    assert 0 < out["evicted_tokens"] < tokens
