"""`hf_dynamic`: transformers' own `DynamicCache`, the uncompressed cache every HF model uses.

Registered so that benchmarks can show both references side by side: `fp16` (SmartKV's own
layer, 16-bit storage) and the cache `transformers` users start from (model dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DynamicCache

from smartkv.methods.registry import register


@dataclass(frozen=True)
class HfDynamicConfig:
    pass


@register("hf_dynamic", HfDynamicConfig, "transformers' DynamicCache (no quantization, model dtype)")
def build(config: HfDynamicConfig, model_config) -> DynamicCache:
    return DynamicCache(config=model_config)
