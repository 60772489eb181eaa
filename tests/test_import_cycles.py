"""No import cycles among the project's modules (issue 34): a cycle makes import order matter, hides
which part depends on which, and blurs the DVC deps a stage needs (tests/test_dvc_deps.py).

The graph holds the imports a module runs when it is imported: those at module level, including
inside a top-level `if` or `try`. An import inside a function runs later and is left out here; such
imports are what breaks a cycle, and each should say why beside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("smartkv", "stages")


def _name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _load_time_imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for top in ast.parse(path.read_text(encoding="utf-8")).body:
        nodes = ast.walk(top) if isinstance(top, (ast.If, ast.Try)) else [top]
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    out = set()
    for name in found:  # importing a.b.c runs a and a.b first
        parts = name.split(".")
        out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                   if p in MODULES and p != module and not module.startswith(p + "."))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_project_modules():
    graph = {m: _load_time_imports(m) for m in MODULES}
    assert sum(map(len, graph.values())) > 100  # the graph was read, not left empty
    assert cycles(graph) == []
