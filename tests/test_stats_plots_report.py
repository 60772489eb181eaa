"""Fast tests for statistics, figures, atomic I/O and the report, on synthetic results."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from smartkv import io, plots, report, stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RUNS = {  # run -> (method, family, budget, bits, kv_ratio, p_correct, tokens/s)
    "fp16": ("fp16", "baseline", np.nan, 16.0, 1.0, 0.9, 20.0),
    "uniform-4": ("uniform", "baseline", np.nan, 4.0, 0.31, 0.8, 17.0),
    "kivi-2": ("kivi", "baseline", np.nan, 2.0, 0.19, 0.5, 16.0),
    "smartkv-b0.20": ("smartkv", "smartkv", 0.20, np.nan, 0.20, 0.75, 15.0),
    "smartkv-b0.30": ("smartkv", "smartkv", 0.30, np.nan, 0.30, 0.85, 15.0),
    "ablation:random-b0.30": ("smartkv_random", "ablation", 0.30, np.nan, 0.30, 0.6, 15.0),
}


def synthetic(n_samples=20, seeds=(0, 1, 2), tasks=("needle", "kv_retrieval"), rng_seed=0):
    """Binary scores drawn per run with its own accuracy, plus a perplexity task."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for run, (method, family, budget, bits, ratio, p, tps) in RUNS.items():
        for seed in seeds:
            for task in (*tasks, "perplexity"):
                for i in range(n_samples):
                    ppl = task == "perplexity"
                    rows.append(dict(
                        run=run, method=method, family=family, budget=budget, bits=bits,
                        task=task, sample_id=f"s{i}", seed=seed,
                        context_length=[1024, 2048][i % 2], depth=np.nan if ppl else [0.1, 0.5, 0.9][i % 3],
                        prediction="x", answers='["x"]',
                        score=np.nan if ppl else float(rng.random() < p),
                        nll=2.0 + (1 - p) + 0.01 * rng.standard_normal() if ppl else np.nan,
                        kv_bytes=int(ratio * 1000), fp16_kv_bytes=1000, kv_ratio=ratio,
                        prefill_s=0.5, decode_s=0.4, new_tokens=8,
                        tokens_per_s=tps + rng.standard_normal(),
                    ))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def df():
    return synthetic()


@pytest.fixture(scope="module")
def summary(df):
    return stats.summarize(df)


# ---------------------------------------------------------------- statistics


def test_summarize_exact_on_hand_made_frame():
    # Seed 0 scores (1, 0) -> 0.5; seed 1 scores (1, 1) -> 1.0: mean 0.75, std(ddof=1) of {0.5, 1}.
    base = dict(run="r", method="m", family="baseline", budget=np.nan, bits=4.0, task="t")
    rows = [
        {**base, "sample_id": "a", "seed": 0, "score": 1.0, "kv_ratio": 0.25, "tokens_per_s": 10.0},
        {**base, "sample_id": "b", "seed": 0, "score": 0.0, "kv_ratio": 0.25, "tokens_per_s": 20.0},
        {**base, "sample_id": "a", "seed": 1, "score": 1.0, "kv_ratio": 0.35, "tokens_per_s": 30.0},
        {**base, "sample_id": "b", "seed": 1, "score": 1.0, "kv_ratio": 0.35, "tokens_per_s": 40.0},
    ]
    ppl = {**base, "task": "perplexity", "score": np.nan, "kv_ratio": 0.3, "tokens_per_s": 1.0}
    rows += [{**ppl, "sample_id": "a", "seed": 0, "nll": 1.0}, {**ppl, "sample_id": "b", "seed": 0, "nll": 3.0}]
    s = stats.summarize(pd.DataFrame(rows)).set_index("task")
    t = s.loc["t"]
    assert t["score_mean"] == pytest.approx(0.75)
    assert t["score_std"] == pytest.approx(math.sqrt(0.125))
    assert (t["n_samples"], t["n_seeds"]) == (2, 2)
    assert t["kv_ratio"] == pytest.approx(0.30)
    assert t["tokens_per_s"] == pytest.approx(25.0)
    p = s.loc["perplexity"]
    assert p["ppl"] == pytest.approx(math.exp(2.0))
    assert math.isnan(p["score_mean"]) and math.isnan(p["score_std"])  # single seed: std undefined


def test_summarize_orders_baselines_first(summary):
    runs = list(dict.fromkeys(summary["run"]))
    assert runs[0] == "fp16" and runs[-1] == "ablation:random-b0.30"


def _pair_frame(target, baseline):
    rows = []
    for run, scores in (("a", target), ("b", baseline)):
        for i, v in enumerate(scores):
            rows.append(dict(run=run, task="t", sample_id=f"s{i}", seed=0, score=float(v)))
    return pd.DataFrame(rows)


def test_paired_tests_detects_real_difference():
    rng = np.random.default_rng(1)
    base = rng.random(60)
    target = base + 0.2 + 0.05 * rng.standard_normal(60)
    # Shuffle the target rows: alignment must come from the key, not from row order.
    frame = _pair_frame(target, base).sample(frac=1.0, random_state=3)
    r = stats.paired_tests(frame, "a", ["b"]).iloc[0]
    assert r["n_pairs"] == 60 and r["n_unpaired"] == 0
    assert r["p_t"] < 0.05 and r["p_wilcoxon"] < 0.05 and bool(r["significant"])
    assert r["mean_diff"] == pytest.approx(float(np.mean(target - base)))
    assert r["ci_lo"] < 0.2 < r["ci_hi"]


def test_paired_tests_identical_runs_not_significant():
    scores = [1, 0, 1, 1, 0, 1, 0, 0]
    r = stats.paired_tests(_pair_frame(scores, scores), "a", ["b"]).iloc[0]
    assert r["p_t"] == 1.0 and r["p_wilcoxon"] == 1.0
    assert not bool(r["significant"])
    assert "zero" in r["note"]


def test_paired_tests_counts_unpaired_and_per_task(df):
    partial = df[~((df["run"] == "kivi-2") & (df["sample_id"] == "s0"))]
    t = stats.paired_tests(partial, "smartkv-b0.30", ["kivi-2", "uniform-4"], per_task=True)
    pooled = t[(t["baseline"] == "kivi-2") & (t["task"] == "all")].iloc[0]
    n_seeds, n_tasks = 3, 2  # perplexity rows have no score and are not paired
    assert pooled["n_unpaired"] == n_seeds * n_tasks
    assert set(t["task"]) == {"all", "needle", "kv_retrieval"}
    assert (t["p_t_holm"] >= t["p_t"]).all()


def test_paired_tests_unknown_run_raises(df):
    with pytest.raises(ValueError, match="no-such-run"):
        stats.paired_tests(df, "no-such-run", ["fp16"])


def test_bootstrap_ci_covers_true_mean_and_is_deterministic():
    # Coverage over many independent data sets: a 95% CI should hold the true mean ~95% of
    # the time (percentile bootstrap under-covers a little at n=50).
    rng = np.random.default_rng(7)
    hits = 0
    for k in range(200):
        lo, hi = stats.bootstrap_ci(0.3 + rng.standard_normal(50), seed=k)
        hits += lo < 0.3 < hi
    assert 0.88 <= hits / 200 <= 0.99
    x = 0.3 + rng.standard_normal(200)
    lo, hi = stats.bootstrap_ci(x, seed=11)
    assert lo < x.mean() < hi
    assert (lo, hi) == stats.bootstrap_ci(x, seed=11)
    assert (lo, hi) != stats.bootstrap_ci(x, seed=12)
    assert 0.2 < hi - lo < 0.36  # about 2 * 1.96 / sqrt(200) = 0.28 wide


def test_matched_memory_pairs(summary):
    m = stats.matched_memory_pairs(summary, tolerance=0.015)
    got = {(r.target, r.baseline, r.match) for r in m.itertuples()}
    assert ("smartkv-b0.20", "kivi-2", "within_tolerance") in got
    assert ("smartkv-b0.30", "uniform-4", "within_tolerance") in got
    assert not m["target"].str.startswith("ablation").any()
    # With no tolerance, the fallback gives the baseline at least as much memory as SmartKV.
    strict = stats.matched_memory_pairs(summary, tolerance=0.0).set_index("target")
    assert strict.loc["smartkv-b0.20", "baseline"] == "uniform-4"
    assert (strict["gap"] >= 0).all()


def test_metrics_json_numbers_only(summary, df):
    tests = stats.paired_tests(df, "smartkv-b0.30", ["uniform-4"])
    m = stats.metrics_json(summary, tests)
    text = json.dumps(m, allow_nan=False)  # raises if any NaN leaked through

    def leaves(d):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    assert all(isinstance(v, (int, float)) for v in leaves(json.loads(text)))
    assert m["runs"]["fp16"]["needle"]["kv_ratio"] == 1.0
    assert "ppl" in m["runs"]["fp16"]["perplexity"]
    assert m["tests"]["smartkv-b0.30_vs_uniform-4"]["all"]["significant"] in (0, 1)


def test_markdown_table(summary):
    t = stats.markdown_table(summary)
    lines = t.strip().splitlines()
    assert len(lines) == 2 + len(RUNS)
    assert "needle" in lines[0] and "KV memory" in lines[0] and "perplexity (ppl ↓)" in lines[0]
    fp = summary[(summary["run"] == "fp16") & (summary["task"] == "needle")].iloc[0]
    assert f"{fp['score_mean']:.3f} ± {fp['score_std']:.3f}" in t


# ---------------------------------------------------------------- plots


def _check_figure(paths, min_png_kb=10):
    png, pdf = paths
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > min_png_kb * 1024
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2 * 1024
    assert not list(png.parent.glob(".*.tmp"))


def test_pareto(df, summary, tmp_path):
    _check_figure(plots.pareto(df, tmp_path / "pareto"))
    _check_figure(plots.pareto(summary, tmp_path / "pareto_from_summary"))


def test_needle_heatmaps(df, tmp_path):
    _check_figure(plots.needle_heatmaps(df, ["fp16", "kivi-2", "smartkv-b0.30", "uniform-4"],
                                        tmp_path / "needle"))
    with pytest.raises(ValueError):
        plots.needle_heatmaps(df, ["missing"], tmp_path / "none")


def test_needle_grid_keeps_tasks_apart():
    # two needle tasks at the same (length, depth): their scores must not be averaged together
    rows = [dict(run="r", task=t, context_length=256, depth=0.5, score=v)
            for t, v in (("niah", 1.0), ("niah", 1.0), ("ruler_multikey", 0.0))]
    d = pd.DataFrame(rows)
    assert plots.needle_grid(d, "r", "niah").loc[0.5, 256] == 1.0
    assert plots.needle_grid(d, "r", "ruler_multikey").loc[0.5, 256] == 0.0
    assert plots.needle_grid(d, "r", "perplexity").empty


def test_allocation_map(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.choice([2, 3, 4, 8], size=(30, 120))
    bits[:, 60:68] = 16
    bits[:, :4] = 0
    tokens = [f"tok{i}" for i in range(120)]
    _check_figure(plots.allocation_map(bits, tokens, (60, 68), tmp_path / "alloc"))
    with pytest.raises(ValueError):
        plots.allocation_map(bits[0], tokens, None, tmp_path / "bad")


def test_ablation_and_latency_bars(summary, tmp_path):
    runs = ["smartkv-b0.30", "ablation:random-b0.30", "uniform-4"]
    _check_figure(plots.ablation_bars(summary, runs, tmp_path / "ablation"))
    _check_figure(plots.latency_bars(summary, tmp_path / "latency"))
    with pytest.raises(ValueError, match="fp16"):
        plots.latency_bars(summary[summary["method"] != "fp16"], tmp_path / "nofp16")


def test_write_plot_data(summary, tmp_path):
    p = plots.write_plot_data(summary[["run", "task", "kv_ratio"]], tmp_path / "plots" / "p.csv")
    back = pd.read_csv(p)
    assert list(back.columns) == ["run", "task", "kv_ratio"] and len(back) == len(summary)


# ---------------------------------------------------------------- atomic I/O


def test_atomic_json_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "metrics" / "m.json"
    io.atomic_write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(TypeError):
        io.atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_atomic_path_failure_mid_write(tmp_path):
    path = tmp_path / "r.txt"
    io.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_parquet_meta_round_trip(df, tmp_path):
    meta = io.provenance({"budget": 0.3, "seeds": [0, 1]}, repo_dir=tmp_path)
    path = io.atomic_write_parquet(df, tmp_path / "data" / "results.parquet", meta)
    back, got = io.read_parquet_with_meta(path)
    assert got == meta
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert [p.name for p in path.parent.iterdir()] == ["results.parquet"]


def test_provenance_fields(tmp_path):
    p = io.provenance({"x": 1}, repo_dir=tmp_path, revision=True)  # not a git repository
    assert p["git_revision"] == "unknown" and p["config"] == {"x": 1}
    assert set(p["versions"]) == {"python", "torch", "transformers", "smartkv", "numpy", "pandas"}
    # nothing run-varying by default: DVC hashes outputs by content
    assert set(io.provenance({"x": 1}, repo_dir=tmp_path)) == {"config", "versions"}


# ---------------------------------------------------------------- report


def test_report_contains_table_figures_and_flags(df, summary, tmp_path):
    tests = stats.paired_tests(df, "smartkv-b0.30", ["uniform-4", "kivi-2", "smartkv-b0.30"])
    abl = stats.summarize(df[df["run"].isin(["smartkv-b0.30", "ablation:random-b0.30"])])
    fig = plots.pareto(df, tmp_path / "plots" / "pareto")[0]
    setup = {"model": "SmolLM2-135M-Instruct", "model_params": "135M", "seeds": [0, 1, 2],
             "machine": "2-core CPU"}
    prov = io.provenance({"budget": 0.3}, repo_dir=tmp_path)
    md = report.render_report(summary, tests, abl, {"Accuracy vs memory": str(fig)}, setup, prov,
                              report_dir=str(tmp_path))
    assert stats.markdown_table(summary) in md
    assert "![Accuracy vs memory](plots/pareto.png)" in md
    assert "do not edit" in md and "135M" in md and "`unknown`" in md
    # Comparing a run with itself is never significant and must be listed as a limitation.
    lim = md.split("## Limitations")[1]
    assert "`smartkv-b0.30` vs `smartkv-b0.30`" in lim.split("## Provenance")[0]
    assert md.count("| `smartkv-b0.30` | `") == 3
