"""Stage `attention`: where the default model's attention goes (issue 9, item 1).

On prompts of the dev seeds (never the study's test seeds), records the prefill attention,
the observation window's and the first decode steps' through the tracker SmartKV's cache
uses, and writes per-layer / per-KV-head statistics (`data/attention.parquet`,
`metrics/attention.json`) and the heatmap of one needle prompt (`plots/attention_heatmap.{png,pdf}`).
"""

from __future__ import annotations

import time

from smartkv.study.params import ParamError, get
from stages.common import DATA, METRICS, PLOTS, log, stage_main
from stages.dev_setup import analysis_section, check_dev_seeds, int_list_param, int_param, load_study_model

OUT_DATA = DATA / "attention.parquet"
OUT_METRICS = METRICS / "attention.json"
OUT_PLOT = PLOTS / "attention_heatmap"
NEEDLE_TASKS = ("passkey", "niah")  # tasks whose samples carry `needle_char_span`


def settings(params: dict) -> dict:
    a = analysis_section(params, "attention")
    tasks = a.get("tasks")
    if not isinstance(tasks, list) or not tasks or any(t not in NEEDLE_TASKS for t in tasks):
        raise ParamError(f"attention.tasks={tasks!r} must list needle tasks from {', '.join(NEEDLE_TASKS)}")
    depths = a.get("depths")
    if not isinstance(depths, list) or not depths or not all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths):
        raise ParamError(f"attention.depths={depths!r} must be a non-empty list of fractions in [0, 1]")
    hm = a.get("heatmap") or {}
    if not isinstance(hm, dict) or hm.get("task", "passkey") not in NEEDLE_TASKS:
        raise ParamError(f"attention.heatmap={hm!r} must be a mapping with task in {NEEDLE_TASKS}, length, depth, seed")
    cfg = {
        "seeds": int_list_param("attention.seeds", a.get("seeds"), 0),
        "tasks": tasks,
        "lengths": int_list_param("attention.lengths", a.get("lengths"), 64),
        "depths": [float(d) for d in depths],
        "n_per_cell": int_param("attention.n_per_cell", a.get("n_per_cell", 1), 1),
        "obs_window": int_param("attention.obs_window", a.get("obs_window", 32), 1),
        "decode_steps": int_param("attention.decode_steps", a.get("decode_steps", 8), 1),
        "sink_tokens": int_param("attention.sink_tokens", a.get("sink_tokens", 4), 1),
        "heatmap": {"task": hm.get("task", "passkey"), "length": int_param("attention.heatmap.length", hm.get("length", 256), 64),
                    "depth": float(hm.get("depth", 0.5)), "seed": int_param("attention.heatmap.seed", hm.get("seed", 100), 0)},
    }
    if not 0 <= cfg["heatmap"]["depth"] <= 1:
        raise ParamError(f"attention.heatmap.depth={cfg['heatmap']['depth']!r} must lie in [0, 1]")
    check_dev_seeds(params, "attention.seeds (with heatmap.seed)", cfg["seeds"] + [cfg["heatmap"]["seed"]])
    return cfg


def _spans(tok, sample, n_cached: int):
    from smartkv.analysis.attention import char_span_to_tokens

    offsets = tok(sample.prompt, return_offsets_mapping=True)["offset_mapping"]
    needle = char_span_to_tokens(offsets, sample.meta["needle_char_span"])
    q = char_span_to_tokens(offsets, (sample.meta["haystack_char_span"][1], len(sample.prompt)))
    question = (q[0], n_cached) if q is not None and q[0] < n_cached else None
    return needle, question


def analyse(model, tok, sample, cfg: dict, device: str) -> tuple[list[dict], object]:
    """Rows of statistics for one prompt (three phases), and its recording."""
    from smartkv.analysis.attention import tracker_rows
    from smartkv.analysis.recorder import record_decode, record_prefill
    from smartkv.runner import encode

    ids, _ = encode(tok, [sample.prompt], device=device)
    rec = record_prefill(model, ids, window=cfg["obs_window"])
    n = len(rec.cache.layers)
    t = rec.cache.layers[0].keys.shape[-2]
    groups = model.config.num_attention_heads // getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    needle, question = _spans(tok, sample, t)
    _, dec = record_decode(model, rec, cfg["decode_steps"])
    kw = dict(n_layers=n, sinks=cfg["sink_tokens"], groups=groups, needle=needle, question=question)
    rows = (tracker_rows(rec.tracker, "prefill", **kw) + tracker_rows(rec.window_tracker, "window", **kw)
            + tracker_rows(dec, "decode", n_tokens=t, **kw))
    meta = {"sample_id": sample.sample_id, "task": sample.task, "length": sample.context_length,
            "depth": sample.depth, "prompt_tokens": int(ids.shape[1])}
    return [{**meta, **r} for r in rows], rec


def heatmap(model, tok, cfg: dict, device: str) -> None:
    from smartkv.analysis.attention import layer_distribution
    from smartkv.analysis.figures import attention_heatmap
    from smartkv.analysis.recorder import record_prefill
    from smartkv.runner import encode
    from smartkv.tasks import generate_task

    hm = cfg["heatmap"]
    sample = generate_task(hm["task"], tok, n_per_cell=1, lengths=[hm["length"]], depths=[hm["depth"]], seed=hm["seed"])[0]
    ids, _ = encode(tok, [sample.prompt], device=device)
    rec = record_prefill(model, ids, window=cfg["obs_window"])
    t = rec.cache.layers[0].keys.shape[-2]
    needle, _ = _spans(tok, sample, t)
    tokens = tok.convert_ids_to_tokens(ids[0, :t].tolist())
    n = len(rec.cache.layers)
    panels = {"every prompt query (accumulated, H2O)": layer_distribution(rec.tracker, n).cpu().numpy(),
              f"last {cfg['obs_window']} prompt queries (SnapKV window: the question)":
                  layer_distribution(rec.window_tracker, n).cpu().numpy()}
    attention_heatmap(panels, tokens, needle, OUT_PLOT,
                      title=f"Attention received per token, {hm['task']} prompt of {t + 1} tokens, needle at depth "
                            f"{hm['depth']:.0%} (seed {hm['seed']}); heads summed")


@stage_main
def main(params: dict) -> None:
    import pandas as pd

    from smartkv.analysis.attention import summarize
    from smartkv.io import atomic_write_json, atomic_write_parquet, provenance
    from smartkv.tasks import generate_task

    cfg = settings(params)
    model, tok, device = load_study_model(params)
    samples = [s for seed in cfg["seeds"] for task in cfg["tasks"] for s in generate_task(
        task, tok, n_per_cell=cfg["n_per_cell"], lengths=cfg["lengths"], depths=cfg["depths"], seed=seed)]
    rows, start = [], time.perf_counter()
    for i, s in enumerate(samples):
        rows += analyse(model, tok, s, cfg, device)[0]
        log.info("attention %d/%d %s (%.0f s)", i + 1, len(samples), s.sample_id, time.perf_counter() - start)
    df = pd.DataFrame(rows)
    atomic_write_parquet(df, OUT_DATA, provenance({"attention": cfg, "model": get(params, "model")}))
    atomic_write_json(OUT_METRICS, {"config": cfg, "n_prompts": len(samples), "phases": summarize(df)})
    heatmap(model, tok, cfg, device)


if __name__ == "__main__":
    main()
