"""The smartkv CPU extension: build, load, and the one switch that turns it off.

The C++ sources are package data under `smartkv/csrc/`:
- `dequant.cpp`: packed bit planes -> scaled values scattered into a buffer, bit-identical to
  `QuantizedRows.dequantize` (same operations in the same order, built with -ffp-contract=off);
- `quantize.cpp`: rows -> FP16 scale/zero per group and packed bit planes in one pass,
  bit-identical to the PyTorch path of `quantize_rows` (same reasoning as dequant.cpp);
- `packed_attention.cpp`: one decode query's attention over a mixed-precision history read
  straight from the packed codes (see `smartkv.packed_attention`);
- `tracker_step.cpp`: that query's attention mass folded into an importance statistic in one
  pass, bit-identical to the PyTorch path of `ImportanceTracker.add_step` (same reasoning).

They are compiled on first use with `torch.utils.cpp_extension.load` (ninja, a base dependency)
into `$SMARTKV_HOME/torch_extensions/<torch and python version>/<source hash>/` (default home
`~/.cache/smartkv`); torch's file baton there keeps two processes from building at once, and a
thread lock does the same within one process.

The build is content-addressed: the sources are copied into that folder (named by a hash of
every file under `csrc/`, the compiler flags and torch's install path) and compiled from
there. Ninja keys each object on its command line, which names the source path (and torch's
headers), so compiling from the package's own folder made every checkout (a clone, a DVC
experiment workspace, the test suite's copies of the repository) rebuild the whole extension,
and checkouts that alternate rebuilt it again each time: about 3 minutes a build on two
cores. With one folder per source content and environment, every checkout with the same
sources loads one build.

A failed build is an error (`KernelBuildError`, naming the compiler's last line), not a silent
slow path: the PyTorch path is used instead only when `SMARTKV_NO_KERNEL=1` is set on purpose,
or when the tensors are not on the CPU (nothing is built then). This module imports nothing
from smartkv, so the quantizer can import it without a cycle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXT_NAME = "smartkv_cpu"
DISABLE_ENV = "SMARTKV_NO_KERNEL"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "dequant.cpp", "packed_attention.cpp", "quantize.cpp", "tracker_step.cpp")
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)


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


def source_hash() -> str:
    """A digest of every file under `csrc/` (names and bytes), the compiler flags, and where torch
    is installed: its headers' path is on the compile line too, so two environments (a clone's
    venv beside the work tree's) sharing one folder would rebuild it in turn."""
    digest = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """Where the extension is built and cached: one folder per torch and Python version and
    per source content (see the module docstring for why the content is in the path)."""
    tag = f"{EXT_NAME}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return _home() / "torch_extensions" / tag / source_hash()


def _stage_sources(directory: Path) -> Path:
    """Copy `csrc/` into `directory/src` once (to a temporary name, then renamed, so that a
    concurrent process never compiles a half-copied folder); return that folder."""
    target = directory / "src"
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix="src-", dir=directory))
    for path in SOURCE_DIR.iterdir():
        if path.is_file():
            shutil.copy2(path, staging / path.name)
    try:
        staging.rename(target)
    except OSError:  # another process renamed its copy first: same bytes, keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


# torch's file baton (`<build dir>/lock`) is removed by the process that builds; one killed mid-build
# leaves it behind, and every later process then waits on it forever, silently (it happened: a test
# run stopped by `timeout` hung a study run for minutes). A build takes under two minutes on 2 cores.
STALE_LOCK_S = 600


def clear_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove `directory/lock` when it is older than `max_age_s` (its builder is gone); True if removed."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    log.warning("smartkv: removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _build():
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(directory)
    sources = _stage_sources(directory)
    start = time.perf_counter()
    module = load(
        name=EXT_NAME,
        sources=[str(sources / s) for s in SOURCES],
        extra_include_paths=[str(sources)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
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
