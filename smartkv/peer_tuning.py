"""Eviction peers chosen on dev by the rule that chose SmartKV's defaults (issue 33, item 4).

A peer at its library defaults against a tuned SmartKV is not a fair comparison: kvpress's SnapKV
observes the last 64 prompt queries, which on a needle prompt are mostly haystack. So every
candidate press (`peers_tuning.candidates`: a press and a grid of its kvpress options) runs at
each kept ratio on a section's dev prompts, drawn from documents no test prompt reads, and the
best per kept ratio is fixed before any test prompt runs (`metrics/peers_choice.json`). Then the
chosen presses, and a no-press control, run on the section's test cells.

The rule (`RULE`), as for SmartKV's parameters on dev (docs/study.md, "Sweeps"): the highest dev
accuracy (teacher-forced exact match); a tie goes to the higher mean answer log-probability, then
to the earlier candidate in params order.

Pure Python and pandas: the kvpress stage (its own venv, another transformers) imports it.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd

from smartkv.kvpress_peers import OPTIONS, PRESSES, PeerSpec

RULE = ("highest dev accuracy (teacher-forced exact match); ties: higher mean answer log-probability, "
        "then the earlier candidate in peers_tuning.candidates")
SHORT = {"window_size": "w", "kernel_size": "ks", "n_sink": "sink", "n_future_positions": "nf",
         "use_covariance": "cov", "use_vnorm": "vn"}
CONTROL = PeerSpec("kvpress-none", "none", 1.0)  # no press: must equal the fp16 baseline row for row


class TuningError(ValueError):
    """A bad `peers_tuning` value: the stage prints it on one line and exits 2."""


def label(press: str, options: dict, kept: float) -> str:
    """`snapkv-w16-ks5-k0.15`: the press, its options in SHORT form, the kept ratio."""
    parts = [press] + [f"{SHORT.get(k, k)}{int(v) if isinstance(v, bool) else v}" for k, v in sorted(options.items())]
    return "-".join(parts) + f"-k{kept:.2f}"


def settings(params: dict) -> dict:
    """Validated `peers_tuning`: the section whose dev and test prompts it uses, kept ratios, candidates."""
    t = params.get("peers_tuning")
    if not isinstance(t, dict):
        raise TuningError("peers_tuning must be a mapping with section, kept, candidates")
    unknown = sorted(set(t) - {"section", "kept", "candidates"})
    if unknown:
        raise TuningError(f"peers_tuning: unknown key(s) {', '.join(unknown)}; allowed: section, kept, candidates")
    section = t.get("section")
    if not isinstance(section, str) or not isinstance(params.get(section), dict):
        raise TuningError(f"peers_tuning.section={section!r} must name a params section with dev_seeds (e.g. passages)")
    kept = t.get("kept")
    if (not isinstance(kept, list) or not kept
            or not all(isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k < 1 for k in kept)):
        raise TuningError(f"peers_tuning.kept={kept!r} must list kept fractions in (0, 1)")
    cands = t.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise TuningError(f"peers_tuning.candidates={cands!r} must list {{press, grid}} entries")
    grids = []
    for i, c in enumerate(cands):
        key = f"peers_tuning.candidates[{i}]"
        if not isinstance(c, dict) or set(c) - {"press", "grid"}:
            raise TuningError(f"{key}={c!r} must be a mapping with press and an optional grid")
        press, grid = c.get("press"), c.get("grid") or {}
        if press not in PRESSES or PRESSES[press] is None:
            raise TuningError(f"{key}.press={press!r}; allowed: {', '.join(p for p in PRESSES if PRESSES[p])}")
        if not isinstance(grid, dict) or set(grid) - set(OPTIONS[press]):
            raise TuningError(f"{key}.grid={grid!r}: {press} takes options {', '.join(OPTIONS[press]) or 'none'}")
        if not all(isinstance(v, list) and v for v in grid.values()):
            raise TuningError(f"{key}.grid: every option maps to a non-empty list of values")
        grids.append((press, grid))
    return {"section": section, "kept": [float(k) for k in dict.fromkeys(kept)], "candidates": grids}


def candidate_specs(s: dict) -> list[PeerSpec]:
    """Every (candidate, option combination, kept ratio), in params order; labels unique."""
    specs = []
    for press, grid in s["candidates"]:
        names = sorted(grid)
        for values in itertools.product(*(grid[n] for n in names)):
            options = dict(zip(names, values))
            for kept in s["kept"]:
                specs.append(PeerSpec(label(press, options, kept), press, kept, tuple(sorted(options.items()))))
    labels = [x.label for x in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise TuningError(f"peers_tuning.candidates: duplicate candidate(s) {', '.join(dup)}")
    return specs


def choose(rows: pd.DataFrame, specs: list[PeerSpec]) -> dict:
    """metrics/peers_choice.json's body: per kept ratio, every candidate's dev accuracy and answer
    log-probability (over the prompts every candidate scored) and the one RULE picks."""
    order = {x.label: i for i, x in enumerate(specs)}
    by_label = {x.label: x for x in specs}
    ok = rows[(rows["error"] == "") & rows["score"].notna()] if "error" in rows else rows[rows["score"].notna()]
    out = {"rule": RULE, "kept": {}}
    for kept in sorted({x.kept for x in specs}, reverse=True):
        mine = [x.label for x in specs if math.isclose(x.kept, kept)]
        g = ok[ok["run"].isin(mine)]
        table = []
        for run, r in g.groupby("run", sort=False):
            lp = r["answer_logprob"].mean() if "answer_logprob" in r else float("nan")
            table.append({"label": run, "accuracy": float(r["score"].mean()), "answer_logprob": float(lp),
                          "n": int(len(r)), "order": order[run]})
        if not table:
            continue
        table.sort(key=lambda e: (-e["accuracy"], -(e["answer_logprob"] if e["answer_logprob"] == e["answer_logprob"]
                                                    else -math.inf), e["order"]))
        best = by_label[table[0]["label"]]
        out["kept"][f"{kept:.2f}"] = {"chosen": best.label, "press": best.press, "options": dict(best.options),
                                      "candidates": [{k: v for k, v in e.items() if k != "order"} for e in table]}
    return out


def chosen_specs(choice: dict, candidates: list[PeerSpec]) -> list[PeerSpec]:
    """What runs on test: the no-press control, then at each kept ratio of `choice` the chosen press
    and, after it, the dev-best setting of every other press in dev order (issue 33: every press is
    reported on test; only the chosen one is compared). `candidates`: `candidate_specs` of the params
    the choice was made with; a label the choice names and they lack means the params changed since."""
    by_label = {x.label: x for x in candidates}
    out = [CONTROL]
    for kept, c in choice["kept"].items():
        seen: set[str] = set()
        for e in [{"label": c["chosen"]}, *c["candidates"]]:
            spec = by_label.get(e["label"])
            if spec is None:
                raise TuningError(f"metrics/peers_choice.json names {e['label']!r}, which peers_tuning.candidates no "
                                  "longer lists: re-run the choice (`dvc repro peers_tuning`)")
            if spec.press not in seen:
                seen.add(spec.press)
                out.append(spec)
    return out
