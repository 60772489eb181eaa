"""Stage `sensitivity`: the hypothesis test (issue 9): top-k vs bottom-k vs random-k tokens at
low precision, at equal bytes, on repeated-filler passkeys from the dev seeds.

Writes `data/sensitivity.parquet` (one row per prompt x condition), `metrics/sensitivity.json`
(paired comparisons with bootstrap CIs and exact McNemar tests) and `plots/sensitivity.{png,pdf}`.
The cache is quantized then de-quantized in place: a simulation, see smartkv.analysis.simulate.
"""

from __future__ import annotations

import time

from smartkv.study.params import ParamError, get
from stages.common import DATA, METRICS, PLOTS, log, stage_main
from stages.dev_setup import analysis_section, check_dev_seeds, int_list_param, int_param, load_study_model

OUT_DATA = DATA / "sensitivity.parquet"
OUT_METRICS = METRICS / "sensitivity.json"
OUT_PLOT = PLOTS / "sensitivity"


def _fracs(key: str, v, closed: bool = False) -> list[float]:
    ok = isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                            and (0 <= x <= 1 if closed else 0 < x < 1) for x in v)
    if not ok:
        raise ParamError(f"{key}={v!r} must be a non-empty list of fractions in {'[0, 1]' if closed else '(0, 1)'}")
    return [float(x) for x in v]


def settings(params: dict) -> dict:
    """The validated `sensitivity` section."""
    s = analysis_section(params, "sensitivity")
    cfg = {
        "seeds": int_list_param("sensitivity.seeds", s.get("seeds")),
        "lengths": int_list_param("sensitivity.lengths", s.get("lengths"), lo=16),
        "depths": _fracs("sensitivity.depths", s.get("depths"), closed=True),
        "n_per_cell": int_param("sensitivity.n_per_cell", s.get("n_per_cell", 1), 1),
        "fractions": _fracs("sensitivity.fractions", s.get("fractions")),
        "low_bits": int_param("sensitivity.low_bits", s.get("low_bits", 2), 1, 8),
        "high_bits": int_param("sensitivity.high_bits", s.get("high_bits", 4), 1, 8),
        "group_size": int_param("sensitivity.group_size", s.get("group_size", 32), 1),
        "obs_window": int_param("sensitivity.obs_window", s.get("obs_window", 32), 1),
        "pool_kernel": int_param("sensitivity.pool_kernel", s.get("pool_kernel", 5), 1),
        "sink_tokens": int_param("sensitivity.sink_tokens", s.get("sink_tokens", 4), 0),
        "bootstrap_seed": int_param("sensitivity.bootstrap_seed", s.get("bootstrap_seed", 0), 0),
    }
    if cfg["low_bits"] >= cfg["high_bits"]:
        raise ParamError(f"sensitivity.low_bits={cfg['low_bits']} must be below high_bits={cfg['high_bits']}")
    check_dev_seeds(params, "sensitivity.seeds", cfg["seeds"])
    return cfg


def run(params: dict, cfg: dict, checkpoint=None) -> "object":
    """Every condition on every prompt; `checkpoint(df)` (optional) gets the rows so far every 10 prompts."""
    import pandas as pd
    import torch

    from smartkv.analysis.recorder import record_prefill
    from smartkv.analysis.sensitivity import conditions, run_prompt
    from smartkv.runner import encode
    from smartkv.tasks import generate_task

    model, tok, device = load_study_model(params)
    conds = conditions(cfg["fractions"], low=cfg["low_bits"], high=cfg["high_bits"])
    samples = [s for seed in cfg["seeds"] for s in generate_task(
        "passkey", tok, n_per_cell=cfg["n_per_cell"], lengths=cfg["lengths"], depths=cfg["depths"], seed=seed)]
    rows, start = [], time.perf_counter()
    for i, s in enumerate(samples):
        ids, _ = encode(tok, [s.prompt], device=device)
        answer = torch.tensor(tok.encode(" " + s.answers[0], add_special_tokens=False), device=device)
        rec = record_prefill(model, ids, window=cfg["obs_window"])
        for r in run_prompt(model, rec, answer, conds, low=cfg["low_bits"], high=cfg["high_bits"],
                            group_size=cfg["group_size"], sinks=cfg["sink_tokens"], pool_kernel=cfg["pool_kernel"],
                            seed=i):
            rows.append({"sample_id": s.sample_id, "length": s.context_length, "depth": s.depth, **r})
        log.info("sensitivity %d/%d %s (%.0f s)", i + 1, len(samples), s.sample_id, time.perf_counter() - start)
        if checkpoint is not None and (i + 1) % 10 == 0:
            checkpoint(pd.DataFrame(rows))
    return pd.DataFrame(rows)


def write_outputs(df, cfg: dict, params: dict) -> None:
    from smartkv.analysis.sensitivity_report import figure, summary
    from smartkv.io import atomic_write_json, atomic_write_parquet, provenance

    atomic_write_parquet(df, OUT_DATA, provenance({"sensitivity": cfg, "model": get(params, "model")}))
    atomic_write_json(OUT_METRICS, summary(df, cfg))
    figure(df, OUT_PLOT, cfg)


@stage_main
def main(params: dict) -> None:
    cfg = settings(params)
    write_outputs(run(params, cfg), cfg, params)


if __name__ == "__main__":
    main()
