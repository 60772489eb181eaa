"""The report's sweeps section: per swept parameter, the headline run's dev-seed results per value,
each compared with the current value on the same prompts (from metrics/sweeps.json)."""

from __future__ import annotations

import math

from smartkv.stats.tables import _p


def _num(x, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _delta(t: dict | None, fmt: str) -> str:
    if not t or t.get("mean_diff") is None:
        return "–"
    ci = "" if t.get("ci_lo") is None else f" [{t['ci_lo']:{fmt}}, {t['ci_hi']:{fmt}}]"
    p = _p(t["p_holm"]) if t.get("p_holm") is not None else "–"
    bold = t.get("p_holm") is not None and t["p_holm"] < 0.05
    text = f"{t['mean_diff']:{fmt}}{ci}, Holm p {p}"
    return f"**{text}**" if bold else text


def _accuracy_delta(t: dict | None) -> str:
    if not t or t.get("mean_diff") is None:
        return "–"
    return f"{_delta(t, '+.3f')} ({t.get('n_value_only', 0)}/{t.get('n_current_only', 0)})"


def _partner(v: dict) -> str:
    return f" ({v['paired_with']})" if v.get("paired_with") else ""


def sweeps_section(sweeps: dict | None) -> list[str]:
    if not sweeps:
        return ["_metrics/sweeps.json is missing: run the sweeps (docs/study.md, \"Sweeps\")._", ""]
    if not sweeps.get("params"):
        return [f"_{sweeps.get('note', 'no parameter swept')}._", ""]
    out = ["Each default was chosen on the dev seeds only, one factor at a time (the other swept parameters at "
           "their current values). Every value is compared with the current one on the same dev prompts: Δ "
           "accuracy by exact McNemar (prompts only that value / only the current value gets right), Δ of the "
           "gold answer's teacher-forced log-likelihood by paired t (nats, 95% CI); Holm within each "
           "parameter, bold where it survives. Each value is paired with the current value's experiment of its "
           "own batch (the same commit and protocol: float results move across machines), named in the "
           "last column. A default moves only when dev evidence beats the current value; a tie keeps it. "
           "For the budget, a memory trade-off, nothing is picked.", ""]
    for p, s in sweeps["params"].items():
        best = s.get("best_on_dev")
        out += [f"**`{p}`** (current {s['current']}; best on dev accuracy: "
                f"{'not picked (a trade-off)' if best is None else best}):", "",
                "| value | n | accuracy | Δ accuracy vs current (value only/current only) | answer log-lik. | "
                "Δ log-lik. vs current | KV memory (× FP16) | experiment (paired with) |",
                "|---|---|---|---|---|---|---|---|"]
        for v in s["values"]:
            vs = v.get("vs_current") or {}
            mark = " (current)" if v["value"] == s["current"] else ""
            out.append(f"| {v['value']}{mark} | {v['n_prompts']} | {_num(v['score_mean'], '.3f')} | "
                       f"{_accuracy_delta(vs.get('score'))} | {_num(v.get('answer_logprob_mean'), '.3f')} | "
                       f"{_delta(vs.get('answer_logprob'), '+.3f')} | {_num(v['kv_ratio'], '.3f')} | "
                       f"{v.get('shown', '–')}{_partner(v)} |")
        for v in s["values"]:
            if v.get("note"):
                out += ["", f"_{v['value']}: {v['note']}._"]
        if any("note" in (v.get("vs_current") or {}) for v in s["values"]):
            out.append("")
            out.append("_– : no per-prompt results recorded for that experiment (it ran before the summary kept "
                       "them, and its refs stayed on the machine that ran it), or no experiment of the current "
                       "value recorded them in its batch: accuracy and memory only._")
        out.append("")
    return out + reruns_section(sweeps.get("reruns") or [])


def _same(x) -> str:
    return "?" if x is None else ("same" if x else "differs")


def reruns_section(pairs: list[dict]) -> list[str]:
    """Repeats of one configuration, prompt by prompt: the float-noise floor under every Δ."""
    if not pairs:
        return []
    out = ["**Re-run spread** (the same configuration run twice: another machine, commit, protocol or thread "
           "count; the experiment names say which). A Δ in the tables above no larger than these is float noise, not "
           "evidence:", "",
           "| experiments | params | commit | protocol | machines | prompts | 0/1 flips | max (mean) abs. Δ "
           "answer log-lik. | max (mean) abs. Δ KL from FP16 | abs. Δ nll |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in pairs:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        machines = " / ".join(m or "?" for m in r.get("found_on") or [None, None])
        # two significant digits: a thread-count repeat moves by 1e-5, a machine change by 1e-3
        cont = [f"{_num(r['max_abs'].get(m), '.2g')} ({_num(r['mean_abs'].get(m), '.2g')})"
                for m in ("answer_logprob", "kl_fp16")]
        out.append(f"| {r['a']} vs {r['b']} | {params} | {_same(r['same_commit'])} | {_same(r['same_protocol'])} | "
                   f"{machines} | {r['n_prompts']} | {r['score_flips']} | {cont[0]} | {cont[1]} | "
                   f"{_num(r['max_abs'].get('nll'), '.2g')} |")
    return out + [""]
