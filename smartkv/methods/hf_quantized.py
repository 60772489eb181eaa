"""`transformers`' own `QuantizedCache` as peer methods: `hf_quanto` and `hf_hqq`.

`QuantizedCache` keeps the last `residual_length` tokens of each layer at full precision and,
whenever that window fills, re-quantizes the *whole* history (dequantized old part + window)
with the backend (optimum-quanto or HQQ), grouping `q_group_size` values. Every decode step
dequantizes the whole quantized history again. It is the reference implementation SmartKV
is compared with; its memory is measured by `hf_cache_nbytes` from the tensors it holds.

The backends are optional (`pip install smartkv[peers]`): the methods are always registered,
and building one without its backend raises an ImportError that says what to install.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import Cache, PreTrainedConfig, QuantizedCache

from smartkv.methods.common import check_bits, check_choice, check_int
from smartkv.methods.registry import ConfigError, register

# What transformers 5.23's QuantoQuantizedLayer / HQQQuantizedLayer accept.
QUANTO_NBITS = (2, 4)
QUANTO_AXES = (0, -1)
HQQ_NBITS = (1, 2, 3, 4, 8)
HQQ_AXES = (0, 1)

_BACKEND_PACKAGES = {
    "quanto": ("optimum.quanto", "optimum-quanto>=0.2.7"),
    "hqq": ("hqq", "hqq>=0.2.5"),
}


@dataclass(frozen=True)
class _QuantizedCacheConfig:
    """QuantizedCache's knobs; each backend's subclass names the values it accepts."""

    METHOD: ClassVar[str]
    NBITS: ClassVar[tuple[int, ...]]
    AXES: ClassVar[tuple[int, ...]]

    nbits: int = 4
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def __post_init__(self):
        check_bits(self.METHOD, "nbits", self.nbits, self.NBITS)
        check_int(self.METHOD, "q_group_size", self.q_group_size, 1)
        check_int(self.METHOD, "residual_length", self.residual_length, 0)
        check_choice(self.METHOD, "axis_key", self.axis_key, self.AXES)
        check_choice(self.METHOD, "axis_value", self.axis_value, self.AXES)


@dataclass(frozen=True)
class HfQuantoConfig(_QuantizedCacheConfig):
    """transformers' QuantizedCache with the optimum-quanto backend (per-group, asymmetric)."""

    METHOD: ClassVar[str] = "hf_quanto"
    NBITS: ClassVar[tuple[int, ...]] = QUANTO_NBITS
    AXES: ClassVar[tuple[int, ...]] = QUANTO_AXES


@dataclass(frozen=True)
class HfHqqConfig(_QuantizedCacheConfig):
    """transformers' QuantizedCache with the HQQ backend (half-quadratic, per-group)."""

    METHOD: ClassVar[str] = "hf_hqq"
    NBITS: ClassVar[tuple[int, ...]] = HQQ_NBITS
    AXES: ClassVar[tuple[int, ...]] = HQQ_AXES


def backend_available(backend: str) -> bool:
    """Whether the Python package of QuantizedCache backend `backend` ("quanto" or "hqq") is installed."""
    module, _ = _BACKEND_PACKAGES[backend]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # parent package (`optimum`) missing
        return False


def _require_backend(method: str, backend: str) -> None:
    if not backend_available(backend):
        module, requirement = _BACKEND_PACKAGES[backend]
        raise ImportError(
            f"method {method!r} needs the {backend} backend ({module}), which is not installed; "
            f"install it with `pip install '{requirement}'` or `pip install 'smartkv[peers]'`"
        )


def _refuse_sliding_layers(method: str, model_config: PreTrainedConfig) -> None:
    """QuantizedCache holds only full-attention layers: say so by name before any work (e.g. Gemma-3)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    kinds = list(getattr(text, "layer_types", None) or [])
    sliding = sum(kind != "full_attention" for kind in kinds)
    if sliding:
        raise ConfigError(
            f"{method}: transformers' QuantizedCache supports only full-attention models, and this "
            f"{text.model_type} model has {sliding} of {len(kinds)} layers with other attention "
            f"({', '.join(sorted(set(kinds) - {'full_attention'}))}); use kivi, uniform or smartkv"
        )


def _quantized_cache(backend: str, config, model_config: PreTrainedConfig) -> Cache:
    _refuse_sliding_layers(config.METHOD, model_config)
    return QuantizedCache(
        backend=backend,
        config=model_config,
        nbits=config.nbits,
        axis_key=config.axis_key,
        axis_value=config.axis_value,
        q_group_size=config.q_group_size,
        residual_length=config.residual_length,
    )


@register(
    "hf_quanto",
    HfQuantoConfig,
    "transformers QuantizedCache, optimum-quanto backend: full history re-quantized to nbits "
    "whenever the full-precision window of residual_length tokens fills",
)
def build_hf_quanto(config: HfQuantoConfig, model_config: PreTrainedConfig) -> Cache:
    _require_backend("hf_quanto", "quanto")
    return _quantized_cache("quanto", config, model_config)


@register(
    "hf_hqq",
    HfHqqConfig,
    "transformers QuantizedCache, HQQ backend: full history re-quantized to nbits "
    "whenever the full-precision window of residual_length tokens fills",
)
def build_hf_hqq(config: HfHqqConfig, model_config: PreTrainedConfig) -> Cache:
    _require_backend("hf_hqq", "hqq")
    return _quantized_cache("hqq", config, model_config)


# ---------------------------------------------------------------------------------------------
# Memory: bytes of the tensors the cache actually holds


def _held_tensors(obj: Any):
    """Every plain tensor inside `obj`: tensor subclasses (quanto QTensor, PackedTensor) are
    opened through `__tensor_flatten__` down to their inner tensors; tuples, lists and dicts
    (HQQ's `(W_q, meta)`, with nested `meta_zero`/`meta_scale`) are walked."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            inner_names, _ = obj.__tensor_flatten__()
            for name in inner_names:
                yield from _held_tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _held_tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _held_tensors(value)


def _nbytes(obj: Any, seen: set) -> int:
    """Bytes of the storages behind the tensors in `obj`, each storage counted once."""
    total = 0
    for t in _held_tensors(obj):
        if t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _quantized_shape(q: Any) -> tuple[int, ...] | None:
    """The logical `[batch, kv_heads, seq, head_dim]` shape of a backend's quantized states."""
    if q is None:
        return None
    if isinstance(q, torch.Tensor):  # quanto QTensor (its public shape), fp8 tensor
        return tuple(q.shape)
    if isinstance(q, (tuple, list)) and len(q) == 2 and isinstance(q[1], dict):  # hqq (W_q, meta)
        return tuple(q[1]["shape"])
    raise TypeError(f"unrecognized quantized state of type {type(q).__name__}")


def hf_cache_nbytes(cache: Cache) -> dict:
    """Memory held by a `QuantizedCache` (or any cache with `keys`/`values` layers).

    - `kv_bytes`: bytes of every tensor storage held: the full-precision residual window
      (`keys`/`values`, at their real dtype), and the quantized states (`_quantized_keys`,
      `_quantized_values`): for quanto the packed uint8 data, scale and shift inside the
      QTensor; for HQQ `W_q` and every tensor of its `meta` (scale, zero, ...).
    - `fp16_kv_bytes`: what FP16 would take for the same tokens,
      2 (K and V) x layers x batch x kv_heads x tokens x head_dim x 2 bytes.
    - also `quantized_bytes`, `residual_bytes` (summed over layers), `quantized_tokens` /
      `residual_tokens` (tokens a layer holds quantized / at full precision, the largest over
      layers), and `ratio` = kv_bytes / fp16_kv_bytes.
    """
    quantized_bytes = residual_bytes = 0
    quantized_tokens = residual_tokens = 0
    fp16_values = 0
    for layer in cache.layers:
        seen: set = set()
        qk = getattr(layer, "_quantized_keys", None)
        qv = getattr(layer, "_quantized_values", None)
        quantized_bytes += _nbytes((qk, qv), seen)
        for q in (qk, qv):
            shape = _quantized_shape(q)
            if shape is not None:
                fp16_values += _numel(shape)
        if qk is not None:
            quantized_tokens = max(quantized_tokens, _quantized_shape(qk)[-2])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.dim() == 4:
                fp16_values += t.numel()
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dim() == 4:
            residual_tokens = max(residual_tokens, keys.shape[-2])
        residual_bytes += _nbytes((layer.keys, layer.values) if layer.is_initialized else None, seen)
    kv_bytes = quantized_bytes + residual_bytes
    fp16_kv_bytes = 2 * fp16_values
    return {
        "kv_bytes": kv_bytes,
        "fp16_kv_bytes": fp16_kv_bytes,
        "quantized_bytes": quantized_bytes,
        "residual_bytes": residual_bytes,
        "quantized_tokens": quantized_tokens,
        "residual_tokens": residual_tokens,
        "ratio": kv_bytes / fp16_kv_bytes if fp16_kv_bytes else float("nan"),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
