"""The default model (SmolLM2-135M-Instruct) on a ~2k-token passkey prompt: the integration that matters."""

import pytest
import torch

from smartkv.models import load_model
from smartkv.runner import RunSpec, decode, encode, fork, memory_of, prefill
from smartkv.tasks import generate_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    model, tok = load_model("default")
    sample = generate_task("niah", tok, n_per_cell=1, lengths=[2048], depths=[0.5], seed=0)[0]
    ids, mask = encode(tok, [sample.prompt])
    return model, tok, sample, prefill(model, ids, mask)


def run(setup, spec, new=8):
    model, tok, _, pre = setup
    cache, _ = fork(pre, spec, model)
    out, _ = decode(model, pre, cache, new)
    return tok.decode(out[0], skip_special_tokens=True), memory_of(cache), out


@pytest.mark.parametrize("spec", [
    RunSpec("fp16", "fp16"),
    RunSpec("uniform-8", "uniform", {"bits": 8}),
    RunSpec("kivi-4", "kivi", {"bits": 4}),
    RunSpec("smartkv-0.3", "smartkv", {"budget": 0.3}),
], ids=lambda s: s.label)
def test_passkey_found(setup, spec):
    text, mem, _ = run(setup, spec)
    assert setup[2].answers[0] in text, (spec.label, text)
    assert 1900 <= mem["fp16_kv_bytes"] / (2 * 2 * 30 * 3 * 64) <= 2200  # ~2k tokens held


@pytest.mark.parametrize("budget", [0.25, 0.35, 0.5])
def test_smartkv_meets_budget(setup, budget):
    _, mem, _ = run(setup, RunSpec("s", "smartkv", {"budget": budget}), new=4)
    assert budget - 0.02 <= mem["ratio"] <= budget


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_uniform_ratio_matches_formula(setup, bits):
    _, mem, _ = run(setup, RunSpec("u", "uniform", {"bits": bits}), new=4)
    assert mem["ratio"] == pytest.approx((bits + 1) / 16, rel=0.01)  # + FP16 scale and zero per 32 values


def test_budget_one_reproduces_fp16(setup):
    _, _, ref = run(setup, RunSpec("fp16", "fp16"), new=12)
    _, mem, same = run(setup, RunSpec("s", "smartkv", {"budget": 1.0}), new=12)
    assert torch.equal(ref, same)
    # Budget 1.0 is no compression: no importance state to pay for, every token in FP16.
    assert mem["ratio"] == 1.0
