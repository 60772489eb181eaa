"""The limitations section, computed, not written by hand, so it cannot drift from the results.

It lists first the significant losses (SmartKV worse than its matched baseline, or an
ablated variant better than the headline, after Holm), apart from the comparisons that are
inconclusive after Holm; then samples and seeds that are few, budgets the measured memory
exceeded, and tasks the FP16 model itself fails, in the main study and in the matched-comparison
stages (`second_model`, `extra_cells`).
"""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from smartkv.report.cells_section import carried_by_one_cell
from smartkv.stats import PERPLEXITY_TASK, comparison_table, run_memory

SMALL_N = 30  # below this, a paired test has little power for a few-point difference
FEW_SEEDS = 3


def significance_table(tests: pd.DataFrame) -> str:
    return comparison_table(tests)


def _pair(r) -> str:
    return f"`{r.target}` vs `{r.baseline}` ({r.measure}, {r.task}: Δ = {r.mean_diff:+.3f}, Holm p = {r.p_holm:.3g})"


def significant_losses(tests: pd.DataFrame | None, ablation_tests: pd.DataFrame | None = None) -> list[str]:
    """One line per kind of loss that survives Holm: SmartKV worse than the baseline it is
    matched with; the headline worse than an ablated variant (the component costs accuracy)."""
    out = []
    for frame, what in ((tests, "SmartKV is significantly worse than its matched baseline"),
                        (ablation_tests, "the headline run is significantly worse than an ablated variant, "
                                         "so the removed component costs rather than helps")):
        if frame is None or frame.empty or "verdict" not in frame:
            continue
        lost = frame[frame["significant"].astype(bool) & (frame["verdict"] == "target worse")]
        if len(lost):
            out.append(f"**Significant loss** — {what}: " + "; ".join(_pair(r) for r in lost.itertuples()) + ".")
    return out


def matched_study_limits(m: Mapping | None, stage: str, fp16_floor: float = 0.9) -> list[str]:
    """A matched-comparison stage's significant losses after Holm and the cells its FP16 fails
    (below the calibration floor), from metrics/<stage>.json."""
    if not m:
        return []
    out = []
    # the verdict already says whether the Holm-adjusted test rejected at the stats stage's alpha
    lost = [r for r in m.get("comparisons") or [] if r.get("verdict") == "target worse"]
    if lost:
        out.append(f"**Significant loss** in `{stage}` ({m.get('model')}): " + "; ".join(
            f"`{r['target']}` vs `{r['baseline']}` ({r['measure']}, {r['task']}: Δ = {r['mean_diff']:+.3f}, "
            f"Holm p = {r['p_holm']:.3g})" for r in lost) + ".")
    weak = {cell: v for cell, v in ((m.get("accuracy") or {}).get("fp16") or {}).items() if v["accuracy"] < fp16_floor}
    if weak:
        out.append(f"In `{stage}` FP16 itself scores below {fp16_floor} on " + ", ".join(
            f"{cell} ({v['correct']}/{v['n']})" for cell, v in weak.items())
            + ": differences there measure the model's limits as much as the cache's.")
    return out


def passages_limits(m: Mapping | None) -> list[str]:
    """What the independent prompts do not show yet: a comparison with the presses chosen on dev."""
    if not m:
        return ["The independent prompts (`passages`) have not run: every comparison here rests on the main "
                "grid's classic needles, whose prompts share a few haystack texts."]
    presses = m.get("presses")
    if presses is None:
        return ["On the independent prompts no eviction peer has run yet: SmartKV at the peers' kept ratios "
                "(`smartkv-b0.15`, `smartkv-b0.10`) is there without a press to compare with. The presses chosen on "
                "the dev passages (`peers_tuning`, `passages_peers`) are the next cells; the main grid's peer "
                "comparison picks its best press on test."]
    out = []
    if presses.get("press_cells_missing"):
        out.append("The presses chosen on dev have not run on every passages cell yet ("
                   + ", ".join(f"`{c}`" for c in presses["press_cells_missing"])
                   + "): their comparisons cover the cells they ran on.")
    out.append("Each kept ratio is compared with the one press chosen there on the dev passages "
               "(metrics/peers_choice.json, every candidate's dev accuracy); every other press runs on test in its "
               "dev-best setting and is reported in the accuracy table, not compared, and its other settings ran on "
               "dev only.")
    return out


def missing_query_limits(provenance: Mapping | None) -> list[str]:
    """The study's protocol gap (docs/internals.md, "The missing query"), cell by cell: SmartKV rows made before
    the forks ranked from the prompt's last query (metrics/provenance.json), until every cell is re-run."""
    if not provenance:
        return []
    old: dict[str, list[str]] = {}
    new: dict[str, list[str]] = {}
    for part, entries in provenance.get("parts", {}).items():
        for e in entries:
            if "last_query" in e:
                (new if e["last_query"] else old).setdefault(part, []).extend(e["cells"])
    if not old:
        return []
    said = "; ".join(f"`{p}` {', '.join(sorted(c))}" for p, c in old.items())
    done = "; ".join(f"`{p}` {', '.join(sorted(c))}" for p, c in new.items()) or "none yet"
    return [f"Some SmartKV rows rank without the prompt's last query (made before it reached the study's forks; "
            f"docs/internals.md, \"The missing query\"): {said}. They understate the method, most at 4k tokens, and tables "
            f"that pool them with re-run cells mix the two protocols. Re-run with it: {done}."]


def limitations(summary: pd.DataFrame, tests: pd.DataFrame, setup: Mapping,
                ablation_tests: pd.DataFrame | None = None, second_model: Mapping | None = None,
                extra_cells: Mapping | None = None, cells: Mapping | None = None,
                provenance: Mapping | None = None, passages: Mapping | None = None) -> list[str]:
    out = significant_losses(tests, ablation_tests)
    out += matched_study_limits(passages, "passages")
    out += matched_study_limits(second_model, "second_model") + matched_study_limits(extra_cells, "extra_cells")
    out += passages_limits(passages)
    out += carried_by_one_cell(cells, tests)
    if tests is not None and not tests.empty:
        ns = tests[~tests["significant"].astype(bool)]
        if len(ns):
            pairs = ", ".join(f"`{r.target}` vs `{r.baseline}` ({r.measure}, {r.task})" for r in ns.itertuples())
            out.append(f"Inconclusive (Holm-adjusted p ≥ 0.05 within its family): {pairs}. "
                       "These comparisons neither show a difference nor show its absence; the "
                       "non-inferiority column and metrics/power.json say what the data can rule out.")
        small = tests[tests["n_pairs"] < SMALL_N]
        if len(small):
            out.append(f"{len(small)} of {len(tests)} comparisons rest on fewer than {SMALL_N} "
                       f"paired samples (smallest n = {int(small['n_pairs'].min())}); "
                       "small effects cannot be detected.")
        if "n_clusters" in tests and (tests["n_clusters"] < tests["n_pairs"]).any():
            out.append("Some prompts share a cluster (e.g. a haystack): their CIs resample whole "
                       "clusters, but the McNemar and t p-values assume independent pairs.")
        if "match" in tests and (tests["match"] == "nearest_above").any():
            above = tests[tests["match"] == "nearest_above"].drop_duplicates("baseline")
            out.append("No SmartKV run fits within the memory of " + ", ".join(f"`{b}`" for b in above["baseline"])
                       + ": those comparisons give SmartKV more bytes.")
    if not summary.empty:
        seeds = int(summary["n_seeds"].min())
        if seeds < FEW_SEEDS:
            out.append(f"Only {seeds} seed(s) for some runs: the ± spreads are "
                       + ("undefined (shown as none)." if seeds < 2 else "rough."))
        memory, budget = run_memory(summary), summary.groupby("run", sort=False)["budget"].first()
        for run, b in budget.dropna().items():
            if memory[run] > b + 1e-9:
                out.append(f"`{run}` measured {memory[run]:.3f} × FP16 memory, above its budget {b:.3f}.")
        fp = summary[(summary["method"] == "fp16") & (summary["task"] != PERPLEXITY_TASK)]
        hard = fp[fp["score_mean"] < 0.5]
        if len(hard):
            out.append("The FP16 model itself scores below 0.5 on " + ", ".join(hard["task"])
                       + ": differences there measure the model's limits as much as the cache's.")
    if extra_cells and extra_cells.get("accuracy"):
        cells = ", ".join(f"{c} (n = {v['n']})" for c, v in (extra_cells["accuracy"].get("fp16") or {}).items())
        runs = ", ".join(f"`{r}`" for r in extra_cells["accuracy"])
        out.append(f"The extra cells ({cells}) ran the headline comparisons only ({runs}): the peers, "
                   "ablations and Pareto budgets were not run there, and each cell alone is small, so a "
                   "per-cell result that is inconclusive says little.")
    model = setup.get("model", "the model")
    size = setup.get("model_params")
    first = f"{model}{', ' + str(size) + ' parameters' if size else ''}"
    other = (second_model or {}).get("model")
    if other:
        runs = ", ".join(f"`{r}`" for r in (second_model.get("accuracy") or {}))
        out.append(f"Two small models: {first} for the whole study, {other} for the headline comparisons only"
                   f"{' (' + runs + ')' if runs else ''}; results may not transfer to larger models.")
    else:
        out.append(f"One small model ({first}); results may not transfer to larger models or other architectures.")
    out += missing_query_limits(provenance)
    out.append("Throughput comes from the model stages' wall clock on the machine that ran them (docs/study.md, "
               "\"Cost of the study\"); only ratios between runs of one stage run are meaningful.")
    return out
