"""`uniform`: every token at the same width, per-token groups over head_dim (INT8/4/3/2)."""

from __future__ import annotations

from dataclasses import dataclass

from smartkv.cache.base import KVCache
from smartkv.cache.mixed import MixedPrecisionLayer, MixedSpec
from smartkv.methods.common import check_bits, check_int, n_layers
from smartkv.methods.registry import register


@dataclass(frozen=True)
class UniformConfig:
    bits: int = 4
    group_size: int = 32
    symmetric: bool = False

    def __post_init__(self):
        check_bits("uniform", "bits", self.bits, (2, 3, 4, 8))
        check_int("uniform", "group_size", self.group_size, 1)


@register("uniform", UniformConfig, "uniform INTk, asymmetric, per-token groups; no window, no allocation")
def build(config: UniformConfig, model_config) -> KVCache:
    spec = MixedSpec(bit_set=(config.bits,), group_size=config.group_size, symmetric=config.symmetric,
                     granularity="head", kv_split=True)
    return KVCache([MixedPrecisionLayer(spec) for _ in range(n_layers(model_config))], "uniform", config)
