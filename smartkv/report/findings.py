"""What the results say, as data: the report and the slides word the same findings.

Every function reads the pipeline's outputs (tests frames, metrics dicts) and returns
numbers plus a verdict chosen by them, so a loss is reported as plainly as a win.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from smartkv.stats import holm

METRIC_FILES = ("main", "power", "attention", "sensitivity", "errors", "latency", "ablations", "profile")
WIN, LOSS, INCONCLUSIVE = "significantly better", "significantly worse", "inconclusive"


def load_metrics(metrics_dir: str | Path = "metrics", names: tuple[str, ...] = METRIC_FILES) -> dict:
    """{name: the parsed metrics/<name>.json, or None when the stage has not written it}, for `names`."""
    out = {}
    for name in names:
        path = Path(metrics_dir) / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.is_file() else None
    return out


def missing(name: str, stage: str) -> str:
    return f"_`metrics/{name}.json` is missing: this section needs the `{stage}` stage (`dvc repro {stage}`)._"


def outcome(row) -> str:
    if bool(row.get("significant", False)) and row.get("verdict") == "target better":
        return WIN
    if bool(row.get("significant", False)) and row.get("verdict") == "target worse":
        return LOSS
    return INCONCLUSIVE


def matched_score_tests(tests: pd.DataFrame | None) -> pd.DataFrame:
    """The pooled accuracy comparisons (task = all, measure = score), one per baseline."""
    if tests is None or tests.empty or "measure" not in tests:
        return pd.DataFrame()
    t = tests[(tests["task"] == "all") & (tests["measure"] == "score")].copy()
    t["outcome"] = [outcome(r) for r in t.to_dict("records")]
    return t.reset_index(drop=True)


def matched_stage_scores(m: dict | None) -> list[dict]:
    """A matched-comparison stage's accuracy comparisons (metrics/extra_cells.json, second_model.json),
    pooled first, then per cell, each with `outcome` from its Holm-adjusted verdict."""
    words = {"target better": WIN, "target worse": LOSS}
    rows = [dict(c, outcome=words.get(c.get("verdict"), INCONCLUSIVE))
            for c in (m or {}).get("comparisons", []) if c.get("measure") == "score"]
    return sorted(rows, key=lambda c: (c["target"], c["task"] != "all"))


def comparison_counts(tests: pd.DataFrame | None) -> dict:
    t = matched_score_tests(tests)
    return {k: (t[t["outcome"] == k] if len(t) else t) for k in (WIN, LOSS, INCONCLUSIVE)}


def hypothesis(sens: dict | None, alpha: float = 0.05) -> dict | None:
    """The premise: is 2 bits on the top-attention tokens more harmful than on the bottom ones?

    Per comparison (score x k x keys plain/rotated) the KL CI (top − bottom) decides the
    direction; the exact McNemar p of accuracy is Holm-adjusted over the comparisons. The
    verdict: `supported` when every resolved KL comparison says top is more harmful,
    `contradicted` when every resolved one says bottom is, else `mixed` or `inconclusive`."""
    if not sens or not sens.get("comparisons"):
        return None
    rows = []
    for name, c in sens["comparisons"].items():
        tb = c.get("top_vs_bottom")
        if not tb:
            continue
        kl = tb["kl_diff"]
        direction = ("top more harmful" if kl["ci_lo"] > 0 else "bottom more harmful" if kl["ci_hi"] < 0
                     else "unresolved")
        rows.append({"comparison": name, "n": kl.get("n"), "kl_diff": kl["mean_diff"], "kl_lo": kl["ci_lo"],
                     "kl_hi": kl["ci_hi"], "acc_top": tb["accuracy_a"], "acc_bottom": tb["accuracy_b"],
                     "p": tb["mcnemar"]["p_mcnemar"], "direction": direction})
    if not rows:
        return None
    df = pd.DataFrame(rows)
    df["p_holm"] = holm(df["p"].to_numpy(dtype=float))
    df["significant"] = df["p_holm"] < alpha
    resolved = set(df.loc[df["direction"] != "unresolved", "direction"])
    verdict = ("inconclusive" if not resolved else "supported" if resolved == {"top more harmful"}
               else "contradicted" if resolved == {"bottom more harmful"} else "mixed")
    return {"verdict": verdict, "table": df, "n_prompts": sens.get("n_prompts"),
            "fp16_accuracy": sens.get("fp16_accuracy")}


def error_totals(errors: dict | None) -> dict | None:
    """Discordant prompts summed over the pairs: where SmartKV alone fails, and the reverse."""
    if not errors or not errors.get("pairs"):
        return None
    pairs = errors["pairs"].values()
    return {"n": sum(p["n"] for p in pairs), "smartkv_fails": sum(p["smartkv fails"] for p in pairs),
            "baseline_fails": sum(p["baseline fails"] for p in pairs), "n_pairs": len(errors["pairs"])}


def throughput(latency: dict | None, run: str, reference: str = "fp16") -> float | None:
    """tokens/s of `run` over `reference`'s, from metrics/latency.json (same machine, same stage run)."""
    runs = (latency or {}).get("runs", {})
    if run not in runs or reference not in runs:
        return None
    r = runs[run]["tokens_per_s"] / runs[reference]["tokens_per_s"]
    return r if math.isfinite(r) else None
