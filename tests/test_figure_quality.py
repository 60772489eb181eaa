"""Figure quality on synthetic frames: labels that do not overlap, intervals inside [0, 1],
visible zero bars, readable fonts, n and interval type stated, and the new figures' numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from scipy import stats as sps

from smartkv import plots
from smartkv import plots_tradeoffs as pt
from smartkv.cache.base import MEMORY_PARTS
from smartkv.plot_labels import clipped_errors, label_boxes, wilson_interval

# run -> (method, family, kv_ratio, accuracy per seed): crowded on purpose (kivi-4 under quanto-4,
# three SmartKV budgets close together), and a run at 0 and one near 1 with a wide spread.
CROWD = {
    "fp16": ("fp16", "baseline", 1.0, [1.0, 1.0, 1.0]),
    "int4": ("uniform", "baseline", 0.31, [0.9, 0.95, 0.9]),
    "kivi-4": ("kivi", "baseline", 0.318, [0.9, 0.9, 0.95]),
    "quanto-4": ("hf_quanto", "baseline", 0.315, [0.95, 0.9, 0.9]),
    "int2": ("uniform", "baseline", 0.19, [0.0, 0.0, 0.0]),
    "kivi-2": ("kivi", "baseline", 0.2, [0.0, 0.05, 0.0]),
    "snapkv-k0.15": ("kvpress_snapkv", "peer", 0.16, [0.3, 0.4, 0.35]),
    "smartkv-b0.20": ("smartkv", "smartkv", 0.2, [0.3, 1.0, 0.0]),  # std 0.5: unclipped bars leave [0, 1]
    "smartkv-b0.25": ("smartkv", "smartkv", 0.25, [1.0, 1.0, 0.0]),
    "smartkv-b0.30": ("smartkv", "smartkv", 0.3, [0.95, 0.9, 0.9]),
    "smartkv@int4": ("smartkv", "smartkv", 0.31, [0.9, 0.95, 0.95]),
}
N_PER_SEED = 20


def crowd_frame(breakdown: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for run, (method, family, ratio, accs) in CROWD.items():
        for seed, acc in enumerate(accs):
            k = round(acc * N_PER_SEED)
            scores = rng.permutation([1.0] * k + [0.0] * (N_PER_SEED - k))
            for i, score in enumerate(scores):
                fp16 = 100_000
                row = dict(run=run, method=method, family=family, task="niah", metric="contains",
                           sample_id=f"s{i}", seed=seed, depth=0.5, context_length=1024, score=score, nll=np.nan,
                           kv_bytes=int(ratio * fp16), fp16_kv_bytes=fp16, kv_ratio=int(ratio * fp16) / fp16,
                           answer_tokens=6)
                if breakdown and family != "peer":  # peers' rows carry no breakdown
                    kv = row["kv_bytes"]
                    parts = ({"fp16": kv} if method == "fp16" else
                             {"codes": int(kv * 0.7), "scales": int(kv * 0.2), "window": kv - int(kv * 0.7) - int(kv * 0.2)})
                    row.update({f"kv_{p}_bytes": parts.get(p, 0) for p in MEMORY_PARTS})
                rows.append(row)
            for i in range(2):  # two perplexity texts per seed
                nll = 2.0 + (1.0 - ratio) * 0.5 + 0.1 * rng.standard_normal()
                rows.append(dict(run=run, method=method, family=family, task="perplexity", metric="perplexity",
                                 sample_id=f"p{i}", seed=seed, depth=np.nan, context_length=1024, score=np.nan,
                                 nll=nll, kv_bytes=int(ratio * 200_000), fp16_kv_bytes=200_000,
                                 kv_ratio=ratio, answer_tokens=512))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def crowd():
    return crowd_frame()


def _texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _assert_readable(fig, min_pt=8.0):
    small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < min_pt]
    assert not small, f"text under {min_pt} pt: {small[:5]}"


def _assert_disjoint(fig, labels, axes):
    boxes = label_boxes(fig, labels)
    assert len(boxes) == len(labels) > 0
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert not (w > 0.5 and h > 0.5), (f"labels {labels[i].get_text()!r} and {labels[j].get_text()!r} "
                                               f"overlap by {w:.1f} x {h:.1f} px")
    frame = axes.get_window_extent()
    for box, lab in zip(boxes, labels):  # and every label inside the plotting area
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, lab.get_text()
        assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, lab.get_text()


def _error_bar_extents(ax) -> list[tuple[float, float]]:
    """(low, high) of every vertical error bar drawn on `ax`, in data units."""
    out = []
    for container in ax.containers:
        if hasattr(container, "has_yerr") and container.has_yerr:
            for coll in container.lines[2]:
                for seg in coll.get_segments():
                    out.append((float(seg[:, 1].min()), float(seg[:, 1].max())))
    return out


# ---------------------------------------------------------------- helpers


def test_wilson_matches_scipy_and_stays_in_unit_interval():
    for k, n in ((0, 10), (3, 10), (10, 10), (57, 210), (1, 1)):
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert (float(lo), float(hi)) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi > 0.2  # not empty at k = 0, as the Wald interval would be


def test_clipped_errors_cut_at_bounds():
    e = clipped_errors([0.9, 0.1, 0.5, 0.5], [0.3, 0.3, 0.1, np.nan], [0.3, 0.3, 0.1, np.nan])
    assert e[:, 0] == pytest.approx([0.3, 0.1])  # up to 1.0, not 1.2
    assert e[:, 1] == pytest.approx([0.1, 0.3])  # down to 0.0, not -0.2
    assert e[:, 2] == pytest.approx([0.1, 0.1]) and (e[:, 3] == 0).all()


# ---------------------------------------------------------------- Pareto plots


def test_pareto_labels_do_not_overlap_and_bars_stay_in_unit_interval(crowd):
    fig, labels = plots.pareto_figure(crowd)
    ax = fig.axes[0]
    assert {lab.get_text() for lab in labels} == set(CROWD)
    _assert_disjoint(fig, labels, ax)
    bars = _error_bar_extents(ax)
    assert bars, "no error bars drawn"
    assert min(lo for lo, _ in bars) >= 0.0 and max(hi for _, hi in bars) <= 1.0
    # the spread really was wide enough to leave [0, 1] unclipped
    per_seed = crowd[crowd["run"] == "smartkv-b0.20"].groupby("seed")["score"].mean()
    assert per_seed.mean() + per_seed.std(ddof=1) > 1.0 or per_seed.mean() - per_seed.std(ddof=1) < 0.0
    title = ax.get_title()
    assert f"n = {3 * N_PER_SEED} prompts per run" in title and "std" in title and "3 seeds" in title
    _assert_readable(fig)


def test_niah_pareto_uses_wilson_intervals(crowd):
    table = pt.niah_table(crowd)
    row = table.set_index("run").loc["smartkv-b0.20"]
    assert (row["k"], row["n"]) == (26, 60)  # 6 + 20 + 0 of 20 per seed
    ci = sps.binomtest(26, 60).proportion_ci(method="wilson")
    assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((ci.low, ci.high))
    fig, labels = pt.niah_pareto_figure(crowd)
    ax = fig.axes[0]
    _assert_disjoint(fig, labels, ax)
    bars = sorted(_error_bar_extents(ax))
    assert len(bars) == len(CROWD)
    want = sorted(zip(table["ci_lo"], table["ci_hi"]))
    assert np.allclose(bars, want)  # the drawn bars are the Wilson intervals
    assert "Wilson 95%" in ax.get_title() and f"n = {3 * N_PER_SEED} prompts" in ax.get_title()
    _assert_readable(fig)


def test_niah_pareto_rejects_graded_scores(crowd):
    graded = crowd.assign(score=crowd["score"] * 0.5)
    with pytest.raises(ValueError, match="0/1 scores"):
        pt.niah_table(graded)


def test_perplexity_memory_numbers_and_labels(crowd):
    t = pt.perplexity_table(crowd).set_index("run")
    nll = crowd[(crowd["run"] == "int2") & (crowd["metric"] == "perplexity")]["nll"].to_numpy()
    assert t.loc["int2", "n"] == 6
    assert t.loc["int2", "ppl"] == pytest.approx(math.exp(nll.mean()))
    half = sps.t.ppf(0.975, 5) * nll.std(ddof=1) / math.sqrt(6)
    assert t.loc["int2", "ppl_hi"] == pytest.approx(math.exp(nll.mean() + half))
    assert (t["ppl_lo"] < t["ppl"]).all() and (t["ppl"] < t["ppl_hi"]).all()
    fig, labels = pt.perplexity_memory_figure(crowd)
    _assert_disjoint(fig, labels, fig.axes[0])
    assert "t-interval" in fig.axes[0].get_title() and "n = 6 texts of 512 tokens" in fig.axes[0].get_title()
    _assert_readable(fig)


# ---------------------------------------------------------------- memory breakdown


def test_breakdown_parts_add_up_to_the_memory(crowd):
    t = pt.breakdown_table(crowd).set_index("run")
    parts = t[[*MEMORY_PARTS, pt.NOT_ITEMIZED]]
    assert np.allclose(parts.sum(axis=1), t["kv_ratio"])
    assert t.loc["fp16", "fp16"] == pytest.approx(1.0)
    assert t.loc["int4", "codes"] == pytest.approx(0.7 * 0.31, abs=1e-4)
    # the peer's rows have no breakdown columns: its whole memory is shown as not itemized
    assert t.loc["snapkv-k0.15", pt.NOT_ITEMIZED] == pytest.approx(0.16)
    assert t.loc["int4", pt.NOT_ITEMIZED] == 0.0
    # results written before the breakdown columns existed still plot, all not itemized
    old = pt.breakdown_table(crowd_frame(breakdown=False)).set_index("run")
    assert np.allclose(old[pt.NOT_ITEMIZED], old["kv_ratio"])


def test_breakdown_figure_bars_are_the_table(crowd):
    fig = pt.memory_breakdown_figure(crowd)
    ax = fig.axes[0]
    t = pt.breakdown_table(crowd)
    ends = {}
    for patch in ax.patches:
        y = round(patch.get_y() + patch.get_height() / 2)
        ends[y] = max(ends.get(y, 0.0), patch.get_x() + patch.get_width())
    ticks = {round(tick): label.get_text() for tick, label in zip(ax.get_yticks(), ax.get_yticklabels())}
    totals = t.set_index("run")["kv_ratio"]
    assert {ticks[y]: pytest.approx(v) for y, v in ends.items()} == totals.to_dict()
    assert "n = " in ax.get_title() and "add up" in ax.get_title()
    _assert_readable(fig)


# ---------------------------------------------------------------- bars


def _summary(crowd):
    from smartkv.stats import summarize

    return summarize(crowd)


def test_zero_height_bars_are_visible_and_fonts_readable(crowd):
    summary = _summary(crowd)
    fig = plots.ablation_bars_figure(summary, ["int2", "smartkv-b0.30", "kivi-2"])
    ax = fig.axes[0]
    stubs = [ln for ln in ax.lines if ln.get_linewidth() >= 3 and np.allclose(ln.get_ydata(), 0)]
    assert len(stubs) == 1  # int2 scores 0 everywhere: one stub, in its colour
    labels = [t.get_text() for t in ax.texts]
    assert "0.00" in labels
    bars = _error_bar_extents(ax)
    assert bars and min(lo for lo, _ in bars) >= 0.0 and max(hi for _, hi in bars) <= 1.0
    assert "n = 60 prompts per run" in ax.get_title() and "std over 3 seeds" in ax.get_title()
    _assert_readable(fig)


def test_latency_bars_state_n_and_read(crowd):
    summary = _summary(crowd.assign(tokens_per_s=10.0))
    fig = plots.latency_bars_figure(summary)
    assert "n = " in fig.axes[0].get_title()
    _assert_readable(fig)


def test_allocation_map_labels_at_8pt(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.choice([2, 4, 8], size=(6, 208))
    paths = plots.allocation_map(bits, [f"t{i}" for i in range(208)], (100, 104), tmp_path / "alloc", max_labels=216)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_regret_figure_marks_zero_and_states_n():
    from stages.figures import regret_figure

    abl = pd.DataFrame({"run": ["oracle", "smartkv", "random"], "score_mean": [0.8, 0.8, 0.5],
                        "n_prompts": [60, 60, 60]})
    fig = regret_figure(abl, "oracle")
    ax = fig.axes[0]
    assert any(ln.get_linewidth() >= 3 and np.allclose(ln.get_ydata(), 0) for ln in ax.lines)
    assert "n = 60 prompts per run" in ax.get_title()
    _assert_readable(fig)


def test_pdf_bytes_are_deterministic(crowd, tmp_path):
    a = pt.niah_pareto(crowd, tmp_path / "a")[1].read_bytes()
    b = pt.niah_pareto(crowd, tmp_path / "b")[1].read_bytes()
    assert a == b
