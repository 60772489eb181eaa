"""The project's error for a bad value, in a module that imports nothing heavy: the kvpress
peers stage runs under another `transformers` and must be able to raise and catch it."""


class ConfigError(ValueError):
    """A bad method name or parameter; the message names the bad value and what is allowed."""
