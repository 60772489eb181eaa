"""The smartkv CPU extension: build, load, and the one switch that turns it off.

The C++ sources are package data under `smartkv/csrc/`:
- `dequant.cpp`: packed bit planes -> scaled values scattered into a buffer, bit-identical to
  `QuantizedRows.dequantize` (same operations in the same order, built with -ffp-contract=off);
- `quantize.cpp`: rows -> FP16 scale/zero per group and packed bit planes in one pass,
  bit-identical to the PyTorch path of `quantize_rows` (same reasoning as dequant.cpp);
- `packed_attention.cpp`: one decode query's attention over a mixed-precision history read
  straight from the packed codes (see `smartkv.packed_attention`).

They are compiled on first use with `torch.utils.cpp_extension.load` (ninja, a base dependency)
into `$SMARTKV_HOME/torch_extensions/<torch and python version>/` (default home
`~/.cache/smartkv`); torch's file baton there keeps two processes from building at once, a
thread lock does the same within one process, and ninja rebuilds only what changed.

A failed build is an error (`KernelBuildError`, naming the compiler's last line), not a silent
slow path: the PyTorch path is used instead only when `SMARTKV_NO_KERNEL=1` is set on purpose,
or when the tensors are not on the CPU (nothing is built then). This module imports nothing
from smartkv, so the quantizer can import it without a cycle.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXT_NAME = "smartkv_cpu"
DISABLE_ENV = "SMARTKV_NO_KERNEL"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "dequant.cpp", "packed_attention.cpp", "quantize.cpp")


class KernelBuildError(RuntimeError):
    """The C++ extension could not be built or loaded (and SMARTKV_NO_KERNEL is not set)."""


_lock = threading.Lock()
_module = None
_error: KernelBuildError | None = None
_logged = False


def disabled() -> bool:
    """Whether SMARTKV_NO_KERNEL asks for the PyTorch path."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def _home() -> Path:
    env = os.environ.get("SMARTKV_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "smartkv"


def build_directory() -> Path:
    """Where the extension is built and cached (one directory per torch and Python version)."""
    tag = f"{EXT_NAME}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return _home() / "torch_extensions" / tag


def _build():
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = load(
        name=EXT_NAME,
        sources=[str(SOURCE_DIR / s) for s in SOURCES],
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )
    log.debug("smartkv kernel loaded from %s in %.1f s", directory, time.perf_counter() - start)
    return module


def _note_disabled() -> None:
    global _logged
    if not _logged:
        _logged = True
        log.info("smartkv: %s is set; using the PyTorch path instead of the C++ kernels", DISABLE_ENV)


def kernel_module():
    """The compiled module; None when SMARTKV_NO_KERNEL is set. Raises KernelBuildError if the build fails.

    Call it only for CPU tensors: a CUDA run never needs (or builds) the CPU extension.
    """
    global _module, _error
    if disabled():
        _note_disabled()
        return None
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _build()
            except Exception as exc:  # no compiler, failed build, failed import
                lines = str(exc).strip().splitlines()
                _error = KernelBuildError(
                    f"building the smartkv C++ kernels in {build_directory()} failed "
                    f"({type(exc).__name__}: {lines[-1] if lines else ''}); install a C++ compiler and ninja, "
                    f"or set {DISABLE_ENV}=1 to use the (slower) PyTorch path"
                )
                _error.__cause__ = exc
    if _error is not None:
        raise _error
    return _module


def kernel_available() -> bool:
    """True once the kernels are built and loaded; False when SMARTKV_NO_KERNEL is set.

    A failed build raises KernelBuildError rather than answering False.
    """
    return kernel_module() is not None


def fallback_reason() -> str | None:
    """Why the PyTorch path is in use on CPU tensors, or None when the kernels are."""
    return f"{DISABLE_ENV} is set" if disabled() else None


def warm_up() -> bool:
    """Build (or load) the kernels now, so that the first timed call does not pay for it.

    Returns whether they are in use; does nothing (False) when SMARTKV_NO_KERNEL is set.
    """
    return kernel_available()
