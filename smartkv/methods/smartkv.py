"""`smartkv`: attention-guided mixed precision under a memory budget (this project's method).

Every ablation is a setting of this one config: `allocation` random/fixed (no attention
signal), `realloc_freq=0` (allocation fixed after prefill), `signal` cumulative vs ema,
greedy vs dp vs layer_aware, `granularity`, `kv_split` with `key_weight`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from smartkv.cache.base import KVCache
from smartkv.cache.mixed import MixedPrecisionLayer, MixedSpec
from smartkv.importance import SIGNALS, ImportanceTracker
from smartkv.methods.common import check_bits, check_budget, check_choice, check_decay, check_int, n_layers
from smartkv.methods.registry import ConfigError, register
from smartkv.scale_format import SCALE_FORMATS

ALLOCATIONS = ("greedy", "dp", "layer_aware", "random", "fixed")
# Policies that read no importance: their caches skip attention tracking altogether.
_NO_SIGNAL = ("random", "fixed")


@dataclass(frozen=True)
class SmartKVConfig:
    """budget: fraction of the FP16 bytes of the same tokens (metadata, index, FP16 window and
    importance state counted). budget=1.0 means no compression: no importance state is kept,
    every token stays in FP16 (unbounded window), the output is `fp16`'s token for token and
    the memory ratio is exactly 1.0."""

    # The study's headline config (params.yaml `budget`, `smartkv:`) is the default, so the library
    # and the CLI run the method the study reports: 0.25 of FP16 (uniform INT3's bytes), and a 0-bit
    # tier (eviction) below the 2-bit floor, which is what lets budgets under ~0.2 be met at all.
    budget: float = 0.25
    bits: tuple[int, ...] = (0, 2, 3, 4, 8)
    group_size: int = 64
    window: int = 32
    window_share: float = 0.1
    sink_tokens: int = 4
    allocation: str = "greedy"
    signal: str = "ema"
    decay: float = 0.9
    obs_window: int = 64
    pool: int = 1
    granularity: str = "layer"
    kv_split: bool = False
    key_weight: float = 1.0
    realloc_freq: int = 16
    layer_skew: float = 0.5
    symmetric: bool = False
    seed: int = 0
    key_smoothing: bool = True
    key_rotation: bool = False
    prior: float = 0.5
    error_model: str = "range"
    # Decode steps attend straight from the packed codes (C++ kernel, CPU); False: de-quantize + SDPA.
    # The output agrees within float32 rounding (tests/test_packed_decode.py); it is a speed switch.
    packed_decode: bool = True
    # How each group's scale and zero-point are stored: fp16 | bf16 | int8 (8-bit codes, FP16
    # constants shared per unit: double quantization, smartkv/scale_format.py). Priced per width.
    scale_format: str = "fp16"

    def __post_init__(self):
        m = "smartkv"
        check_budget(m, self.budget)
        bits = tuple(self.bits) if not isinstance(self.bits, int) else (self.bits,)
        if not bits:
            raise ConfigError(f"{m}: bits must list at least one width, got {self.bits!r}")
        for b in bits:
            check_bits(m, "bits", b, (0, 1, 2, 3, 4, 5, 6, 7, 8))  # 0 = evict
        if not any(bits):
            raise ConfigError(f"{m}: bits={self.bits!r} needs a width above 0 (0 alone would evict everything)")
        if 0 in bits and self.kv_split:
            raise ConfigError(f"{m}: bits with 0 (eviction) needs kv_split=False: a token's key and value go together "
                              f"(for kv_split, give bits without 0, e.g. (2, 3, 4, 8))")
        object.__setattr__(self, "bits", tuple(sorted(set(bits))))
        check_int(m, "group_size", self.group_size, 1)
        check_int(m, "window", self.window, 0)
        check_int(m, "sink_tokens", self.sink_tokens, 0)
        check_int(m, "realloc_freq", self.realloc_freq, 0)
        check_int(m, "obs_window", self.obs_window, 1)
        check_int(m, "pool", self.pool, 1)
        check_choice(m, "error_model", self.error_model, ("range", "bits"))
        check_choice(m, "scale_format", self.scale_format, SCALE_FORMATS)
        check_choice(m, "allocation", self.allocation, ALLOCATIONS)
        check_choice(m, "signal", self.signal, SIGNALS)
        check_choice(m, "granularity", self.granularity, ("layer", "head"))
        check_decay(m, self.decay)
        if self.key_weight <= 0:
            raise ConfigError(f"{m}: key_weight={self.key_weight!r} must be > 0")
        if not 0.0 <= self.prior <= 1.0:
            raise ConfigError(f"{m}: prior={self.prior!r} must lie in [0, 1]")
        if isinstance(self.window_share, bool) or not 0.0 <= self.window_share <= 1.0:
            raise ConfigError(f"{m}: window_share={self.window_share!r} must lie in [0, 1]")
        if not isinstance(self.packed_decode, bool):
            raise ConfigError(f"{m}: packed_decode={self.packed_decode!r} must be true or false")
        if not 0.0 <= self.layer_skew < 1.0:
            raise ConfigError(f"{m}: layer_skew={self.layer_skew!r} must lie in [0, 1)")

    @property
    def compresses(self) -> bool:
        """False at budget 1.0: every token stays in FP16, so there is nothing to allocate."""
        return self.budget < 1.0

    @property
    def tracks_attention(self) -> bool:
        # At budget 1.0 importance would decide nothing, and its bytes would have to be paid for
        # by quantizing tokens: keep none.
        return self.compresses and self.allocation not in _NO_SIGNAL

    def spec(self) -> MixedSpec:
        return MixedSpec(
            bit_set=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            budget=self.budget,
            window=self.window if self.compresses else sys.maxsize,
            window_share=self.window_share if self.compresses else 1.0,
            sink_tokens=self.sink_tokens,
            allocation="greedy" if self.allocation == "layer_aware" else self.allocation,
            signal=self.signal,
            granularity=self.granularity,
            kv_split=self.kv_split,
            key_weight=self.key_weight,
            realloc_freq=self.realloc_freq,
            layer_budgets="entropy" if self.allocation == "layer_aware" and self.compresses else "equal",
            layer_skew=self.layer_skew,
            seed=self.seed,
            key_smoothing=self.key_smoothing and self.compresses,  # nothing is quantized at 1.0
            key_rotation=self.key_rotation and self.compresses,
            prior=self.prior,
            pool=self.pool,
            error_model=self.error_model,
            packed_decode=self.packed_decode,
            scale_format=self.scale_format,
        )


@register("smartkv", SmartKVConfig, "attention-guided mixed precision (bits per token) under a memory budget")
def build(config: SmartKVConfig, model_config) -> KVCache:
    spec = config.spec()
    # The cache keeps one signal in FP16, and those bytes count against its budget.
    # One precision per token per layer needs the heads' sum only (1/H_kv of the bytes).
    tracker = (ImportanceTracker.for_signal(config.signal, config.decay, config.obs_window,
                                            per_head=config.granularity == "head")
               if config.tracks_attention else None)
    return KVCache([MixedPrecisionLayer(spec) for _ in range(n_layers(model_config))], "smartkv", config, tracker)
