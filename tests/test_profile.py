"""The profile's library (smartkv.analysis.profile) on a tiny random model: schema, memory, figures, params."""

import json

import pandas as pd
import pytest
import torch

from smartkv.analysis.profile import (MIB, PHASE_PREFIX, measure_allocation, peak_of, plot_rows, profile_context,
                                      summarize)
from smartkv.analysis.profile_figures import latency_figure, memory_figure
from smartkv.models import tiny_model
from smartkv.runner import RunSpec
from smartkv.study.params import ParamError

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
RUNS = [RunSpec("fp16", "fp16"), RunSpec("int4", "uniform", {"bits": 4, "group_size": 32}),
        RunSpec("kivi-2", "kivi", {"bits": 2}),
        RunSpec("smartkv", "smartkv", {"budget": 0.5, "group_size": 32, "window": 8}, "smartkv")]
CONTEXT, NEW, REPEATS = 160, 4, 3


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = tiny_model("llama", seed=0, **SHAPE)
    ids = torch.randint(3, 250, (1, CONTEXT))
    return profile_context(model, ids, torch.ones_like(ids), RUNS, CONTEXT, NEW, REPEATS, warmup_tokens=2,
                           ops_runs=("fp16", "smartkv"))


def test_cpu_allocation_is_measured_from_the_allocator():
    def work():
        a = torch.ones(MIB // 4)        # 1 MiB, freed before the end
        b = torch.ones(2 * MIB // 4)    # 2 MiB, kept
        del a
        return b

    kept, alloc = measure_allocation(work, torch.device("cpu"))
    assert kept.numel() == 2 * MIB // 4
    assert alloc.peak_bytes >= 3 * MIB          # both were alive at once
    assert 2 * MIB <= alloc.end_bytes < 3 * MIB  # the freed one is gone
    assert peak_of([(0, 5), (1, 3), (2, -6), (3, 1)]) == (8, 3)


def test_block_schema_and_spread(block):
    json.dumps(block)  # the stage writes it as JSON
    assert block["context"] == CONTEXT and block["context_tokens"] == CONTEXT
    assert block["prefill_peak_allocated_bytes"] > 0
    lat = {r["run"]: r for r in block["latency"]}
    assert list(lat) == [r.label for r in RUNS]
    for r in lat.values():
        s = r["ms_per_token"]
        assert len(r["ms_per_token_all"]) == REPEATS
        assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
        assert r["ratio_vs_fp16"] > 0
    assert lat["fp16"]["ratio_vs_fp16"] == pytest.approx(1.0)


def test_peak_memory_holds_at_least_the_cache(block):
    mem = block["memory"]
    assert set(mem) == {r.label for r in RUNS}
    for label, m in mem.items():
        assert m["cache_bytes"] > 0, label
        # the cache is allocated inside the measured block and alive at its end
        assert m["peak_allocated_bytes"] >= m["held_at_end_bytes"] >= m["cache_bytes"], (label, m)
    assert mem["int4"]["cache_bytes"] < mem["fp16"]["cache_bytes"]


def test_phase_shares_and_top_ops(block):
    phases = block["phases"]["smartkv"]
    shares = {k: v for k, v in phases.items() if k.endswith("_share")}
    assert shares and all(0 <= v <= 1 for v in shares.values()) and sum(shares.values()) <= 1
    assert phases["tracking_calls"] > 0
    assert set(block["top_ops"]) == {"fp16", "smartkv"}
    for label, t in block["top_ops"].items():
        ops = t["ops"]
        assert 0 < len(ops) <= 10
        times = [o["self_cpu_ms_per_token"] for o in ops]
        assert times == sorted(times, reverse=True) and all(0 <= o["share_of_wall"] <= 1 for o in ops)
        assert t["self_cpu_ms_per_token"] + t["unattributed_ms_per_token"] >= t["wall_ms_per_token"] * 0.999
    assert "tracking" in block["top_ops"]["smartkv"]["phase_self_ms_per_token"]  # the kernels' phases are seen
    assert not block["top_ops"]["fp16"]["phase_self_ms_per_token"]
    assert not any(o["op"].startswith(PHASE_PREFIX) for o in block["top_ops"]["fp16"]["ops"])


def test_rows_summary_and_figures(block, tmp_path):
    result = {"new_tokens": NEW, "repeats": REPEATS, "contexts": [block]}
    rows = pd.DataFrame(plot_rows(result))
    assert len(rows) == len(RUNS) and (rows["peak_allocated_mib"] >= rows["cache_mib"]).all()
    summary = summarize([block])
    assert set(summary) == {r.label for r in RUNS}
    assert "phase_shares" in summary["smartkv"]["contexts"][str(CONTEXT)]
    for fig in (latency_figure, memory_figure):
        for path in fig(rows, tmp_path / fig.__name__):
            assert path.read_bytes()[:4] in (b"\x89PNG", b"%PDF") and path.stat().st_size > 1000


@pytest.mark.parametrize("profile,message", [
    ({"contexts": [8], "new_tokens": 4, "repeats": 3, "runs": ["fp16"]}, "profile.contexts"),
    ({"contexts": [1024], "new_tokens": 4, "repeats": 2, "runs": ["fp16"]}, "profile.repeats"),
    ({"contexts": [1024], "new_tokens": 4, "repeats": 3, "runs": ["fp16"], "ops_context": 2048}, "ops_context"),
])
def test_bad_profile_params(profile, message):
    from stages.profile import settings

    with pytest.raises(ParamError, match=message):
        settings({"profile": profile})


def test_profile_runs_need_known_baselines_and_fp16():
    from stages.profile import profile_runs

    params = {"baselines": [{"label": "fp16", "method": "fp16"}, {"label": "int4", "method": "uniform",
                                                                   "params": {"bits": 4}}],
              "budget": 0.3, "decay": 0.9, "realloc_freq": 16, "smartkv": {}}
    assert [r.label for r in profile_runs(params, ["fp16", "int4"])] == ["fp16", "int4", "smartkv"]
    with pytest.raises(ParamError, match="not in baselines"):
        profile_runs(params, ["fp16", "int3"])
    with pytest.raises(ParamError, match="fp16"):
        profile_runs(params, ["int4"])
    # a run profiled only here, validated like any run
    runs = profile_runs(params, ["fp16", {"label": "quanto-4", "method": "hf_quanto", "params": {"nbits": 4}}])
    assert [(r.label, r.method, r.params) for r in runs[:2]] == [("fp16", "fp16", {}),
                                                                ("quanto-4", "hf_quanto", {"nbits": 4})]
    with pytest.raises(ParamError, match=r"profile.runs\[1\].method='nope'"):
        profile_runs(params, ["fp16", {"label": "x", "method": "nope"}])


def test_report_section_words_follow_the_numbers(block):
    import copy

    from smartkv.report.profile_section import profile_section

    result = {"new_tokens": NEW, "repeats": REPEATS, "contexts": [copy.deepcopy(block)], "headline": "smartkv",
              "fp16": "fp16", "machine": {"torch_threads": 1, "cpus": 2, "loadavg_at_end": [1.0, 1.0, 1.0]},
              "provenance": {"git_revision": "abc"}}
    lat = {r["run"]: r for r in result["contexts"][0]["latency"]}
    lat["smartkv"]["ratio_vs_fp16"] = 0.5
    lat["smartkv"]["ratio_vs_fp16_with_first"] = 0.25
    lat["smartkv"]["first_step_ms"] = {**lat["smartkv"]["first_step_ms"], "median": 812.0}
    lat["fp16"]["first_step_ms"] = {**lat["fp16"]["first_step_ms"], "median": 95.0}
    text = "\n".join(profile_section(result))
    assert "decodes at 0.50 × FP16's tokens/s after the first step (slower than FP16)" in text
    assert (f"takes 812 ms against FP16's 95 ms; over all {NEW} new tokens, the first step included, it runs at "
            "0.25 × FP16 (slower than FP16)") in text
    assert "| `kivi-2` |" in text and "tracking" in text and "Top operators" in text
    assert "first step ms [min–max]" in text
    lat["smartkv"]["ratio_vs_fp16"] = 1.25
    assert "tokens/s after the first step (at least as fast as FP16)" in "\n".join(profile_section(result))
    assert "`metrics/profile.json` is missing" in profile_section(None)[0]
