"""`fp16`: the uncompressed reference, every K and V value held in 16 bits."""

from __future__ import annotations

from dataclasses import dataclass

from smartkv.cache.base import KVCache
from smartkv.cache.fp16 import FP16Layer
from smartkv.methods.common import n_layers
from smartkv.methods.registry import register


@dataclass(frozen=True)
class FP16Config:
    pass


@register("fp16", FP16Config, "no quantization: K and V held in 16 bits")
def build(config: FP16Config, model_config) -> KVCache:
    return KVCache([FP16Layer() for _ in range(n_layers(model_config))], "fp16", config)
