"""Methods registered by name: `build_cache("smartkv", model.config, budget=0.3)`."""

from smartkv.methods.registry import ConfigError, build_cache, config_dict, get_spec, make_config, method_names

__all__ = ["ConfigError", "build_cache", "config_dict", "get_spec", "make_config", "method_names"]
