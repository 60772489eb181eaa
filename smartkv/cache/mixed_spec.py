"""`MixedSpec`: the settings of one mixed-precision layer (smartkv/cache/mixed.py).

Built from `SmartKVConfig` (smartkv/methods/smartkv.py), or with a single width and no budget
for uniform INTk (smartkv/methods/uniform.py: one quantizer for every method, docs/DESIGN.md
decision 4). Frozen: every layer of a cache shares one spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixedSpec:
    bit_set: tuple[int, ...]
    group_size: int = 32
    symmetric: bool = False
    budget: float | None = None
    window: int = 0
    # The FP16 window may hold at most this share of the layer's budget bytes: at short
    # contexts a fixed window would otherwise eat the budget the quantized tokens need.
    window_share: float = 1.0
    sink_tokens: int = 0
    allocation: str = "greedy"
    signal: str = "ema"
    granularity: str = "layer"
    kv_split: bool = False
    key_weight: float = 1.0
    realloc_freq: int = 16
    layer_budgets: str = "equal"
    layer_skew: float = 0.5
    seed: int = 0
    key_smoothing: bool = False
    # Rotate keys over head_dim by an orthogonal matrix before quantization (smartkv/rotation.py).
    key_rotation: bool = False
    prior: float = 0.0
    pool: int = 1  # average each token's importance with its neighbours (SnapKV pools over 5)
    # Squared error of each width for the allocator: "range" (measured: each unit's group
    # ranges, step**2 / 12) or "bits" (the 4**-b model of a uniform quantizer).
    error_model: str = "range"
    # Decode steps attend straight from the packed codes (smartkv/packed_attention.py) where
    # the C++ kernel can: no full-precision copy of the history, the tracker's weights from the same pass.
    packed_decode: bool = True
    # How scales and zero-points are stored: "fp16" | "bf16" | "int8" (smartkv/scale_format.py).
    scale_format: str = "fp16"
