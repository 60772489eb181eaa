"""Bench helpers (spread, run parsing, CLI checks) and the phase timers, without the real model."""

import time

import pytest

from smartkv import cli
from smartkv.bench import DEFAULT_CONTEXTS, DEFAULT_RUNS, parse_runs, spread
from smartkv.phase_timer import PHASES, resolve, timed_phases


class Toy:
    def outer(self, x):
        time.sleep(0.02)
        return self.inner(x) + 1

    def inner(self, x):
        time.sleep(0.01)
        return x * 2


class ToyChild(Toy):
    pass


TOY = {"outer": (f"{__name__}:Toy.outer",), "inner": (f"{__name__}:Toy.inner",)}


def test_every_phase_target_exists():
    # a renamed cache method must break this test, not silently time nothing
    for targets in PHASES.values():
        for target in targets:
            resolve(target)


def test_phases_time_outermost_calls_and_restore_the_methods():
    before = (Toy.__dict__["outer"], Toy.__dict__["inner"])
    with timed_phases(TOY) as t:
        assert ToyChild().outer(3) == 7
        assert Toy().inner(1) == 2
    assert (Toy.__dict__["outer"], Toy.__dict__["inner"]) == before
    assert t["outer_calls"] == 1 and t["inner_calls"] == 1  # the nested inner() counts for outer
    assert t["outer"] >= 0.03 and 0.01 <= t["inner"] < t["outer"]


def test_inherited_method_is_patched_and_removed(monkeypatch):
    with timed_phases({"child": (f"{__name__}:ToyChild.inner",)}) as t:
        ToyChild().inner(2)
        Toy().inner(2)  # the parent's method is not timed
    assert "inner" not in ToyChild.__dict__
    assert t["child_calls"] == 1


def test_missing_target_raises():
    with pytest.raises(AttributeError, match="no method"):
        with timed_phases({"x": (f"{__name__}:Toy.nope",)}):
            pass
    assert "nope" not in Toy.__dict__


def test_spread_of_timings():
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0
    assert s["q1"] <= s["median"] <= s["q3"]
    assert spread([4.0]) == {"median": 4.0, "min": 4.0, "max": 4.0, "q1": 4.0, "q3": 4.0}


def test_default_set_and_parsed_runs():
    labels = [r.label for r in DEFAULT_RUNS]
    for want in ("fp16", "uniform-4", "kivi-2", "kivi-4", "smartkv-b0.25", "smartkv-b0.35", "hf_quanto-4", "hf_hqq-4"):
        assert want in labels
    assert tuple(DEFAULT_CONTEXTS) == (1024, 2048, 4096, 8192)
    runs = parse_runs(["s=smartkv:budget=0.3,bits=4"])
    assert runs[0].method == "fp16"  # the reference is always measured
    assert runs[1].params == {"budget": 0.3, "bits": 4} and runs[1].family == "smartkv"
    with pytest.raises(ValueError, match="LABEL=METHOD"):
        parse_runs(["nolabel"])


@pytest.mark.parametrize("argv,message", [
    (["bench", "--context", "8"], "--context 8"),
    (["bench", "--repeats", "0"], "--repeats 0"),
    (["bench", "--new-tokens", "0"], "--new-tokens 0"),
    (["bench", "--new-tokens", "1"], "--new-tokens 1 must be >= 2"),
    (["bench", "--run", "oops"], "LABEL=METHOD"),
    (["bench", "--run", "x=smartkv:budget=7"], "budget"),
    (["bench", "--device", "tpu"], "--device 'tpu'"),
])
def test_bench_bad_input_exits_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_bench_on_cuda_without_a_gpu_exits_2(capsys):
    assert cli.main(["bench", "--device", "cuda", "--context", "64"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the GPU check would run")
def test_gpu_check_without_a_gpu_exits_2_and_writes_nothing(tmp_path, capsys):
    from smartkv import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gpu").exists()


def test_a_timed_decode_splits_the_first_step_from_the_steady_ones():
    """The first step holds the cache's one-off allocation; the steady steps hold the periodic re-allocations."""
    import torch

    from smartkv.bench import bench_context
    from smartkv.models import tiny_model
    from smartkv.runner import RunSpec, prefill

    torch.manual_seed(0)
    model = tiny_model("llama", seed=0, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                       num_key_value_heads=2)
    ids = torch.randint(3, 250, (1, 96))
    pre = prefill(model, ids, torch.ones_like(ids))
    runs = [RunSpec("fp16", "fp16"),
            RunSpec("smartkv", "smartkv", {"budget": 0.5, "group_size": 16, "window": 8, "realloc_freq": 2}, "smartkv")]
    block = bench_context(model, None, runs, 96, new_tokens=5, repeats=3, warmup_tokens=2, profile=True, pre=pre)
    layers = model.config.num_hidden_layers
    for r in block["results"]:
        assert len(r["tokens_per_s_all"]) == len(r["first_step_ms_all"]) == 3
        assert r["tokens_per_s"]["median"] > 0 and r["first_step_ms"]["median"] > 0
        # over 5 tokens with the first included vs over the 4 steady ones: the same timings, another split
        assert r["tokens_per_s_with_first"]["median"] > 0 and r["ratio_vs_fp16_with_first"] > 0
    p = block["phases"]["smartkv"]
    assert p["steady_steps"] == 4 and p["first_step_s"] > 0
    assert p["first_step_s"] + p["steady_s"] <= p["decode_s"] + 1e-9
    # the first step allocates every layer once; steps 3 and 5 (decode steps 2 and 4) re-allocate
    assert p["first_reallocation_s"] > 0 and p["reallocation_calls"] == 2 * layers
    assert 0 < p["reallocation_share"] < 1 and p["first_reallocation_s"] <= p["first_step_s"]
    from smartkv.bench import format_table

    table = format_table({"new_tokens": 5, "repeats": 3, "machine": {"threads": 1}, "contexts": [block]})
    assert "smartkv share of a steady decode step: tracking" in table
    first_line = next(line for line in table.splitlines() if line.strip().startswith("smartkv first step"))
    assert "reallocation" in first_line and "of which: step" not in first_line


def test_bench_needs_two_new_tokens():
    from smartkv.bench import bench_context

    with pytest.raises(ValueError, match="at least 2"):
        bench_context(None, None, [], 96, new_tokens=1, repeats=3, warmup_tokens=2, profile=False)
