"""Attention analysis and the sensitivity simulation, on tiny random models (fast)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from smartkv.analysis.attention import char_span_to_tokens, head_stats, summarize, tracker_rows
from smartkv.analysis.figures import heatmap_segments
from smartkv.analysis.paired import mcnemar_exact, paired_difference
from smartkv.analysis.recorder import record_decode, record_prefill
from smartkv.analysis.sensitivity import (QuantizedLevels, bits_per_layer, conditions, low_mask, run_prompt,
                                          teacher_forced_logprobs)
from smartkv.analysis.sensitivity_report import summary, table
from smartkv.analysis.simulate import hadamard, simulate_quantize
from smartkv.models import tiny_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 40))
    return model, ids, record_prefill(model, ids, window=8)


def test_hadamard_is_orthogonal_and_keeps_dot_products():
    h = hadamard(64)
    assert torch.allclose(h @ h.t(), torch.eye(64), atol=1e-6)
    q, k = torch.randn(5, 64), torch.randn(7, 64)
    assert torch.allclose((q @ h) @ (k @ h).t(), q @ k.t(), atol=1e-4)
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard(48)


def test_simulate_quantize_leaves_zero_bits_exact_and_rotation_helps_outlier_channels():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 50, 64)
    x[..., 3] += 40.0  # one outlier channel, as keys have
    bits = torch.full((50,), 2)
    bits[:5] = 0
    plain = simulate_quantize(x, bits, 32)
    rot = simulate_quantize(x, bits, 32, rotate=True)
    assert torch.equal(plain[:, :, :5], x[:, :, :5]) and torch.equal(rot[:, :, :5], x[:, :, :5])
    err = lambda y: float((y[:, :, 5:] - x[:, :, 5:]).pow(2).mean())  # noqa: E731
    assert err(rot) < 0.9 * err(plain)  # the offset is spread over all 64 channels instead of one group's
    assert err(simulate_quantize(x, torch.full((50,), 8), 32)) < err(plain) / 100


def test_low_mask_top_bottom_random():
    scores = torch.tensor([100.0, 90, 1, 9, 3, 8, 2, 7, 4, 6, 5, 0])
    g = torch.Generator().manual_seed(0)
    top = low_mask(scores, 0.25, "top", sinks=2, generator=g)
    bottom = low_mask(scores, 0.25, "bottom", sinks=2, generator=g)
    assert set(top.nonzero().flatten().tolist()) == {3, 5}  # 9 and 8, sinks excluded
    assert set(bottom.nonzero().flatten().tolist()) == {11, 2}  # 0 and 1
    r1 = low_mask(scores, 0.5, "random", 2, torch.Generator().manual_seed(3))
    r2 = low_mask(scores, 0.5, "random", 2, torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and int(r1.sum()) == 5 and not bool(r1[:2].any())
    with pytest.raises(ValueError, match="unknown selection"):
        low_mask(scores, 0.5, "middle", 2, g)


def test_recorder_tracks_every_query_and_the_window(tiny):
    model, ids, rec = tiny
    hq = model.config.num_attention_heads
    t = ids.shape[1] - 1
    for layer in range(model.config.num_hidden_layers):
        # every query row is a distribution: the mass summed over tokens and KV heads is rows x query heads
        assert float(rec.tracker.layers[layer].cumulative.sum()) == pytest.approx(t * hq, rel=1e-4)
        assert float(rec.window_tracker.layers[layer].cumulative.sum()) == pytest.approx(8 * hq, rel=1e-4)
        # the window's queries are the last 8: they see every token
        assert float(rec.window_tracker.layers[layer].count[0, 0]) == 8
    new, dec = record_decode(model, rec, 3)
    assert new.shape == (3,)
    assert float(dec.layers[0].cumulative.sum()) == pytest.approx(3 * hq, rel=1e-4)
    assert dec.layers[0].cumulative.shape[-1] == t + 3


def test_levels_match_direct_simulation_and_fp16_row_is_the_reference(tiny):
    model, ids, rec = tiny
    answer = torch.tensor([5, 6, 7])
    cond = conditions([0.25])[5]  # a top/bottom condition
    bits = bits_per_layer(cond, rec, low=2, high=4, sinks=2, pool_kernel=5, seed=0)
    direct = teacher_forced_logprobs(model, rec, bits, answer, 16)
    fast = teacher_forced_logprobs(model, rec, bits, answer, 16, levels=QuantizedLevels(rec, (2, 4), 16))
    assert torch.equal(direct, fast)
    rows = run_prompt(model, rec, answer, conditions([0.25]), group_size=16, sinks=2)
    by = {r["condition"]: r for r in rows}
    assert by["fp16"]["kl"] == 0.0
    assert by["int4"]["kl"] < by["int2"]["kl"]
    # equal bytes: the same number of tokens at each width whichever tokens are chosen
    k = {r["mean_quant_bits"] for r in rows if r["fraction"] == 0.25}
    assert len(k) == 1 and 2 < k.pop() < 4


def test_head_stats_on_a_known_distribution():
    mass = torch.tensor([6.0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = head_stats(mass, mass / 2, sinks=1, needle=(1, 3), question=(8, 10))
    assert s["sink_share"] == pytest.approx(0.6)
    assert s["top1_share"] == pytest.approx(0.6)  # ceil(1% of 10) = 1 token
    assert s["needle_share"] == pytest.approx(0.2) and s["question_share"] == 0.0
    p = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    assert s["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert s["mean"] == pytest.approx(0.5)


def test_tracker_rows_and_summary(tiny):
    model, ids, rec = tiny
    rows = tracker_rows(rec.tracker, "prefill", n_layers=2, sinks=2, groups=2, needle=(10, 14), question=(30, 39))
    assert len(rows) == 2 * model.config.num_key_value_heads
    for r in rows:
        assert 0 <= r["top1_share"] <= r["top10_share"] <= 1 and 0 <= r["sink_share"] <= 1
        assert 0 < r["entropy_norm"] <= 1
    df = pd.DataFrame(rows).assign(sample_id="a")
    out = summarize(df)
    json.dumps(out)  # JSON-ready
    assert set(out["prefill"]["layers"]) == {"L00", "L01"} and "H1" in out["prefill"]["layers"]["L00"]["heads"]


def test_char_span_to_tokens_and_heatmap_segments():
    offsets = [(0, 3), (3, 4), (4, 9), (9, 10), (10, 15)]
    assert char_span_to_tokens(offsets, (4, 10)) == (2, 4)
    assert char_span_to_tokens(offsets, (20, 30)) is None
    assert heatmap_segments(100, (50, 55)) == [(0, 8), (46, 59), (84, 100)]
    assert heatmap_segments(20, (5, 8)) == [(0, 20)]  # everything overlaps: one segment


def test_paired_statistics():
    assert mcnemar_exact(np.array([1, 1, 1, 1, 1, 0]), np.array([0, 0, 0, 0, 0, 0]))["p_mcnemar"] == pytest.approx(0.0625)
    assert mcnemar_exact(np.ones(4), np.ones(4))["p_mcnemar"] == 1.0
    d = paired_difference(np.arange(10.0) + 1, np.arange(10.0))
    assert d["mean_diff"] == 1.0 and d["ci_lo"] == d["ci_hi"] == 1.0


def test_sensitivity_summary_reads_a_harmful_top():
    rows = []
    rng = np.random.default_rng(0)
    for i in range(30):
        for cond, sel, kl, ok in (("fp16", "uniform", 0.0, True), ("top-window-k10", "top", 0.3, i % 3 > 0),
                                  ("bottom-window-k10", "bottom", 0.01, True), ("random-k10", "random", 0.05, True)):
            rows.append({"sample_id": f"s{i}", "condition": cond, "selection": sel, "score": "window" * (sel in ("top", "bottom")),
                         "fraction": 0.0 if sel == "uniform" else 0.1, "rotate": False, "kl": kl + rng.uniform(0, 0.01),
                         "gold_logprob": -kl, "exact": ok, "mean_quant_bits": 3.8})
    s = summary(pd.DataFrame(rows), {"bootstrap_seed": 0})
    tb = s["comparisons"]["window-k10"]["top_vs_bottom"]
    assert tb["verdict"] == "top-window-k10 more harmful" and tb["kl_diff"]["ci_lo"] > 0
    assert tb["mcnemar"]["only_b"] == 10 and tb["mcnemar"]["p_mcnemar"] < 0.01
    assert "| plain | 10% | window |" in table(s)
