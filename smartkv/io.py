"""Atomic file writes and provenance, so no stage ever leaves a half-written output.

Every writer goes through `atomic_path`: write to a temporary file in the target's own
directory (same filesystem, so `os.replace` is atomic), then replace. A crash or an
exception mid-write leaves the previous file untouched and no temporary file behind —
DVC would otherwise cache a truncated parquet as if it were a result.

Results files carry their provenance (resolved config, library versions) inside the
parquet schema metadata, so a number can always be traced to what produced it. Nothing in
it varies from run to run (no timestamp, no git revision by default): DVC hashes outputs
by content, and a re-run that reproduces the same results must reproduce the same bytes.
The code that made an output is pinned by `dvc.lock` (the hash of every code dependency)
and by the commit that holds both.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_META_KEY = b"smartkv"
_REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot-prefixed name keeps half-written files out of globs such as `plots/*.png`.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    # Serialize before opening anything, so an unserializable object fails fast;
    # sorted keys keep `dvc metrics diff` and git diffs stable.
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    return atomic_write_text(path, text)


def atomic_write_parquet(df: pd.DataFrame, path: str | os.PathLike, metadata: dict) -> Path:
    """Write `df` with `metadata` (JSON) stored in the schema metadata under b"smartkv"."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_META_KEY] = json.dumps(metadata, sort_keys=True).encode("utf-8")
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_with_meta(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(PARQUET_META_KEY)
    meta = json.loads(raw.decode("utf-8")) if raw else {}
    return table.to_pandas(), meta


def git_revision(repo_dir: str | os.PathLike = _REPO_ROOT) -> str:
    """HEAD's hash, with "-dirty" when the tree has uncommitted changes; "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        rev = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _version(dist: str) -> str:
    # importlib.metadata reads versions without importing torch/transformers (seconds each).
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_name(device: str = "cpu") -> str:
    """The GPU's name on a CUDA device, else the CPU's model name (and its core count)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def provenance(config: dict, repo_dir: str | os.PathLike = _REPO_ROOT, revision: bool = False) -> dict:
    """Config and library versions; `revision=True` adds the git revision (for documents such
    as REPORT.md that nothing downstream hashes; it is "-dirty" inside `dvc exp run`)."""
    from smartkv import __version__

    out = {
        "config": config,
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "smartkv": __version__,
            "numpy": _version("numpy"),
            "pandas": _version("pandas"),
        },
    }
    if revision:
        out["git_revision"] = git_revision(repo_dir)
    return out
