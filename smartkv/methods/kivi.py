"""`kivi`: KIVI-2/4 (Liu et al. 2024), keys per-channel, values per-token, FP16 residual of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from smartkv.cache.base import KVCache
from smartkv.cache.kivi import KIVILayer
from smartkv.methods.common import check_bits, check_int, n_layers
from smartkv.methods.registry import ConfigError, register


@dataclass(frozen=True)
class KIVIConfig:
    bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self):
        check_bits("kivi", "bits", self.bits, (2, 4))
        check_int("kivi", "group_size", self.group_size, 8)
        check_int("kivi", "residual_length", self.residual_length, 1)
        if self.residual_length % self.group_size or self.group_size % 8:
            raise ConfigError(
                f"kivi: residual_length={self.residual_length} must be a multiple of group_size={self.group_size}, "
                "itself a multiple of 8"
            )


@register("kivi", KIVIConfig, "KIVI: keys per-channel, values per-token, asymmetric, group 32, FP16 residual 128")
def build(config: KIVIConfig, model_config) -> KVCache:
    layers = [KIVILayer(config.bits, config.group_size, config.residual_length) for _ in range(n_layers(model_config))]
    return KVCache(layers, "kivi", config)
