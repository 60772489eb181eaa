"""Every module a pipeline stage can import is one of its DVC deps, and no more than that.

DVC re-runs a stage when one of its deps changes, so a stage that imports a module it does
not list can go stale silently, and one that lists the whole package re-runs the 50-minute
study whenever a report sentence changes. The import graph is read statically (every
`import` and `from ... import`, inside functions too, and "smartkv.x" module strings, which
`smartkv.phase_timer` resolves at run time), from the stage's module outwards.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("smartkv", "stages")
# Files a module reads at run time that no import names: the C++ sources the kernels build.
DATA_DEPS = {"smartkv/kernels.py": ("smartkv/csrc",)}
# What the study's model stages must not depend on: code that only reads their results.
NOT_MODEL_DEPS = ("smartkv/report", "smartkv/stats")
MODEL_STAGES = ("baselines", "smartkv", "peers")
_MODULE_STRING = re.compile(r"^(smartkv|stages)(\.\w+)+$")


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported(path: Path) -> set[str]:
    """Names of the project modules `path` imports (and their parent packages)."""
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(
                node.value.split(":")[0]):
            names.add(node.value.split(":")[0])
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] in PACKAGES:
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def import_closure(module: str) -> set[str]:
    """Repository-relative files of `module` and of every project module it can import."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imported(path))
    files = {p.relative_to(REPO).as_posix() for p in seen}
    return files | {d for f in files for d in DATA_DEPS.get(f, ())}


def _empty(path: str) -> bool:
    """A module with nothing but a docstring (a bare package marker) changes no result."""
    file = REPO / path
    if not file.is_file():
        return False
    body = ast.parse(file.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _python_stages() -> dict[str, tuple[str, list[str]]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: one body for every cell
        match = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        if match:
            deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
            out[name] = (match.group(1), deps)
    return out


STAGES = _python_stages()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_every_module_it_imports(stage):
    module, deps = STAGES[stage]
    missing = sorted(f for f in import_closure(module) if not _covered(f, deps) and not _empty(f))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them as deps"


@pytest.mark.parametrize("stage", MODEL_STAGES)
def test_model_stages_do_not_depend_on_what_reads_their_results(stage):
    _, deps = STAGES[stage]
    assert "smartkv" not in deps, f"{stage} depends on the whole package: a report edit would re-run it"
    assert not [d for d in deps if _covered(d, list(NOT_MODEL_DEPS))]


def test_the_closure_sees_imports_inside_functions():
    # runner imports build_cache at module level, and evaluate imports the study driver's
    # lazily imported modules; the phase timer names cache methods as strings
    assert "smartkv/evaluate.py" in import_closure("smartkv.study.driver")
    assert "smartkv/cache/mixed.py" in import_closure("smartkv.phase_timer")
    assert "smartkv/csrc" in import_closure("smartkv.kernels")
