"""Model stages spread their samples over worker processes (smartkv/study/workers.py).

The pool must give the rows one process gives (same threads per process: a float reduction
depends on its thread count), whichever worker took which sample.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from smartkv.io import atomic_write_parquet
from smartkv.models import tiny_model
from smartkv.study.driver import TIMING_COLUMNS, evaluate_runs
from smartkv.study.params import ParamError, workers_setting
from smartkv.study.workers import chunks, effective_workers


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A tiny random Llama saved as a model folder, and a tasks file of needle prompts on two seeds."""
    from transformers import AutoTokenizer

    from smartkv.models import resolve_model_path
    from smartkv.tasks import generate_task

    root = tmp_path_factory.mktemp("workers")
    model = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    model.config.vocab_size = max(model.config.vocab_size, len(tok))
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = []
    for seed in (0, 1):
        for s in generate_task("niah", tok, n_per_cell=1, lengths=[96, 160], depths=[0.2, 0.5, 0.8], seed=seed):
            s.meta.setdefault("max_new_tokens", 4)
            rows.append({**s.to_row(), "seed": seed, "split": "test"})
    atomic_write_parquet(pd.DataFrame(rows), root / "tasks.parquet", {})
    return root


def _frame(root, workers: int) -> pd.DataFrame:
    from smartkv.runner import RunSpec

    params = {"model": str(root / "model"), "dtype": "float32", "device": "cpu", "workers": workers}
    runs = [RunSpec("fp16", "fp16"), RunSpec("int3", "uniform", {"bits": 3}),
            RunSpec("sk", "smartkv", {"budget": 0.4, "window": 8, "sink_tokens": 2})]
    df = evaluate_runs(params, runs, root / "tasks.parquet", split="test", desc="t")
    return df.drop(columns=[c for c in TIMING_COLUMNS if c in df.columns])


@pytest.mark.slow
def test_two_workers_give_the_rows_of_one_process(tiny_study):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each of two workers gets 2 // 2 = 1 thread: compare like with like
    try:
        one = _frame(tiny_study, 1)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)
    try:
        two = _frame(tiny_study, 2)
    finally:
        torch.set_num_threads(threads)
    assert len(one) == 36 and set(one["run"]) == {"fp16", "int3", "sk"}
    pd.testing.assert_frame_equal(one, two)
    assert (one.loc[one["run"] == "sk", "kv_ratio"] <= 0.4 + 1e-9).all()


def test_chunks_cover_every_sample_once_costliest_first():
    class S:
        def __init__(self, i, n, target=""):
            self.sample_id, self.context_length, self.target, self.meta = f"s{i}", n, target, {}

    groups = [(0, [S(i, 1024) for i in range(9)], 0.9, ["a", "b"]), (1, [S(9, 4096)], 0.9, ["a"]),
              (2, [S(10, 1024, "x" * 2000)], 0.9, ["a", "b"])]
    pieces = chunks(groups, size=4)
    ids = [s.sample_id for _, (_, samples, _, _) in pieces for s in samples]
    assert sorted(ids) == sorted(f"s{i}" for i in range(11))
    assert [len(p[1][1]) for p in pieces if p[0] == 0] == [4, 4, 1]
    assert pieces[0][0] == 2 and pieces[-1][1][1][0].sample_id == "s8"  # the long continuation first, a 1-sample chunk last


def test_workers_param_and_device():
    assert workers_setting({}) == 1 and workers_setting({"workers": 2}) == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ParamError, match="workers="):
            workers_setting({"workers": bad})
    assert effective_workers(2, "cpu") == 2 and effective_workers(2, "cuda:0") == 1
