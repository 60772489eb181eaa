"""`transformers` cache classes that hold the KV cache at reduced precision, with measured bytes."""

from smartkv.cache.base import KVCache, KVLayer, active_update

__all__ = ["KVCache", "KVLayer", "active_update"]
