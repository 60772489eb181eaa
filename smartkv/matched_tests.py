"""The matched sections' tests, accuracy tables and metrics (step 4 of smartkv/matched_study.py).

Apart from the prompts and runs, so that the sections' model cells never depend on statistics code:
exact tests with Holm per (family, measure), pooled and per cell (task x length), on the union of a
section's cells.
"""

from __future__ import annotations

import math

import pandas as pd

from smartkv.matched_study import SECTIONS


def tests(df: pd.DataFrame, match: list[str], *, seed: int = 0, alpha: float = 0.05,
          margin: float = 0.05, family: str = SECTIONS["second_model"], ablations: list[str] = (),
          presses: list[tuple[str, str]] = (), oracle: str | None = None) -> pd.DataFrame:
    """smartkv@<b> against b on every paired measure, pooled and per cell (task x length), then each
    (SmartKV run, dev-chosen press) of `presses` (`press_pairs`; its own family), then the headline
    `smartkv` against each of `ablations` (its own family: Δ > 0 means the ablated part helps);
    Holm per (family, measure). The `oracle` ablation (perfect ranking) is a diagnostic, not a
    hypothesis: its own family, so it does not dilute the planned ablation tests."""
    from smartkv.stats import apply_holm, measures_in, paired_tests
    from smartkv.study.labels import HEADLINE, matched_label

    # every cell named as the accuracy table names it (`niah@4k`), even a task at one length
    strata = df[df["error"] == ""].copy()
    strata["task"] = [cell_name(t, n) for t, n in zip(strata["task"], strata["context_length"])]
    frames = []
    # the order the summary reads them in: the matched baselines, the presses, then the ablations
    pairs = [(matched_label(b), b, family) for b in match]
    pairs += [(t, b, family.split(":")[0] + ": " + PRESS_FAMILY) for t, b in presses]
    pairs += [(HEADLINE, a, family.split(":")[0] + ": " + (ORACLE_FAMILY if a == oracle else "headline vs ablations"))
              for a in ablations]
    for measure in measures_in(strata):
        # a measure only some runs carry (kvpress's rows have no KL from FP16) is tested where both do
        has = set(strata.loc[strata[measure].notna(), "run"])
        for target, b, fam in pairs:
            if target not in has or b not in has:
                continue
            t = paired_tests(strata, target, [b], measure=measure, per_task=True, seed=seed, alpha=alpha,
                             margin=margin if measure == "score" else None)
            t["family"] = [f"{fam} [{measure}{'' if task == 'all' else ', per cell'}]" for task in t["task"]]
            frames.append(t)
    if not frames:
        return pd.DataFrame()
    return apply_holm(pd.concat(frames, ignore_index=True), alpha)


PRESS_FAMILY = "SmartKV vs the presses chosen on dev"
ORACLE_FAMILY = "headline vs the oracle ranking"  # a diagnostic: the report and the goals tell it apart by this


def press_pairs(choice: dict, budgets: list[float], headline: float, runs: set[str]) -> list[tuple[str, str]]:
    """(SmartKV run, press) at each kept ratio of metrics/peers_choice.json: SmartKV at that budget
    (`smartkv-b0.15`; the headline run where the ratio is the headline budget, INT3's bytes) against
    the press chosen there on dev. Only pairs whose two runs are in `runs`."""
    from smartkv.study.labels import HEADLINE, budget_label

    out = []
    for kept, c in (choice or {}).get("kept", {}).items():
        k = float(kept)
        target = (HEADLINE if math.isclose(k, headline)
                  else next((budget_label(b) for b in budgets if math.isclose(b, k)), None))
        if target in runs and c["chosen"] in runs:
            out.append((target, c["chosen"]))
    return out


def control_check(df: pd.DataFrame, control: str = "kvpress-none", reference: str = "fp16") -> dict | None:
    """The no-press control against FP16, prompt by prompt: kvpress with nothing pressed must
    generate what the study's own FP16 run does (issue 33, item 4). None without a control row."""
    ok = df[df["error"] == ""]
    a = ok[ok["run"] == control].set_index("sample_id")
    b = ok[ok["run"] == reference].set_index("sample_id")
    if a.empty or b.empty:
        return None
    both = a.index.intersection(b.index)
    cols = [c for c in ("prediction", "score") if c in a and c in b]
    differ = [str(i) for i in both if any(a.at[i, c] != b.at[i, c] for c in cols)]
    return {"control": control, "reference": reference, "compared": cols, "n": int(len(both)),
            "differ": len(differ), "differ_ids": differ[:20], "missing": int(len(a.index.symmetric_difference(b.index)))}


def ranking_or_tier(df: pd.DataFrame, match: list[str], oracle: str, slack: float = 0.01,
                    also: list[str] = ()) -> list[dict]:
    """Where a baseline finds a needle that `smartkv@<b>` misses, does the oracle ranking (the same
    cache given the importance of the whole FP16 generation up front) find it? If it does, SmartKV's
    attention ranking is what lost it; if the oracle misses it too, the precision it could afford
    (the low tier) is. Only for matched runs within `slack` of the oracle's measured bytes, whose
    cache differs from the oracle's in ranking alone. `also`: other runs (the other ablations)
    whose finds among the lost needles are counted beside the oracle's, for context."""
    from smartkv.study.labels import matched_label

    ok = df[(df["error"] == "") & df["score"].notna()]
    by_run = {r: g.set_index("sample_id") for r, g in ok.groupby("run")}
    if oracle not in by_run:
        return []
    o = by_run[oracle]
    out = []
    for b in match:
        t = matched_label(b)
        if t not in by_run or b not in by_run:
            continue
        tk, ok_kv = by_run[t]["kv_ratio"].mean(), o["kv_ratio"].mean()
        if abs(tk - ok_kv) > slack:
            continue
        ids = by_run[t].index.intersection(by_run[b].index).intersection(o.index)
        lost = [i for i in ids if by_run[b].at[i, "score"] == 1 and by_run[t].at[i, "score"] == 0]
        found = [i for i in lost if o.at[i, "score"] == 1]
        out.append({"target": t, "baseline": b, "oracle": oracle, "lost": len(lost), "oracle_finds": len(found),
                    "oracle_accuracy": float(o.loc[ids, "score"].mean()), "target_accuracy":
                    float(by_run[t].loc[ids, "score"].mean()), "n": int(len(ids)),
                    "bottleneck": ("none" if not lost else "ranking" if 2 * len(found) > len(lost)
                                   else "low tier"), "lost_ids": [str(i) for i in lost],
                    "also_finds": {a: int(sum(by_run[a].at[i, "score"] == 1 for i in lost if i in by_run[a].index))
                                   for a in also if a in by_run}})
    return out


def cell_name(task: str, length: int) -> str:
    """A cell's label, as the per-length tests name it: `niah@4k`, `ruler_multikey@1k`, `niah@160`."""
    n = int(length)
    return f"{task}@{n // 1024}k" if n % 1024 == 0 else f"{task}@{n}"


def accuracy(df: pd.DataFrame) -> dict:
    """{run: {cell: {n, correct, accuracy, ci95, kv_ratio}}} over the rows that have a score;
    cells (`cell_name`) in task order, then by length."""
    from smartkv.plot_labels import wilson_interval

    out: dict = {}
    ok = df[(df["error"] == "") & df["score"].notna()]
    tasks = list(dict.fromkeys(ok["task"]))
    ok = ok.assign(_t=ok["task"].map(tasks.index)).sort_values(["_t", "context_length"], kind="stable")
    for (run, task, length), g in ok.groupby(["run", "task", "context_length"], sort=False):
        k, n = int((g["score"] == 1).sum()), int(len(g))
        lo, hi = wilson_interval(k, n)
        out.setdefault(str(run), {})[cell_name(str(task), int(length))] = {
            "n": n, "correct": k, "accuracy": k / n, "ci95": [float(lo), float(hi)],
            "kv_ratio": float(g["kv_ratio"].mean())}
    return out


def metrics(df: pd.DataFrame, t: pd.DataFrame, s: dict, oracle: str | None = None) -> dict:
    """metrics/<section>.json: the model, accuracy per run and cell, every comparison row,
    (where the presses ran) the no-press control's check against FP16, and (with an `oracle`
    ablation) whether ranking or the low tier lost the needles a baseline found."""
    keep = ["family", "target", "baseline", "task", "measure", "n_pairs", "n_clusters", "target_mean", "baseline_mean",
            "mean_diff", "n_target_only", "n_baseline_only", "p", "p_holm", "ci_lo", "ci_hi", "verdict",
            "target_kv_ratio", "baseline_kv_ratio"]

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return v.item() if hasattr(v, "item") else v

    rows = [] if t.empty else [{k: clean(r[k]) for k in keep if k in r} for r in t.to_dict("records")]
    out = {"model": s["model"], "seeds": s["seeds"], "accuracy": accuracy(df), "comparisons": rows}
    control = control_check(df)
    if control is not None:
        out["control"] = control
    if oracle:
        out["bottleneck"] = ranking_or_tier(df, s.get("match", []), oracle,
                                            also=[a for a in s.get("ablations", []) if a != oracle])
    return out


def table(m: dict) -> str:
    """metrics/<section>_table.md: FP16 per cell, then each matched comparison (bold = Holm-significant)."""
    acc = m["accuracy"]
    names = list(dict.fromkeys(c for runs in acc.values() for c in runs))
    head = "| run | " + " | ".join(names) + " | KV x FP16 |"
    lines = [f"Model: `{m['model']}`, test seeds {m['seeds']}. Accuracy (correct / n) per task and prompt "
             "length (`niah@4k`: 4,096 prompt tokens).", "", head, "|" + " --- |" * (len(names) + 2)]
    for run, by in acc.items():
        cells = [f"{by[c]['correct']}/{by[c]['n']}" if c in by else "" for c in names]
        kv = sum(v["kv_ratio"] * v["n"] for v in by.values()) / sum(v["n"] for v in by.values())
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {kv:.3f} |")
    lines += ["", "| SmartKV | baseline | where | measure | t / b | discordant t / b | KV x FP16 t / b | Holm p | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in m["comparisons"]:
        disc = "" if r.get("n_target_only") is None else f"{int(r['n_target_only'])} / {int(r['n_baseline_only'])}"
        p = r.get("p_holm")
        ptxt = "" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")
        verdict = r.get("verdict", "")
        if verdict and verdict != "inconclusive":
            ptxt, verdict = f"**{ptxt}**", f"**{verdict}**"
        lines.append(f"| {r['target']} | {r['baseline']} | {r['task']} | {r['measure']} | "
                     f"{r['target_mean']:.3f} / {r['baseline_mean']:.3f} | {disc} | "
                     f"{r['target_kv_ratio']:.3f} / {r['baseline_kv_ratio']:.3f} | {ptxt} | {verdict} |")
    return "\n".join(lines) + "\n"
