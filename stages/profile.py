"""Stage `profile`: where decode time and memory go, per method and context length (issue 9).

Runs the `profile.runs` baselines (labels of `baselines`, with their params) and the headline
SmartKV run (`budget` and the `smartkv` defaults) in one process, round-robin, at each of
`profile.contexts` (see smartkv/analysis/profile.py for what is measured and how). Writes
- metrics/profile.json: per context and run the decode ms/token (median, min, max, IQR of
  `profile.repeats` repeats) and its ratio to fp16 from the same run, the peak bytes allocated
  next to the cache's own bytes, the SmartKV phase shares, the top operators of one fp16 and one
  SmartKV decode at `profile.ops_context`; the config, git revision, versions and machine;
- plots/profile_latency.{png,pdf}, plots/profile_memory.{png,pdf} and plots/profile.csv.
Wall-clock numbers differ on every run, like metrics/latency.json.
"""

from __future__ import annotations

import os
import platform

from smartkv.study.params import ParamError, get, model_settings, placement
from smartkv.study.labels import HEADLINE
from smartkv.study.runs import baseline_runs, headline_run
from stages.common import METRICS, PLOTS, code_revision, log, stage_main

OUT = METRICS / "profile.json"
MIN_CONTEXT = 16  # as `smartkv bench`: a prompt shorter than this leaves nothing to decode against


def _int(key: str, v, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ParamError(f"{key}={v!r} must be an integer >= {lo}")
    return v


def settings(params: dict) -> dict:
    p = get(params, "profile")
    if not isinstance(p, dict):
        raise ParamError("profile must be a mapping (contexts, new_tokens, repeats, runs, ops_context)")
    contexts = p.get("contexts")
    if (not isinstance(contexts, list) or not contexts or len(set(map(str, contexts))) != len(contexts)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= MIN_CONTEXT for c in contexts)):
        raise ParamError(f"profile.contexts={contexts!r} must list distinct integers >= {MIN_CONTEXT} (prompt tokens)")
    ops_context = p.get("ops_context")
    if ops_context is not None and ops_context not in contexts:
        raise ParamError(f"profile.ops_context={ops_context!r} must be one of profile.contexts {contexts} or null")
    return {"contexts": sorted(contexts), "new_tokens": _int("profile.new_tokens", p.get("new_tokens"), 2),
            # the median of fewer than 3 repeats has no spread worth reporting
            "repeats": _int("profile.repeats", p.get("repeats"), 3), "ops_context": ops_context,
            "runs": p.get("runs")}


def profile_runs(params: dict, labels) -> list:
    """The runs named in `profile.runs` (fp16 among them), then the headline SmartKV run. An entry
    is a label of `baselines`, or a run profiled only here, {label, method, params} (e.g.
    transformers' QuantizedCache with the quanto backend, which the accuracy study leaves out)."""
    from smartkv.study.runs import run_spec

    known = {r.label: r for r in baseline_runs(params)}
    if not isinstance(labels, list) or not labels or not all(isinstance(x, (str, dict)) for x in labels):
        raise ParamError(f"profile.runs={labels!r} must list baseline labels or {{label, method, params}} runs "
                         f"(e.g. [fp16, int4, kivi-2])")
    extra = {}
    for i, x in enumerate(labels):
        if isinstance(x, dict):
            extra[x.get("label")] = run_spec(f"profile.runs[{i}]", x.get("label"), x.get("method"),
                                             x.get("params") or {}, "peer")
    names = [x if isinstance(x, str) else x.get("label") for x in labels]
    unknown = [x for x in names if x not in known and x not in extra]
    if unknown:
        raise ParamError(f"profile.runs: {', '.join(unknown)} not in baselines; known: {', '.join(known)}")
    runs = [known.get(x) or extra[x] for x in dict.fromkeys(names)]
    if not any(r.method == "fp16" for r in runs):
        raise ParamError(f"profile.runs={labels!r} must include the fp16 baseline: every ratio is against it")
    return runs + [headline_run(params)]


@stage_main
def main(params: dict) -> None:
    import pandas as pd
    import torch

    from smartkv.analysis.profile import plot_rows, profile_methods
    from smartkv.analysis.profile_figures import latency_figure, memory_figure
    from smartkv.io import atomic_write_json, provenance
    from smartkv.models import load_model
    from smartkv.plots import write_plot_data

    cfg = settings(params)
    model_name, dtype = model_settings(params)
    runs = profile_runs(params, cfg["runs"])
    model, tok = load_model(model_name, dtype=dtype, **placement(params))
    fp16 = next(r.label for r in runs if r.method == "fp16")
    result = profile_methods(model, tok, runs, cfg["contexts"], cfg["new_tokens"], cfg["repeats"], cfg["ops_context"],
                             (fp16, HEADLINE), log=lambda m: log.info("profile: %s", m))
    config = {"model": model_name, "dtype": dtype, **placement(params), **cfg,
              "runs": [(r.label, r.method, r.params) for r in runs]}
    prov = provenance(config, revision=True)
    prov["git_revision"] = code_revision(prov["git_revision"])
    result.update({"headline": HEADLINE, "fp16": fp16, "provenance": prov,
                   "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "platform": platform.platform(), "processor": platform.processor(),
                               # other work on a shared machine slows every run alike (round-robin)
                               "loadavg_at_end": list(os.getloadavg())}})
    atomic_write_json(OUT, result)
    rows = pd.DataFrame(plot_rows(result))
    write_plot_data(rows, PLOTS / "profile.csv")
    latency_figure(rows, PLOTS / "profile_latency")
    memory_figure(rows, PLOTS / "profile_memory")
    last = result["summary"][HEADLINE]["contexts"][str(cfg["contexts"][-1])]
    log.info("profile: %s at %d tokens: %.1f ms/token (%.2f x fp16 tokens/s), peak %.1f MiB, cache %.1f MiB",
             HEADLINE, cfg["contexts"][-1], last["ms_per_token"], last["ratio_vs_fp16"], last["peak_allocated_mib"],
             last["cache_mib"])


if __name__ == "__main__":
    main()
