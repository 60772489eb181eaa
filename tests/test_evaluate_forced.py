"""`evaluate` on generated tasks with a tiny model: the paired per-prompt columns, both
prediction modes, and the shared FP16 reference."""

import math

import pytest
import torch

from smartkv import scoring
from smartkv.evaluate import ANSWER_SLACK, evaluate
from smartkv.models import tiny_model
from smartkv.runner import RunSpec
from smartkv.tasks import generate_task


class ByteTokenizer:
    """One token per UTF-8 byte (the tiny models have 256 ids), left padding."""

    padding_side = "left"
    pad_token_id = 0
    is_fast = True  # it gives character offsets, as transformers' fast tokenizers do

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True, **kwargs):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, prompts, return_tensors="pt", padding=True, add_special_tokens=True,
                 return_offsets_mapping=False):
        if return_offsets_mapping:  # one prompt, as the needle-bits column asks (ASCII: byte i is char i)
            ids = self.encode(prompts)
            return {"input_ids": ids, "offset_mapping": [(i, i + 1) for i in range(len(ids))]}
        rows = [self.encode(p) for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


TOK = ByteTokenizer()
RUNS = [
    RunSpec("fp16", "fp16"),
    RunSpec("int4", "uniform", {"bits": 4}),
    RunSpec("int2", "uniform", {"bits": 2}),
    RunSpec("kivi-2", "kivi", {"bits": 2, "residual_length": 32}),
]
SMARTKV = RunSpec("smartkv", "smartkv", {"budget": 0.5}, "smartkv")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def samples():
    niah = generate_task("niah", TOK, n_per_cell=1, lengths=[420], depths=[0.3, 0.7], seed=100)
    ppl = generate_task("perplexity", TOK, n_per_cell=1, lengths=[300], depths=[], seed=100, continuation_tokens=40)
    return niah + ppl


@pytest.fixture(scope="module")
def forced(model, samples):
    return evaluate(model, TOK, samples, RUNS, progress=False)


def test_paired_columns_per_prompt(forced, samples):
    assert len(forced) == len(samples) * len(RUNS)
    for col in ("cluster", "forced_exact", "answer_logprob", "kl_fp16", "answer_tokens", "forced_s", "reference_s"):
        assert col in forced.columns
    assert forced["error"].eq("").all()
    assert set(forced["cluster"]) == {s.cluster for s in samples}
    assert forced["answer_logprob"].lt(0).all() and forced["kl_fp16"].ge(0).all()
    fp16 = forced[forced["run"] == "fp16"]
    # The FP16 run reads the same cache as the shared reference: no divergence at all.
    assert fp16["kl_fp16"].abs().max() < 1e-6
    int2 = forced[forced["run"] == "int2"].set_index("sample_id")
    int4 = forced[forced["run"] == "int4"].set_index("sample_id")
    assert (int2["kl_fp16"] > int4["kl_fp16"]).all()  # fewer bits, further from FP16


def test_forced_mode_scores_without_generating(forced, samples):
    answer = forced[forced["metric"] != "perplexity"]
    assert answer["new_tokens"].eq(0).all() and answer["decode_s"].isna().all()
    assert (answer["score"] == answer["forced_exact"]).all()
    by_id = {s.sample_id: s for s in samples}
    for row in answer.itertuples():
        target = TOK.encode(by_id[row.sample_id].target)
        assert row.answer_tokens == len(target)
        # The prediction is the argmax under teacher forcing: exact iff it is the target.
        assert (row.prediction == by_id[row.sample_id].target) == bool(row.forced_exact)


def test_perplexity_from_one_forward(forced, samples):
    ppl = forced[forced["metric"] == "perplexity"]
    cont = [s for s in samples if s.metric == "perplexity"][0].meta["continuation"]
    assert ppl["answer_tokens"].eq(len(TOK.encode(cont))).all()
    assert (ppl["nll"] == -ppl["answer_logprob"]).all()
    assert ppl["score"].isna().all()


def test_generate_mode_caps_decoding_and_keeps_the_paired_measures(model, samples, forced):
    gen = evaluate(model, TOK, samples, RUNS, progress=False, prediction="generate", max_new_tokens=50)
    answer = gen[gen["metric"] != "perplexity"]
    assert (answer["new_tokens"] <= answer["answer_tokens"] + ANSWER_SLACK).all()
    assert answer["new_tokens"].gt(0).all()
    for row in answer.itertuples():
        assert row.score == scoring.score(row.metric, row.prediction, eval(row.answers), {})
    cols = ["answer_logprob", "kl_fp16", "forced_exact", "nll"]
    a = forced.set_index(["sample_id", "run"])[cols]
    b = gen.set_index(["sample_id", "run"])[cols]
    torch.testing.assert_close(torch.tensor(a.fillna(0).values), torch.tensor(b.fillna(0).values))


def test_skipping_importance_tracking_changes_nothing(model, samples, forced):
    """Baselines prefill without the importance pass; adding a SmartKV run turns it on."""
    both = evaluate(model, TOK, samples, RUNS + [SMARTKV], progress=False)
    cols = ["answer_logprob", "kl_fp16", "forced_exact"]
    a = forced.set_index(["sample_id", "run"])[cols]
    b = both[both["run"] != "smartkv"].set_index(["sample_id", "run"])[cols]
    torch.testing.assert_close(torch.tensor(a.values), torch.tensor(b.values))
    assert both[both["run"] == "smartkv"]["kl_fp16"].notna().all()


def test_bad_prediction_mode_is_named(model, samples):
    with pytest.raises(ValueError, match="prediction='sample'; allowed: forced, generate"):
        evaluate(model, TOK, samples[:1], RUNS[:1], progress=False, prediction="sample")


def test_sample_without_target_still_generates(model, samples):
    s = samples[0]
    bare = type(s)(**{**s.__dict__, "target": ""})
    row = evaluate(model, TOK, [bare], RUNS[:1], progress=False, max_new_tokens=5).iloc[0]
    assert row["new_tokens"] == 5 and math.isnan(row["answer_logprob"])


def test_calibration_pilot_uses_dev_seeds_only(model):
    from smartkv.calibrate import pilot, pilot_table

    grid = {"niah": {"lengths": [420], "depths": [0.5], "n_per_cell": 2, "max_new_tokens": 8}}
    with pytest.raises(ValueError, match=r"seeds \[3\] are test seeds"):
        pilot(model, TOK, grid, [3], progress=False)
    df = pilot(model, TOK, grid, [100, 101], progress=False)
    assert len(df) == 4 and set(df["seed"]) == {100, 101} and df["run"].eq("fp16").all()
    table = pilot_table(df)
    assert table["n"].tolist() == [4]
    assert table["forced_exact"].iloc[0] == pytest.approx(df["forced_exact"].mean())


def test_one_spec_under_two_labels_runs_once_and_serves_both(model, samples, monkeypatch):
    """The headline at INT3's bytes is `smartkv@int3`: the same spec, computed once per sample."""
    import smartkv.evaluate as ev

    calls = []
    real = ev._one_run
    monkeypatch.setattr(ev, "_one_run", lambda *a, **k: calls.append(a[4].label) or real(*a, **k))
    twin = RunSpec("smartkv@int3", "smartkv", {"budget": 0.5}, "smartkv")
    df = evaluate(model, TOK, samples[:1], [SMARTKV, twin, RunSpec("int4", "uniform", {"bits": 4})], progress=False)
    assert calls == ["smartkv", "int4"]
    a, b = (df[df["run"] == r].iloc[0] for r in ("smartkv", "smartkv@int3"))
    same = [c for c in df.columns if c not in ("run",)]
    assert a[same].astype(str).tolist() == b[same].astype(str).tolist()


def test_smartkv_rows_count_their_reallocations(model, samples):
    """memory_of passes the cache's count on: the first allocation at least, for every SmartKV row;
    a cache without allocation (FP16, uniform) counts none."""
    df = evaluate(model, TOK, samples, [SMARTKV, RUNS[0], RUNS[1]], progress=False)
    assert (df.loc[df["run"] == "smartkv", "reallocations"] >= 1).all()
    ppl = df[(df["run"] == "smartkv") & (df["task"] == "perplexity")]
    assert (ppl["reallocations"] > 1).all()  # 40 scored tokens in forwards of 16 cross realloc_freq
    assert (df.loc[df["run"] != "smartkv", "reallocations"] == 0).all()
