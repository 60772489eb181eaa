"""The talk as one PDF (16:9): 12 slides, and one per comparison on the independent prompts, from
the same findings as REPORT.md.

One matplotlib `Figure` per slide, written with `PdfPages` without a creation date, so the
PDF's bytes depend on the results only (as `smartkv.plots` does for figures). Figure slides
reuse the PNGs in plots/; a missing PNG leaves a line naming the stage that makes it.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Mapping

import matplotlib.image as mpimg
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from smartkv.io import atomic_path
from smartkv.report import findings as f
from smartkv.report import sections as sec
from smartkv.report.limitations import limitations

SIZE = (13.333, 7.5)  # inches, 16:9
ACCENT = "#D55E00"
WRAP = 100  # characters per line at the body font size
MAX_BULLETS = 7


def plain(text: str) -> str:
    """Markdown emphasis and code marks off: a slide shows text, not markup."""
    return re.sub(r"\*\*|`|_", "", text).removeprefix("- ").strip()


def _frame(title: str, n: int = 0) -> Figure:
    """A titled slide; its page number is written once the deck is complete (`_number`)."""
    fig = Figure(figsize=SIZE)
    fig.text(0.04, 0.92, title, fontsize=28, weight="bold", va="center")
    fig.add_artist(Line2D([0.04, 0.96], [0.87, 0.87], color=ACCENT, lw=2))
    return fig


def _number(slides: list[Figure]) -> None:
    for i, fig in enumerate(slides, 1):
        fig.text(0.96, 0.03, f"{i} / {len(slides)}", fontsize=11, ha="right", color="#666666")


def _figure_image(fig: Figure, drawn: Figure, rect=(0.12, 0.16, 0.76, 0.68)) -> None:
    """`drawn` (a matplotlib figure) rendered and placed on the slide at `rect`."""
    import io

    buf = io.BytesIO()
    drawn.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    buf.seek(0)
    ax = fig.add_axes(rect)
    ax.imshow(mpimg.imread(buf, format="png"))
    ax.set_axis_off()


def passages_slides(m: Mapping) -> list[Figure]:
    """One slide per pooled comparison of the independent-prompts section (issue 33: a figure per
    primary comparison, readable at slide size), its sentence as the caption."""
    from smartkv.plots_sections import comparison_figure, pairs

    p = m.get("passages")
    if not p:
        return []
    lines = [x.removeprefix("  - ") for x in sec.passages_lines(p, m.get("passages_calibration"))[1:]]
    out = []
    for c, line in zip(pairs(p), lines):
        fig = _frame(f"Independent prompts: {c['target']} vs {c['baseline']}")
        _figure_image(fig, comparison_figure(p, c))
        _caption(fig, line)
        out.append(fig)
    return out


def _bullets(fig: Figure, items: list[str], top: float = 0.82, size: int = 17, left: float = 0.05) -> None:
    y = top
    for item in items[:MAX_BULLETS]:
        lines = textwrap.wrap(plain(item), WRAP if size <= 17 else 80) or [""]
        fig.text(left, y, "• " + "\n   ".join(lines), fontsize=size, va="top", linespacing=1.3)
        y -= 0.045 * len(lines) * size / 17 + 0.03
        if y < 0.08:
            break


def _image(fig: Figure, path: Path, stage: str, rect=(0.05, 0.16, 0.9, 0.68)) -> None:
    if not path.is_file():
        fig.text(0.5, 0.5, f"{path} is missing: run `dvc repro {stage}`", ha="center", fontsize=16, color="#999999")
        return
    ax = fig.add_axes(rect)
    ax.imshow(mpimg.imread(path))
    ax.set_axis_off()


CAPTION_WRAP = 125  # characters per line at the caption's 13 pt: 150 ran past the slide's right edge


def _caption(fig: Figure, text: str) -> None:
    fig.text(0.05, 0.1, "\n".join(textwrap.wrap(plain(text), CAPTION_WRAP)), fontsize=13, va="top", color="#333333")


def slide_texts(summary: pd.DataFrame, tests: pd.DataFrame | None, ablation_tests: pd.DataFrame | None,
                metrics: Mapping, setup: Mapping) -> dict[str, list[str]]:
    """The text of each slide, chosen by the results (tested apart from the drawing)."""
    m = dict(metrics)
    t = f.matched_score_tests(tests)
    counts = f.comparison_counts(tests)
    att = (m.get("attention") or {}).get("phases", {}).get("decode", {}).get("overall", {})
    h = f.hypothesis(m.get("sensitivity"))
    e = f.error_totals(m.get("errors"))
    main = [x for x in sec.summary_of_findings(tests, m) if x.strip()]
    insight = []
    if att.get("top10_share") is not None:
        insight.append(f"At decode, the top 10% of cached tokens receive {att['top10_share']:.0%} of the attention.")
    insight.append("So spend bits where attention goes: few tokens at 4–8 bits, most at 2, the unread at 0 (evicted).")
    insight.append(sec.hypothesis_sentence(h) if h else "The sensitivity test has not been run (metrics/sensitivity.json).")
    abl = []
    if ablation_tests is not None and len(ablation_tests):
        a = ablation_tests[(ablation_tests["task"] == "all") & (ablation_tests["measure"] == "score")]
        for r in a.to_dict("records"):
            abl.append(f"smartkv vs {r['baseline']}: Δ = {r['mean_diff']:+.3f} (n = {int(r['n_pairs'])}), "
                       + (r["verdict"] + " after Holm" if r["significant"] else "inconclusive"))
    losses = limitations(summary, t if len(t) else None, setup, ablation_tests, m.get("second_model"),
                         m.get("extra_cells"), m.get("cells"), passages=m.get("passages"))
    return {
        "title": [f"Model: {setup.get('model')} · seeds {setup.get('seeds')} · {setup.get('samples per method')} "
                  "prompts per method", "Every number on these slides comes from the pipeline's metrics files."],
        "problem": ["The KV cache grows with context: at long contexts it, not the weights, fills memory.",
                    "Uniform quantization (KIVI, transformers' QuantizedCache) gives every token the same width; "
                    "eviction (H2O, SnapKV) drops tokens outright.",
                    "Question: at the same measured bytes, does giving each token its own width keep more accuracy?"],
        "insight": insight,
        "method": ["Importance: EMA of the attention each token receives (+ a uniform prior); tracker bytes count.",
                   "Error: measured from each token's value range, per width 0/2/3/4/8 (0 = evict).",
                   "Allocation: greedy by value per byte (importance × error reduction / bytes) under the budget.",
                   "FP16 sinks and recent window; per-channel key smoothing; re-allocation only demotes."],
        # the primary comparisons, as the report's summary leads with them (sanity checks are not wins)
        "pareto": [sec._primary_sentence(r, why) for r, why in (sec.primary_comparisons(t) if len(t) else [])][:3],
        "needle": [f"{len(counts[f.WIN])} significant win(s), {len(counts[f.LOSS])} significant loss(es), "
                   f"{len(counts[f.INCONCLUSIVE])} inconclusive at matched memory."],
        "allocation": ["Bits per token and layer on one short needle prompt; the needle is outlined."],
        "ablations": abl or ["No ablation tests were run."],
        "errors": ([f"Over {e['n']} paired prompts: SmartKV alone fails {e['smartkv_fails']}, its matched baseline "
                    f"alone fails {e['baseline_fails']}."] if e else ["metrics/errors.json is missing (`dvc repro errors`)."]),
        "limitations": losses,
        "conclusion": [x for x in sec.conclusion(tests, m) if x.strip()],
    }


def render_slides(summary: pd.DataFrame, tests: pd.DataFrame | None, ablation_tests: pd.DataFrame | None,
                  metrics: Mapping, setup: Mapping, plots_dir: str | Path, out: str | Path) -> Path:
    plots_dir, out = Path(plots_dir), Path(out)
    txt = slide_texts(summary, tests, ablation_tests, metrics, setup)
    slides: list[Figure] = []

    fig = Figure(figsize=SIZE)
    fig.text(0.5, 0.6, "SmartKV", fontsize=54, weight="bold", ha="center")
    fig.text(0.5, 0.48, "Attention-guided mixed-precision KV-cache quantization", fontsize=26, ha="center")
    fig.text(0.5, 0.3, "\n".join(plain(x) for x in txt["title"]), fontsize=15, ha="center", color="#444444")
    slides.append(fig)
    for n, (title, key) in enumerate((("The problem", "problem"), ("Key insight", "insight"),
                                      ("Method", "method")), 2):
        fig = _frame(title, n)
        _bullets(fig, txt[key])
        slides.append(fig)
    slides += passages_slides(metrics)  # the primary comparisons on independent prompts lead the results
    for n, (title, stem, stage, key) in enumerate((
            ("Main grid: accuracy vs measured memory", "pareto", "figures", "pareto"),
            ("Needle in a haystack", "needle_heatmaps", "figures", "needle"),
            ("Where the bits go", "allocation_map", "figures", "allocation"),
            ("Ablations", "ablations", "figures", "ablations"),
            ("Error analysis", "errors", "errors", "errors")), 5):
        fig = _frame(title, n)
        _image(fig, plots_dir / f"{stem}.png", stage)
        _caption(fig, " ".join(txt[key][:2]))
        slides.append(fig)
    for n, (title, key, size) in enumerate((("Limitations", "limitations", 14), ("Conclusion", "conclusion", 18)), 10):
        fig = _frame(title, n)
        _bullets(fig, txt[key], size=size)
        slides.append(fig)
    fig = Figure(figsize=SIZE)
    fig.text(0.5, 0.55, "Questions?", fontsize=54, weight="bold", ha="center")
    fig.text(0.5, 0.4, "REPORT.md · dvc repro · python -m smartkv demo", fontsize=18, ha="center", color="#444444")
    slides.append(fig)
    _number(slides)

    with atomic_path(out) as tmp, PdfPages(tmp, metadata={"CreationDate": None}) as pdf:
        for s in slides:
            pdf.savefig(s)
    return out
