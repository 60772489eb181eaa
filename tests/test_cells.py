"""Cells of the study (smartkv/study/cells.py): names, shards that partition a cell, the cover check."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from smartkv.study.cells import Cell, cell_list, check_cover, find, parse
from smartkv.study.params import ParamError

REPO = Path(__file__).resolve().parent.parent


def samples(task, length, n):
    return [SimpleNamespace(task=task, context_length=length, sample_id=f"{task}{length}-{i}") for i in range(n)]


@pytest.mark.parametrize("name, cell", [("niah-1024", Cell("niah", 1024)), ("niah-1024-2of6", Cell("niah", 1024, 2, 6)),
                                        ("ruler_multikey-1024-1of2", Cell("ruler_multikey", 1024, 1, 2))])
def test_names_parse_and_round_trip(name, cell):
    assert parse(name) == cell and cell.name == name


@pytest.mark.parametrize("bad", ["niah", "niah-0", "niah-1024-3of2", "niah-1024-0of2", "Niah-1024", "niah-1k", 7])
def test_a_bad_name_is_refused_with_the_allowed_forms(bad):
    with pytest.raises(ParamError, match=r"cells: .*(allowed|does not exist)"):
        parse(bad)


@pytest.mark.parametrize("n_prompts, shards", [(30, 6), (7, 3), (2, 3), (1, 1)])
def test_shards_partition_a_cell_in_order(n_prompts, shards):
    items = samples("niah", 1024, n_prompts) + samples("niah", 2048, 4) + samples("perplexity", 1024, 2)
    parts = [Cell("niah", 1024, i, shards).take(items) for i in range(1, shards + 1)]
    flat = [s for p in parts for s in p]
    assert flat == [s for s in items if s.task == "niah" and s.context_length == 1024]  # every prompt once, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_cell_list_must_hold_every_shard_once():
    ok = {"cells": {"main": ["niah-1024-1of2", "niah-1024-2of2", "perplexity-1024"]}}
    assert [c.name for c in cell_list(ok, "main")] == ok["cells"]["main"]
    assert find(ok, "main", "niah-1024-2of2") == Cell("niah", 1024, 2, 2)
    for bad in (["niah-1024-1of2"], ["niah-1024-1of2", "niah-1024-1of2"], ["niah-1024", "niah-1024-1of2"],
                ["niah-1024-1of2", "niah-1024-2of3"]):
        with pytest.raises(ParamError, match="must be listed whole or as all of its shards"):
            cell_list({"cells": {"main": bad}}, "main")
    with pytest.raises(ParamError, match="no cell 'niah-2048'; allowed: niah-1024-1of2, niah-1024-2of2"):
        find(ok, "main", "niah-2048")


def test_the_cover_check_names_what_is_missing_and_what_is_extra():
    p = {"cells": {"main": ["niah-1024", "niah-4096"]}}
    check_cover({"cells": {"main": ["niah-1024"]}}, "main", {("niah", 1024)})
    with pytest.raises(ParamError, match=r"missing perplexity-1024; no prompts for niah-4096; the grid has niah-1024, "
                                         r"perplexity-1024"):
        check_cover(p, "main", {("niah", 1024), ("perplexity", 1024)})


def test_the_committed_cells_cover_the_committed_grids():
    """params.yaml's cell lists match the task grids its prepare stages write (checked there too)."""
    import pandas as pd

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, tasks in (("main", "tasks"), ("extra_cells", "extra_cells_tasks"), ("second_model", "second_model_tasks"),
                         ("passages", "passages_tasks")):
        path = REPO / "data" / f"{tasks}.parquet"
        if group == "passages" and not path.exists():
            pytest.skip("data/passages_tasks.parquet is not committed yet: the passages section has not run")
        df = pd.read_parquet(path)
        check_cover(params, group, {(str(t), int(n)) for t, n in zip(df["task"], df["context_length"])})


def test_a_shard_without_prompts_writes_no_rows(tmp_path):
    """A dev sweep has fewer prompts than the test grid's shards: such a shard is empty, not an error,
    and the union of a part's cells skips it."""
    import pandas as pd

    from smartkv.io import atomic_write_parquet, read_parquet_with_meta
    from smartkv.study.driver import evaluate_runs, read_cells

    tasks, meta = read_parquet_with_meta(REPO / "data" / "tasks.parquet")
    one = tasks[(tasks["split"] == "dev") & (tasks["task"] == "niah") & (tasks["context_length"] == 2048)].head(1)
    atomic_write_parquet(one, tmp_path / "tasks.parquet", meta)
    params = {"model": "default", "dtype": "float32"}
    empty = evaluate_runs(params, [], tmp_path / "tasks.parquet", split="dev", desc="t", cell=parse("niah-2048-1of2"))
    assert empty.empty and {"run", "seed", "sample_id", "error"} <= set(empty.columns)
    atomic_write_parquet(empty, tmp_path / "a.parquet", {})
    rows = pd.DataFrame({"run": ["x"], "seed": [100], "task": ["niah"], "sample_id": ["s"], "score": [1.0]})
    atomic_write_parquet(rows, tmp_path / "b.parquet", {})
    union = read_cells([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert len(union) == 1 and union["score"].dtype == float
