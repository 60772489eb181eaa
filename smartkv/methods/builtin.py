"""Importing this module registers every built-in method."""

from smartkv.methods import fp16, hf_dynamic, kivi, smartkv, uniform  # noqa: F401

try:  # transformers' QuantizedCache peers; their backends are an optional extra
    from smartkv.methods import hf_quantized  # noqa: F401
except ImportError:  # pragma: no cover - module written separately
    pass
