"""Wall time spent in named phases of a decode step (importance tracking, re-allocation, ...).

The phases are methods of the cache classes, timed by wrapping them only inside a
`timed_phases()` block and restoring the originals on exit: outside the block the code runs
untouched, so the timers cost nothing when off. Nested phases (a window release that falls
back to a re-allocation) count once, for the outermost phase.
"""

from __future__ import annotations

import functools
import importlib
import time
from contextlib import contextmanager

# phase -> methods, as "module:Class.method"
PHASES: dict[str, tuple[str, ...]] = {
    # the second q.k + softmax over the cached keys that SDPA does not hand back (`observe`), or, on
    # the packed decode path, folding the weights the attention pass returned (`observe_weights`)
    "tracking": ("smartkv.cache.base:KVCache.observe", "smartkv.cache.base:KVCache.observe_weights"),
    # periodic re-allocation of every quantized unit (demotions, re-quantization)
    "reallocation": ("smartkv.cache.mixed:MixedPrecisionLayer._reallocate",),
    # tokens leaving the FP16 window quantized at the widths the slack affords (between re-allocations)
    "window_release": ("smartkv.cache.mixed:MixedPrecisionLayer._release_window",),
    # de-quantizing the whole history into full-size tensors for SDPA
    "dequantize_history": ("smartkv.cache.mixed:MixedPrecisionLayer._assemble",),
    # decode attention straight from the packed codes (the C++ kernel; replaces the two above)
    "packed_attention": ("smartkv.cache.mixed:MixedPrecisionLayer.attend_packed",),
}


def resolve(target: str):
    """`"module:Class.method"` -> (class, method name); raises if either is missing."""
    module_name, _, qual = target.partition(":")
    cls_name, _, attr = qual.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not callable(getattr(cls, attr, None)):
        raise AttributeError(f"phase target {target!r}: {cls_name} has no method {attr!r}")
    return cls, attr


@contextmanager
def _patched(phases: dict[str, tuple[str, ...]], wrap):
    """Replace each phase's methods by `wrap(name, original)` while the block runs; restore on exit."""
    patched = []
    try:
        for name, targets in phases.items():
            for target in targets:
                cls, attr = resolve(target)
                original = cls.__dict__.get(attr)
                if original is None:  # inherited: patch on the class itself, remove on exit
                    patched.append((cls, attr, None))
                    setattr(cls, attr, wrap(name, getattr(cls, attr)))
                else:
                    patched.append((cls, attr, original))
                    setattr(cls, attr, wrap(name, original))
        yield
    finally:
        for cls, attr, original in reversed(patched):
            if original is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, original)


@contextmanager
def timed_phases(phases: dict[str, tuple[str, ...]] | None = None):
    """Yield a dict phase -> seconds, filled while the block runs (plus "<phase>_calls" counts)."""
    phases = PHASES if phases is None else phases
    totals: dict[str, float] = {}
    for name in phases:
        totals[name] = 0.0
        totals[f"{name}_calls"] = 0
    active = [0]  # depth of timed calls in progress: only the outermost one is counted

    def wrap(name, original):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            if active[0]:
                return original(*args, **kwargs)
            active[0] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                totals[f"{name}_calls"] += 1
                active[0] -= 1

        return timed

    with _patched(phases, wrap):
        yield totals


@contextmanager
def labelled_phases(phases: dict[str, tuple[str, ...]] | None = None, prefix: str = "smartkv::"):
    """Mark every call of a phase as a `torch.profiler.record_function` range named `<prefix><phase>`.

    The C++ kernels are pybind functions, not ATen ops, so `torch.profiler` sees none of their
    time; inside these ranges it shows up as the range's self time, attributed to its phase."""
    import torch

    phases = PHASES if phases is None else phases

    def wrap(name, original):
        @functools.wraps(original)
        def labelled(*args, **kwargs):
            with torch.profiler.record_function(prefix + name):
                return original(*args, **kwargs)

        return labelled

    with _patched(phases, wrap):
        yield
