"""The stage tables of docs/pipeline.md and README.md are generated from dvc.yaml and the stage
modules' docstrings (scripts/pipeline_doc.py): a committed table that differs from what the
script writes now fails here, naming the file. Fix: `python scripts/pipeline_doc.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_doc():
    spec = importlib.util.spec_from_file_location("pipeline_doc", ROOT / "scripts" / "pipeline_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("rel", ["docs/pipeline.md", "README.md"])
def test_stage_table_is_up_to_date(pipeline_doc, rel):
    want = pipeline_doc.expected(ROOT)[rel]
    assert (ROOT / rel).read_text(encoding="utf-8") == want, (
        f"{rel}'s stage table is out of date with dvc.yaml or a stage docstring: run python scripts/pipeline_doc.py")


def test_every_stage_has_a_row(pipeline_doc):
    import yaml

    names = list(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    stages = pipeline_doc.load_stages(ROOT)
    assert [s.name.split("@")[0] for s in stages] == names
    full = (ROOT / "docs/pipeline.md").read_text(encoding="utf-8")
    for s in stages:
        assert f"| `{s.name}` |" in full
        assert s.description and s.writes, s


def test_a_changed_stage_shows_in_the_table(pipeline_doc, tmp_path):
    """The table follows dvc.yaml: a new output in a copy of the repository's files is in its table."""
    for rel in ("dvc.yaml", "README.md", "docs/pipeline.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "stages").mkdir()
    for path in (ROOT / "stages").glob("*.py"):
        (tmp_path / "stages" / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    dvc = (tmp_path / "dvc.yaml").read_text(encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(dvc.replace("      - data/tasks.parquet: {cache: false}",
                                                   "      - data/tasks.parquet: {cache: false}\n      - data/extra_out.parquet",
                                                   1), encoding="utf-8")
    got = pipeline_doc.expected(tmp_path)
    assert "`data/{tasks,extra_out}.parquet`" in got["docs/pipeline.md"]
    assert got["docs/pipeline.md"] != (ROOT / "docs/pipeline.md").read_text(encoding="utf-8")


def test_paths_are_braced_as_a_shell_would(pipeline_doc):
    got = pipeline_doc.compress(["plots/a.png", "plots/a.pdf", "plots/b.png", "plots/b.pdf", "metrics/a.json",
                                 "REPORT.md", "data/x"])
    assert got == ["plots/{a,b}.{png,pdf}", "metrics/a.json", "REPORT.md", "data/x"]
