"""SmartKV: attention-guided mixed-precision KV-cache quantization for transformers causal LMs."""

__version__ = "0.1.0"
