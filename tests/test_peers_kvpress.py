"""The kvpress eviction peers: params validation, import hygiene, byte counting (main venv), and the
stage run end to end in `.venv-kvpress` on a tiny model (skipped where that venv is absent)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from smartkv.kvpress_peers import PRESSES, PeerSpec, cache_bytes, fp16_bytes
from smartkv.study.params import ParamError
from stages.peers import peer_specs

REPO = Path(__file__).resolve().parent.parent
KVPRESS_PYTHON = REPO / ".venv-kvpress" / "bin" / "python"
GOOD = [
    {"label": "none", "press": "none"},
    {"label": "snapkv-k0.15", "press": "snapkv", "kept": 0.15},
    {"label": "streaming-k0.1", "press": "streaming_llm", "kept": 0.1},
    {"label": "ea-k0.5", "press": "expected_attention", "kept": 0.5},
    {"label": "knorm-k0.5", "press": "knorm", "kept": 0.5},
    {"label": "tova-k0.5", "press": "tova", "kept": 0.5},
]


def test_peer_specs_accepts_every_press():
    specs = peer_specs({"peers": GOOD})
    assert [s.label for s in specs] == [e["label"] for e in GOOD]
    assert {s.press for s in specs} == set(PRESSES)
    assert specs[0].kept == 1.0 and specs[0].compression_ratio == 0.0
    assert specs[1].compression_ratio == pytest.approx(0.85)
    assert specs[2].compression_ratio == pytest.approx(0.90)


@pytest.mark.parametrize(
    "peers, key",
    [
        (None, "peers"),
        ([], "peers"),
        (["snapkv"], "peers[0]"),
        ([{"label": "a", "press": "snapkv", "kept": 0.1, "window": 64}], "peers[0]: unknown key"),
        ([{"label": "", "press": "snapkv", "kept": 0.1}], "peers[0].label"),
        ([{"label": "a", "press": "h2o", "kept": 0.1}], "peers[0].press"),
        ([{"label": "a", "press": "snapkv"}], "peers[0].kept"),
        ([{"label": "a", "press": "snapkv", "kept": 0}], "peers[0].kept"),
        ([{"label": "a", "press": "snapkv", "kept": 1.5}], "peers[0].kept"),
        ([{"label": "a", "press": "snapkv", "kept": True}], "peers[0].kept"),
        ([{"label": "a", "press": "none", "kept": 0.5}], "peers[0].kept"),
        ([{"label": "a", "press": "snapkv", "kept": 0.1}, {"label": "a", "press": "none"}], "peers: duplicate label"),
    ],
)
def test_peer_specs_rejects_bad_entries(peers, key):
    params = {} if peers is None else {"peers": peers}
    with pytest.raises(ParamError) as err:
        peer_specs(params)
    assert str(err.value).startswith(key.split(":")[0])
    assert key in str(err.value)


def test_stage_bad_param_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"peers": [{"label": "a", "press": "h2o", "kept": 0.1}]}))
    proc = subprocess.run([sys.executable, "-m", "stages.peers"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "peers[0].press='h2o'" in lines[0] and "snapkv" in lines[0]


def test_stage_without_kvpress_says_which_python(tmp_path):
    pytest.importorskip("pandas")
    if __import__("importlib").util.find_spec("kvpress") is not None:
        pytest.skip("kvpress is installed in this venv, so the wrong-venv message cannot show")
    from smartkv.io import atomic_write_parquet

    import pandas as pd

    atomic_write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "data" / "tasks.parquet", {})
    (tmp_path / "model").mkdir()
    params = {"model": str(tmp_path / "model"), "dtype": "float32", "device": "cpu", "max_new_tokens": 4,
              "peers": GOOD}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.peers"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "kvpress is not installed" in proc.stderr and ".venv-kvpress" in proc.stderr


def test_runner_imports_nothing_built_on_transformers():
    # The runner and the stage must import under kvpress's transformers 5.2: nothing of SmartKV
    # that touches transformers (or torch) may load at import time.
    code = ("import sys, smartkv.kvpress_peers, stages.peers; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch', 'kvpress') "
            "or m.startswith(('smartkv.methods', 'smartkv.cache', 'smartkv.runner', 'smartkv.evaluate'))]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120).stdout.strip()
    assert out == "[]"


def test_cache_bytes_count_storage_as_fp16():
    base = torch.zeros(1, 2, 10, 4)  # float32: charged 2 bytes an element, as FP16 would take
    view = base[:, :, :3]  # a view keeps the whole base alive
    fresh = torch.zeros(1, 2, 3, 4, dtype=torch.float16)
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=view, values=fresh)])
    assert cache_bytes(cache) == (base.numel() + fresh.numel()) * 2
    assert fp16_bytes(cache, 3) == 2 * 1 * 2 * 3 * 4 * 2


@pytest.fixture(scope="module")
def kvpress_run(tmp_path_factory):
    """The stage run in .venv-kvpress on a tiny random Llama with the default model's tokenizer."""
    if not KVPRESS_PYTHON.exists():
        pytest.skip(".venv-kvpress is absent: `make venv-kvpress` builds it (kvpress pins transformers<5.3)")
    import pandas as pd

    from smartkv.io import atomic_write_parquet
    from smartkv.models import load_model, tiny_model
    from smartkv.tasks import generate_task

    tmp = tmp_path_factory.mktemp("peers")
    _, tokenizer = load_model("default")
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024)
    with torch.no_grad():  # random init attends almost uniformly, blind to positions: sharpen it so
        for layer in model.model.layers:  # that a token fed at a wrong position changes the NLL
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    samples = (generate_task("niah", tokenizer, n_per_cell=1, lengths=[200], depths=[0.5], seed=100)
               + generate_task("perplexity", tokenizer, n_per_cell=1, lengths=[160], depths=[], seed=100,
                               continuation_tokens=8))
    for s in samples:
        s.meta["max_new_tokens"] = 6
    atomic_write_parquet(pd.DataFrame([{**s.to_row(), "seed": 100, "split": "test"} for s in samples]),
                         tmp / "data" / "tasks.parquet", {})
    params = {"model": str(tmp / "model"), "dtype": "float32", "device": "cpu", "max_new_tokens": 6, "peers": GOOD,
              "split": "test", "peers_tasks": ["niah", "perplexity"], "peers_seeds": [100]}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([str(KVPRESS_PYTHON), "-m", "stages.peers"], cwd=tmp, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(dir=tmp, model=model, tokenizer=tokenizer, samples=samples)


@pytest.mark.slow
def test_stage_in_kvpress_venv_matches_our_protocol(kvpress_run):
    from smartkv.evaluate import evaluate
    from smartkv.io import read_parquet_with_meta
    from smartkv.runner import RunSpec

    df, meta = read_parquet_with_meta(kvpress_run.dir / "data" / "peers.parquet")
    assert meta["versions"]["kvpress"] == "0.5.5"
    assert meta["versions"]["transformers"].startswith("5.2.")
    assert meta["config"]["seeds"] == [100] and meta["config"]["peers"][1]["compression_ratio"] == pytest.approx(0.85)
    assert len(df) == len(kvpress_run.samples) * len(GOOD)
    assert set(df["family"]) == {"peer"}

    # Our FP16 pipeline (transformers 5.23) on the same tiny model and prompts: same columns, and
    # the no-press peer must reproduce it, or the two protocols differ.
    ours = evaluate(kvpress_run.model, kvpress_run.tokenizer, kvpress_run.samples, [RunSpec("fp16", "fp16")],
                    seed=100, max_new_tokens=6, progress=False)
    core = {"run", "task", "sample_id", "seed", "prediction", "score", "nll", "n_tokens", "kv_bytes", "fp16_kv_bytes",
            "kv_ratio", "forced_exact", "answer_logprob"}
    assert core <= set(ours.columns) and core <= set(df.columns)
    none = df[df["run"] == "none"].set_index("sample_id")
    for row in ours.itertuples():
        peer = none.loc[row.sample_id]
        assert peer["n_tokens"] == row.n_tokens
        assert peer["kv_ratio"] == 1.0 and peer["kv_bytes"] == peer["fp16_kv_bytes"] == row.fp16_kv_bytes
        if row.metric == "perplexity":
            # one position off moves this NLL by ~2e-3 (relative) on this model
            assert math.isclose(peer["nll"], row.nll, rel_tol=1e-5), (peer["nll"], row.nll)
        else:
            assert peer["prediction"] == row.prediction

    for row in df.itertuples():
        spec = next(PeerSpec(**e) for e in GOOD if e["label"] == row.run)
        # measured, not nominal: kvpress keeps int(k_len * kept) of the k_len prefilled tokens
        k_len = row.n_tokens - 1
        assert row.prefill_kv_ratio == pytest.approx(max(1, int(k_len * (1 - spec.compression_ratio))) / k_len, abs=1e-9)
        assert row.kv_bytes <= row.fp16_kv_bytes and row.kv_ratio == pytest.approx(row.kv_bytes / row.fp16_kv_bytes)
        if row.metric != "perplexity":  # scored as SmartKV's rows are: the gold answer teacher-forced
            assert row.score == row.forced_exact and row.score in (0.0, 1.0)
            assert row.answer_logprob < 0


# Run in .venv-kvpress: kvpress's own `with press(model):` prefill against one recorded prefill
# replayed through the press's forward hook (the stage's shared prefill), on a tiny Llama.
_PARITY = r"""
import sys, torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from smartkv.kvpress_peers import PRESSES, PeerSpec, compress_with, make_press, record_prefill

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    for layer in model.model.layers:  # sharpen attention so that the presses' scores differ
        layer.self_attn.q_proj.weight.mul_(10)
ids = torch.randint(0, 300, (1, 200))
base, records = record_prefill(model, ids)
checked = 0
for press_name in PRESSES:
    if PRESSES[press_name] is None:
        continue
    for kept in (0.5, 0.15):
        spec = PeerSpec("x", press_name, kept)
        ref = DynamicCache()
        with torch.no_grad(), make_press(spec)(model):
            model.model(input_ids=ids, past_key_values=ref, use_cache=True)
        got = compress_with(make_press(spec), model, base, records)
        assert len(got.layers) == len(ref.layers)
        for a, b in zip(ref.layers, got.layers):
            assert a.keys.shape == b.keys.shape and a.keys.shape[2] < ids.shape[1], (press_name, a.keys.shape)
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), press_name
        checked += 1
# the recorded prefill itself stays uncompressed (every press got a copy)
assert all(layer.keys.shape[2] == ids.shape[1] for layer in base.layers)
print("checked", checked)
"""


@pytest.mark.slow
def test_shared_prefill_equals_kvpress_own_prefill():
    if not KVPRESS_PYTHON.exists():
        pytest.skip(".venv-kvpress is absent: `make venv-kvpress` builds it (kvpress pins transformers<5.3)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([str(KVPRESS_PYTHON), "-c", _PARITY], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["checked", str(2 * sum(c is not None for c in PRESSES.values()))]
