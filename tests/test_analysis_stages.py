"""The repeated-filler passkey task and the params of the `attention` / `sensitivity` stages."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from smartkv.tasks import generate_task
from smartkv.tasks.passkey import FILLER
from stages import attention as attention_stage
from stages import sensitivity as sensitivity_stage
from smartkv.study.params import ParamError

REPO = Path(__file__).resolve().parent.parent


class WordTokenizer:
    """One token per word (with its trailing space): enough to size a prompt."""

    def encode(self, text, add_special_tokens=False):
        return re.findall(r"\s+|\S+\s*", text)

SENSITIVITY = {"seeds": [100], "lengths": [1024], "depths": [0.5], "n_per_cell": 1, "fractions": [0.1, 0.2],
               "low_bits": 2, "high_bits": 4, "group_size": 32, "obs_window": 32, "pool_kernel": 5,
               "sink_tokens": 4, "bootstrap_seed": 0}
ATTENTION = {"seeds": [100], "tasks": ["passkey"], "lengths": [512], "depths": [0.5], "n_per_cell": 1,
             "obs_window": 32, "decode_steps": 8, "sink_tokens": 4,
             "heatmap": {"task": "passkey", "length": 256, "depth": 0.5, "seed": 100}}


def test_passkey_prompt_repeats_one_filler_and_hides_the_key():
    tok = WordTokenizer()
    samples = generate_task("passkey", tok, n_per_cell=2, lengths=[600], depths=[0.1, 0.9], seed=7)
    assert len(samples) == 4
    s = samples[0]
    key = s.answers[0]
    assert len(key) == 5 and key.isdigit()
    a, b = s.meta["needle_char_span"]
    assert key in s.prompt[a:b] and s.prompt.count(key) == 2  # the needle says it twice, nowhere else
    assert s.prompt.count(FILLER) > 10 and len(tok.encode(s.prompt)) <= 600
    assert samples[1].answers == samples[0].answers  # same key along depth
    assert samples[2].answers != samples[0].answers  # another sample, another key
    assert samples[0].meta["needle_char_span"][0] < samples[1].meta["needle_char_span"][0]


@pytest.fixture()
def params() -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["sensitivity"] = copy.deepcopy(SENSITIVITY)
    p["attention"] = copy.deepcopy(ATTENTION)
    return p


def test_good_params_validate(params):
    assert sensitivity_stage.settings(params)["fractions"] == [0.1, 0.2]
    assert attention_stage.settings(params)["heatmap"]["length"] == 256


@pytest.mark.parametrize("key, value, message", [
    ("seeds", [0], "shares [0]"),
    ("fractions", [0.0], "sensitivity.fractions"),
    ("low_bits", 4, "must be below high_bits"),
    ("lengths", [], "sensitivity.lengths"),
])
def test_bad_sensitivity_params(params, key, value, message):
    params["sensitivity"][key] = value
    with pytest.raises(ParamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sensitivity_stage.settings(params)


@pytest.mark.parametrize("key, value, message", [
    ("tasks", ["ruler_vt"], "attention.tasks"),
    ("seeds", [1], "shares \\[1\\]"),
    ("decode_steps", 0, "attention.decode_steps"),
    ("heatmap", {"task": "passkey", "depth": 2.0}, "attention.heatmap.depth"),
])
def test_bad_attention_params(params, key, value, message):
    params["attention"][key] = value
    with pytest.raises(ParamError, match=message):
        attention_stage.settings(params)
