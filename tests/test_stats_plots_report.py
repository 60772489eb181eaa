"""Fast tests for statistics, figures, atomic I/O and the report, on synthetic results."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

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


def _pair_frame(target, baseline, measure="score", clusters=None):
    rows = []
    for run, values in (("a", target), ("b", baseline)):
        for i, v in enumerate(values):
            row = dict(run=run, task="t", sample_id=f"s{i}", seed=0, kv_ratio=0.3 if run == "a" else 0.25)
            row[measure] = float(v)
            if clusters is not None:
                row["cluster"] = clusters[i]
            rows.append(row)
    return pd.DataFrame(rows)


def test_mcnemar_exact_hand_values():
    # 9 discordant pairs for the target, 1 against: p = 2 P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024.
    assert stats.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(0, 0) == 1.0
    # 6 vs 0: 2 / 2**6
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_one_discordant_pair_is_p_1_not_the_wilcoxon_0317():
    # 20 prompts both runs get right or wrong alike, one only the target gets right.
    target, base = [1] * 11 + [0] * 10, [1] * 10 + [0] * 11
    r = stats.paired_tests(_pair_frame(target, base), "a", ["b"]).iloc[0]
    assert r["test"] == "mcnemar_exact"
    assert (r["n_pairs"], r["n_target_only"], r["n_baseline_only"]) == (21, 1, 0)
    assert r["p"] == 1.0  # exact: one pair is as likely to favour either run
    # What the old pipeline reported for the same pairs: a normal-approximation sign test.
    d = np.subtract(target, base).astype(float)
    assert sps.wilcoxon(d).pvalue == pytest.approx(0.3173, abs=1e-4)
    assert math.isnan(r["p_t"]) and math.isnan(r["p_wilcoxon"])  # no t/Wilcoxon on 0/1 outcomes


def test_paired_continuous_hand_values():
    # d = 1..5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5)/sqrt(5)) = 3 sqrt(2), df = 4.
    c = stats.paired_continuous([1, 2, 3, 4, 5])
    t = 3 * math.sqrt(2)
    # Student's t CDF for 4 df in closed form, with u = t / sqrt(1 + t^2/4):
    # F(t) = 1/2 + (3/8) u (1 - t^2 / (12 (1 + t^2/4))).
    u = t / math.sqrt(1 + t * t / 4)
    cdf = 0.5 + 3 / 8 * u * (1 - t * t / (12 * (1 + t * t / 4)))
    assert c["p_t"] == pytest.approx(2 * (1 - cdf), rel=1e-9)
    assert c["p_t"] == pytest.approx(0.01324, abs=1e-5)
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} from tables
    assert (c["t_ci_lo"], c["t_ci_hi"]) == pytest.approx((3 - half, 3 + half), abs=1e-5)
    # Exact Wilcoxon, n = 5, all positive: W- = 0 has probability 1/32 per tail.
    assert c["wilcoxon_method"] == "exact" and c["p_wilcoxon"] == pytest.approx(2 / 32)
    # Ties among |d| rule out the exact null distribution.
    assert stats.paired_continuous([1, 1, 2, 3, 4, 5])["wilcoxon_method"] == "approx"
    zero = stats.paired_continuous([0.0, 0.0, 0.0])
    assert zero["p_t"] == 1.0 and "zero" in zero["note"]
    assert math.isnan(stats.paired_continuous([0.5, 0.5, 0.5])["p_t"])


def test_paired_tests_continuous_measure_detects_real_difference():
    rng = np.random.default_rng(1)
    base = 2.0 + rng.random(60)
    target = base - 0.2 + 0.05 * rng.standard_normal(60)
    # Shuffle the rows: alignment must come from the key, not from row order.
    frame = _pair_frame(target, base, measure="nll").sample(frac=1.0, random_state=3)
    r = stats.paired_tests(frame, "a", ["b"], measure="nll").iloc[0]
    assert r["test"] == "paired_t" and r["n_pairs"] == 60 and r["n_unpaired"] == 0
    assert r["p"] == r["p_t"] < 1e-6 and r["p_wilcoxon"] < 1e-6
    assert r["mean_diff"] == pytest.approx(float(np.mean(target - base)))
    assert r["ci_lo"] < -0.2 + 0.02 and r["ci_hi"] > -0.2 - 0.02 and r["ci_hi"] < 0
    assert not r["higher_is_better"]
    assert (r["target_kv_ratio"], r["baseline_kv_ratio"]) == pytest.approx((0.3, 0.25))
    assert math.isnan(r["noninferior"])  # no margin is set for NLL


def test_paired_tests_counts_unpaired_and_per_task(df):
    partial = df[~((df["run"] == "kivi-2") & (df["sample_id"] == "s0"))]
    t = stats.paired_tests(partial, "smartkv-b0.30", ["kivi-2", "uniform-4"], per_task=True)
    pooled = t[(t["baseline"] == "kivi-2") & (t["task"] == "all")].iloc[0]
    n_seeds, n_tasks = 3, 2  # perplexity rows have no score and are not paired
    assert pooled["n_unpaired"] == n_seeds * n_tasks
    assert set(t["task"]) == {"all", "needle", "kv_retrieval"}
    assert (t["test"] == "mcnemar_exact").all()


def test_paired_tests_unknown_run_raises(df):
    with pytest.raises(ValueError, match="no-such-run"):
        stats.paired_tests(df, "no-such-run", ["fp16"])


def test_holm_textbook_values():
    # m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06).
    got = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(got[4])


def test_apply_holm_within_families_and_only_adjusted_is_significant():
    tests = pd.DataFrame({
        "family": ["A", "A", "A", "B"], "p": [0.02, 0.03, 0.04, 0.04],
        "mean_diff": [0.1, -0.1, 0.1, -0.2], "higher_is_better": [True, True, True, False]})
    out = stats.apply_holm(tests)
    # Family A: 3*0.02=0.06, 2*0.03=0.06, 0.04 -> 0.06: none survive although all raw p < 0.05.
    assert out["p_holm"].tolist()[:3] == pytest.approx([0.06, 0.06, 0.06])
    assert not out["significant"][:3].any() and set(out["verdict"][:3]) == {"inconclusive"}
    # Family B alone: 0.04 stays, and a negative difference on a lower-is-better measure is a gain.
    assert out["p_holm"][3] == pytest.approx(0.04) and out["verdict"][3] == "target better"
    table = stats.comparison_table(out.assign(target="a", baseline="b", task="all", n_pairs=10,
                                              ci_lo=-0.1, ci_hi=0.1))
    assert table.count("**") == 4  # only family B's adjusted p and verdict are bold
    assert "no difference" not in table


def test_cluster_bootstrap_matches_plain_bootstrap_without_clusters():
    x = np.random.default_rng(0).standard_normal(100)
    lo, hi, k = stats.cluster_bootstrap_ci(x, None, seed=5)
    assert k == 100 and (lo, hi) == pytest.approx(stats.bootstrap_ci(x, seed=5))
    labels = list(range(100))  # every value its own labelled cluster: the same resampling
    assert stats.cluster_bootstrap_ci(x, labels, seed=5)[:2] == pytest.approx((lo, hi))


def test_cluster_bootstrap_width_follows_clusters_not_rows():
    # 10 clusters of 20 identical rows: the information is that of 10 values. The 95% CI of a
    # mean of k values with sd s is about 2 * 1.96 * s / sqrt(k) wide; rows would claim sqrt(200).
    rng = np.random.default_rng(2)
    means = rng.standard_normal(10)
    x, labels = np.repeat(means, 20), np.repeat([f"hay{i}" for i in range(10)], 20)
    lo, hi, k = stats.cluster_bootstrap_ci(x, labels, seed=0, n_resamples=4000)
    expected = 2 * 1.96 * means.std(ddof=0) / math.sqrt(10)
    assert k == 10 and 0.8 * expected < hi - lo < 1.15 * expected
    naive_lo, naive_hi = stats.bootstrap_ci(x, seed=0)
    assert hi - lo > 3 * (naive_hi - naive_lo)
    assert (lo, hi, k) == stats.cluster_bootstrap_ci(x, labels, seed=0, n_resamples=4000)  # seeded
    # Unlabelled rows (NaN) are clusters of their own, not one shared "missing" cluster.
    assert stats.cluster_bootstrap_ci([1.0, 2.0, 3.0], [np.nan, np.nan, "c"], seed=0)[2] == 3


def test_paired_tests_use_the_cluster_column():
    rng = np.random.default_rng(4)
    target = (rng.random(40) < 0.6).astype(float)
    base = (rng.random(40) < 0.5).astype(float)
    clusters = [f"h{i // 8}" for i in range(40)]  # 5 haystacks of 8 prompts
    r = stats.paired_tests(_pair_frame(target, base, clusters=clusters), "a", ["b"]).iloc[0]
    assert r["n_clusters"] == 5
    assert stats.paired_tests(_pair_frame(target, base), "a", ["b"]).iloc[0]["n_clusters"] == 40


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


def test_noninferiority_hand_cases():
    assert stats.noninferiority(-0.04, 0.10, 0.05) == {"noninferior": 1.0, "equivalent": 0.0}
    assert stats.noninferiority(-0.04, 0.03, 0.05) == {"noninferior": 1.0, "equivalent": 1.0}
    assert stats.noninferiority(-0.06, 0.03, 0.05) == {"noninferior": 0.0, "equivalent": 0.0}
    # Lower is better (NLL): worse means a positive difference.
    assert stats.noninferiority(-0.5, 0.04, 0.05, higher_is_better=False)["noninferior"] == 1.0
    assert stats.noninferiority(-0.5, 0.06, 0.05, higher_is_better=False)["noninferior"] == 0.0
    assert math.isnan(stats.noninferiority(-0.04, 0.1, None)["noninferior"])


def test_score_rows_carry_the_noninferiority_verdict():
    # 200 pairs, identical outcomes: CI of the difference is [0, 0], well inside 5 points.
    same = [1, 0] * 100
    r = stats.paired_tests(_pair_frame(same, same), "a", ["b"]).iloc[0]
    assert (r["margin"], r["noninferior"], r["equivalent"], r["p"]) == (0.05, 1.0, 1.0, 1.0)


def test_mcnemar_power_hand_value():
    # Every pair discordant (psi = 1), n = 10: the test rejects at k <= 1 or k >= 9 (2 P(K<=1)
    # = 22/1024 <= 0.05 < 2 P(K<=2) = 112/1024); a discordant pair favours the target with
    # probability pi = (1 + 0.1) / 2 = 0.55.
    pi, q = 0.55, 0.45
    hand = q**10 + 10 * pi * q**9 + 10 * pi**9 * q + pi**10
    assert stats.mcnemar_power(10, 1.0, 0.10) == pytest.approx(hand, rel=1e-12)


def test_critical_counts_agree_with_binomtest():
    c = stats.critical_counts(40)
    for m in range(41):
        rejecting = [k for k in range(m + 1) if k < m / 2 and sps.binomtest(k, m, 0.5).pvalue <= 0.05]
        assert c[m] == (max(rejecting) if rejecting else -1), m


def test_mcnemar_power_matches_seeded_simulation():
    n, psi, delta, sims = 150, 0.3, 0.10, 4000
    rng = np.random.default_rng(0)
    m = rng.binomial(n, psi, sims)
    k = rng.binomial(m, (psi + delta) / (2 * psi))
    p = {c: stats.mcnemar_exact(*c) for c in set(zip(k.tolist(), (m - k).tolist()))}  # binomtest per distinct count
    sim = np.mean([p[c] <= 0.05 for c in zip(k.tolist(), (m - k).tolist())])
    exact = stats.mcnemar_power(n, psi, delta)
    assert abs(sim - exact) < 3 * math.sqrt(exact * (1 - exact) / sims)


def test_n_for_power_is_smallest_and_near_connor():
    n = stats.n_for_power(0.3, 0.10, power=0.8)
    assert stats.mcnemar_power(n, 0.3) >= 0.8 > stats.mcnemar_power(n - 1, 0.3)
    assert abs(n - stats.normal_n(0.3)) < 0.15 * n  # Connor (1987): 233 at psi = 0.3
    assert stats.mcnemar_power(21, 0.3) < 0.1  # the committed study's 21 pairs
    with pytest.raises(ValueError, match="discordance"):
        stats.mcnemar_power(100, 0.05, 0.10)


def test_power_report_from_tests():
    tests = pd.DataFrame({"target": ["s", "s"], "baseline": ["a", "b"], "task": ["all", "all"],
                          "test": ["mcnemar_exact"] * 2, "n_pairs": [100, 100],
                          "n_target_only": [20, 2], "n_baseline_only": [10, 1]})
    rep = stats.power_report(tests)
    a, b = rep["comparisons"]["s_vs_a"], rep["comparisons"]["s_vs_b"]
    assert a["discordance_observed"] == 0.3 and a["power"] == pytest.approx(stats.mcnemar_power(100, 0.3))
    assert b["discordance_assumed"] == 0.10  # 3% discordance cannot hold a 10-point difference
    assert rep["design"]["n_pairs"] == 100
    assert rep["n_for_target_power_by_discordance"]["0.30"] == stats.n_for_power(0.3)
    json.dumps(rep, allow_nan=False)


def test_match_baselines_exact_label_then_fallback():
    memory = pd.Series({"int3": 0.25, "kivi-2": 0.236, "int2": 0.188, "smartkv@int3": 0.262,
                        "smartkv-b0.22": 0.220, "smartkv-b0.30": 0.299, "fp16": 1.0})
    family = pd.Series({"int3": "baseline", "kivi-2": "baseline", "int2": "baseline", "fp16": "baseline",
                        "smartkv@int3": "smartkv", "smartkv-b0.22": "smartkv", "smartkv-b0.30": "smartkv"})
    m = stats.match_baselines(memory, family, tolerance=0.0).set_index("baseline")
    # The exact label wins even though it measured a little more than int3.
    assert (m.loc["int3", "target"], m.loc["int3", "match"]) == ("smartkv@int3", "exact_label")
    assert m.loc["kivi-2", "target"] == "smartkv-b0.22" and m.loc["kivi-2", "match"] == "at_or_below"
    assert m.loc["int2", "match"] == "nearest_above" and "more" in m.loc["int2", "match_reason"]
    assert m.loc["fp16", "target"] == "smartkv-b0.30"  # most memory at or below FP16's
    assert m.loc["kivi-2", "memory_gap"] == pytest.approx(0.220 - 0.236)
    assert "smartkv@int3" not in m.index


def test_weighting_mean_of_task_means_vs_pooled():
    # Task A has 6 prompts all right, task B 1 prompt wrong: the mean over tasks is 0.5, the
    # pooled (per prompt) mean 6/7. Memory excludes the perplexity row's 0.9.
    base = dict(run="r", method="m", family="smartkv", budget=0.3, bits=np.nan, seed=0, tokens_per_s=1.0)
    rows = [{**base, "task": "A", "sample_id": f"a{i}", "score": 1.0, "kv_ratio": 0.2} for i in range(6)]
    rows += [{**base, "task": "B", "sample_id": "b0", "score": 0.0, "kv_ratio": 0.3}]
    rows += [{**base, "task": "perplexity", "sample_id": "p0", "score": np.nan, "nll": 2.0, "kv_ratio": 0.9}]
    frame = pd.DataFrame(rows)
    ov = stats.overall(frame).set_index("run").loc["r"]
    assert ov["score_mean"] == pytest.approx(0.5) and ov["score_pooled"] == pytest.approx(6 / 7)
    assert ov["kv_ratio"] == pytest.approx((6 * 0.2 + 0.3) / 7)
    s = stats.summarize(frame)
    from_summary = stats.overall(s).set_index("run").loc["r"]
    assert from_summary["kv_ratio"] == pytest.approx(ov["kv_ratio"])  # one memory number either way
    assert from_summary["score_pooled"] == pytest.approx(6 / 7)
    assert stats.run_memory(s)["r"] == pytest.approx(ov["kv_ratio"])
    assert f"| {ov['kv_ratio']:.3f} |" in stats.markdown_table(s)


def test_metrics_json_numbers_only(summary, df):
    tests = stats.apply_holm(stats.paired_tests(df, "smartkv-b0.30", ["uniform-4"], family="f"))
    nll = stats.apply_holm(stats.paired_tests(df, "smartkv-b0.30", ["uniform-4"], measure="nll", family="g"))
    m = stats.metrics_json(summary, pd.concat([tests, nll], ignore_index=True))
    text = json.dumps(m, allow_nan=False)  # raises if any NaN leaked through

    def leaves(d):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    assert all(isinstance(v, (int, float)) for v in leaves(json.loads(text)))
    assert m["runs"]["fp16"]["needle"]["kv_ratio"] == 1.0
    assert "ppl" in m["runs"]["fp16"]["perplexity"]
    leaf = m["tests"]["smartkv-b0.30_vs_uniform-4"]["all"]
    assert leaf["significant"] in (0, 1) and {"p", "p_holm", "n_target_only", "target_kv_ratio"} <= set(leaf)
    assert "p_t" in m["tests"]["smartkv-b0.30_vs_uniform-4:nll"]["all"]


def test_markdown_table(summary):
    t = stats.markdown_table(summary)
    lines = t.strip().splitlines()
    assert len(lines) == 2 + len(RUNS)
    assert "needle" in lines[0] and "KV memory" in lines[0] and "perplexity (ppl ↓)" in lines[0]
    assert "mean of per-task means" in lines[0]
    fp = summary[(summary["run"] == "fp16") & (summary["task"] == "needle")].iloc[0]
    assert f"{fp['score_mean']:.3f} ± {fp['score_std']:.3f}" in t
    fp_row = next(line for line in lines if line.startswith("| `fp16` |"))
    task_mean = summary[(summary["run"] == "fp16") & (summary["task"] != "perplexity")]["score_mean"].mean()
    assert f"| {task_mean:.3f} |" in fp_row


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
    tests = stats.apply_holm(stats.paired_tests(df, "smartkv-b0.30", ["uniform-4", "kivi-2", "smartkv-b0.30"],
                                                family="baselines"))
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
    # without metrics/sweeps.json the sweeps section says what is missing instead of failing
    assert "## Sweeps (dev seeds)\n_metrics/sweeps.json is missing" in md


def test_report_budget_limitation_uses_the_one_memory_number():
    # Perplexity rows hold a longer context (0.40 here) but the run's memory is its accuracy
    # prompts' 0.28, under its 0.30 budget: no "above its budget" line.
    base = dict(run="s", method="smartkv", family="smartkv", budget=0.30, bits=np.nan, seed=0, tokens_per_s=1.0)
    rows = [{**base, "task": "niah", "sample_id": f"a{i}", "score": 1.0, "kv_ratio": 0.28} for i in range(4)]
    rows += [{**base, "task": "perplexity", "sample_id": "p", "score": np.nan, "nll": 2.0, "kv_ratio": 0.40}]
    s = stats.summarize(pd.DataFrame(rows))
    assert not any("above its budget" in x for x in report.limitations(s, None, {}))
    over = s.assign(kv_ratio=s["kv_ratio"] + 0.05)
    assert any("`s` measured 0.330" in x for x in report.limitations(over, None, {}))


def test_length_strata_split_only_tasks_with_several_lengths():
    from smartkv.stats import length_strata

    df = pd.DataFrame({"task": ["niah", "niah", "niah", "perplexity"], "context_length": [1024, 2048, 1500, 1024],
                       "score": [1.0, 0.0, 1.0, float("nan")]})
    out = length_strata(df)
    assert out["task"].tolist() == ["niah@1k", "niah@2k", "niah@1500", "perplexity"]
    assert df["task"].tolist() == ["niah", "niah", "niah", "perplexity"]  # the input is left alone
    same = length_strata(df.iloc[[0, 3]])
    assert same["task"].tolist() == ["niah", "perplexity"]


def test_limitations_name_the_second_model_where_it_ran():
    s = stats.summarize(pd.DataFrame([{"run": "s", "method": "smartkv", "family": "smartkv", "budget": 0.3,
                                       "bits": np.nan, "seed": 0, "tokens_per_s": 1.0, "task": "niah",
                                       "sample_id": "a", "score": 1.0, "kv_ratio": 0.28}]))
    alone = report.limitations(s, None, {"model": "default"})
    assert any(x.startswith("One small model (default)") for x in alone)
    # the protocol gap is said cell by cell from metrics/provenance.json (tests/test_clusters.py); none given here
    assert not any("last query" in x for x in alone)
    both = report.limitations(s, None, {"model": "default"}, None,
                              {"model": "gemma3-270m", "accuracy": {"fp16": {}, "smartkv@int3": {}}})
    line = next(x for x in both if "small models" in x)
    assert line.startswith("Two small models: default") and "gemma3-270m" in line and "`smartkv@int3`" in line
    assert not any(x.startswith("One small model") for x in both)
