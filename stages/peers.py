"""Stage `peers`: eviction peers through NVIDIA kvpress on the prepared tasks -> data/peers.parquet.

kvpress 0.5.5 pins transformers<5.3, so this stage runs in its own venv (`make venv-kvpress`):

    .venv-kvpress/bin/python -m stages.peers

(The peers chosen on dev, and run on a section's cells, are `stages.peers_tuning`.)

It therefore does not go through `stage_main` (whose error handling imports SmartKV's method
registry, built on transformers 5.23) and imports only the torch-free or transformers-free parts
of `smartkv` (see `smartkv.kvpress_peers`). Params: `peers: [{label, press, kept}]` (`press`
one of `smartkv.kvpress_peers.PRESSES`, `kept` the fraction of the prompt's KV pairs a press
keeps), and the shared `model`, `dtype`, `device`, `max_new_tokens`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import sys
import time
from pathlib import Path

from smartkv.kvpress_peers import PRESSES, PeerSpec
from smartkv.study.params import (PARAMS_FILE, ParamError, check_positive_int, device_setting, get, is_num,
                                  load_params, model_settings, study_split)
from stages.common import DATA, METRICS, TASKS_FILE, TIMINGS_PEERS

PEERS_FILE = DATA / "peers.parquet"
log = logging.getLogger("stages.peers")


class EnvironmentMissing(RuntimeError):
    """The stage runs under a Python without kvpress (not a params problem)."""


def peer_specs(params: dict) -> list[PeerSpec]:
    """Validated `peers` entries, in params order."""
    entries = get(params, "peers")
    if not isinstance(entries, list) or not entries:
        raise ParamError(f"peers={entries!r} must list at least one run (label, press, kept)")
    specs = []
    for i, e in enumerate(entries):
        key = f"peers[{i}]"
        if not isinstance(e, dict):
            raise ParamError(f"{key}={e!r} must be a mapping with label, press, kept")
        unknown = sorted(set(e) - {"label", "press", "kept"})
        if unknown:
            raise ParamError(f"{key}: unknown key(s) {', '.join(map(str, unknown))}; allowed: label, press, kept")
        label, press = e.get("label"), e.get("press")
        if not isinstance(label, str) or not label:
            raise ParamError(f"{key}.label={label!r} must be a non-empty string")
        if press not in PRESSES:
            raise ParamError(f"{key}.press={press!r}: unknown press; known: {', '.join(PRESSES)}")
        kept = e.get("kept", 1.0 if press == "none" else None)
        if not is_num(kept) or not 0.0 < float(kept) <= 1.0:
            raise ParamError(f"{key}.kept={kept!r} must be the kept fraction of the KV cache, in (0, 1]")
        if PRESSES[press] is None and not math.isclose(float(kept), 1.0):
            raise ParamError(f"{key}.kept={kept!r}: press `none` keeps everything (kept: 1.0)")
        specs.append(PeerSpec(label, press, float(kept)))
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ParamError(f"peers: duplicate label(s) {', '.join(dup)}")
    return specs


def peers_split(params: dict) -> str:
    """The peers run on the study's split (`split`), like SmartKV, so that they pair prompt by prompt."""
    return study_split(params)


def peer_tasks(params: dict) -> list[str]:
    """`peers_tasks`: the tasks the peers run on. Each press needs a prefill of its own (it
    compresses while prefilling), so on a CPU the default study limits them to the needle task."""
    tasks = get(params, "peers_tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ParamError(f"peers_tasks={tasks!r} must be a non-empty list of task names")
    return tasks


def peer_seeds(params: dict) -> list[int]:
    """`peers_seeds`: the seeds of the split the peers run on (a subset, to bound their cost)."""
    seeds = get(params, "peers_seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                          for x in seeds):
        raise ParamError(f"peers_seeds={seeds!r} must be a non-empty list of seeds of the {peers_split(params)!r} split")
    return seeds


def model_dir(model: str) -> str:
    """The local folder to load: the converted default model, or the `model` param itself."""
    if model == "default":
        from smartkv.models import default_model_dir

        folder = default_model_dir()
        if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
            raise ParamError(f"model=default: no converted model in {folder}; run the prepare stage first "
                             "(`dvc repro prepare` converts it, in the main venv)")
        return str(folder)
    if Path(model).exists() and not Path(model).is_dir():
        raise ParamError(f"model={model!r} is a file; give the model's folder")
    return model  # a folder or a Hugging Face id, resolved by transformers


def run(params: dict) -> None:
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.kvpress_peers import evaluate_peers, load
    from smartkv.study.driver import read_tasks, split_timings

    specs = peer_specs(params)
    name, dtype = model_settings(params)
    device = device_setting(params)
    new_tokens = check_positive_int("max_new_tokens", get(params, "max_new_tokens"))
    folder = model_dir(name)
    if not TASKS_FILE.is_file():
        raise ParamError(f"{TASKS_FILE} not found: run the prepare stage first (`dvc repro prepare`)")
    if importlib.util.find_spec("kvpress") is None:
        raise EnvironmentMissing(f"kvpress is not installed for {sys.executable}; run this stage with "
                         ".venv-kvpress/bin/python (`make venv-kvpress` makes it)")
    import torch

    torch.manual_seed(0)
    wanted, seeds = peer_tasks(params), peer_seeds(params)
    tasks = {seed: [x for x in samples if x.task in wanted]
             for seed, samples in read_tasks(TASKS_FILE, peers_split(params)).items() if seed in seeds}
    if not any(tasks.values()):
        raise ParamError(f"peers_tasks={wanted!r}, peers_seeds={seeds!r}: no prepared sample of the "
                         f"{peers_split(params)!r} split has these tasks and seeds")
    model, tokenizer = load(folder, dtype, device)
    df = evaluate_peers(model, tokenizer, tasks, specs, max_new_tokens=new_tokens, log=log)
    order = {s.label: i for i, s in enumerate(specs)}
    df = df.sort_values(["seed", "task", "sample_id", "run"], key=lambda s: s.map(order) if s.name == "run" else s,
                        kind="stable").reset_index(drop=True)
    config = {"model": name, "dtype": dtype, "device": device, "max_new_tokens": new_tokens, "tasks": wanted, "seeds": seeds,
              "split": peers_split(params),
              "peers": [s.config() | {"label": s.label} for s in specs],
              "protocol": "question-aware: the whole prompt but its last token is prefilled under the press"}
    meta = provenance(config)
    meta["versions"]["kvpress"] = importlib.metadata.version("kvpress")
    df["split"] = peers_split(params)
    # wall clock apart (data/timings/peers.parquet), so the results' hash depends on content only
    results, timings = split_timings(df)
    atomic_write_parquet(results, PEERS_FILE, meta)
    atomic_write_parquet(timings, TIMINGS_PEERS, meta)
    log.info("wrote %s: %d rows (%d peers x %d samples)", PEERS_FILE, len(df), len(specs), len(df) // len(specs))


def _run_specs(params: dict, tasks: dict, specs: list, config: dict, out, timings_out):
    """`specs` on `tasks` ({seed: samples}) in the kvpress venv; results and wall clock apart."""
    from smartkv.io import atomic_write_parquet, provenance
    from smartkv.kvpress_peers import evaluate_peers, load
    from smartkv.study.driver import split_timings

    name, dtype = model_settings(params)
    device = device_setting(params)
    new_tokens = check_positive_int("max_new_tokens", get(params, "max_new_tokens"))
    if importlib.util.find_spec("kvpress") is None:
        raise EnvironmentMissing(f"kvpress is not installed for {sys.executable}; run this stage with "
                                 ".venv-kvpress/bin/python (`make venv-kvpress` makes it)")
    import torch

    torch.manual_seed(0)
    model, tokenizer = load(model_dir(name), dtype, device)
    df = evaluate_peers(model, tokenizer, tasks, specs, max_new_tokens=new_tokens, log=log)
    order = {s.label: i for i, s in enumerate(specs)}
    df = df.sort_values(["seed", "task", "sample_id", "run"], key=lambda s: s.map(order) if s.name == "run" else s,
                        kind="stable").reset_index(drop=True)
    meta = provenance({"model": name, "dtype": dtype, "device": device, "max_new_tokens": new_tokens, **config,
                       "peers": [s.config() | {"label": s.label} for s in specs],
                       "protocol": "question-aware: the whole prompt but its last token is prefilled under the press"})
    meta["versions"]["kvpress"] = importlib.metadata.version("kvpress")
    results, timings = split_timings(df)
    from stages.common import row_provenance

    atomic_write_parquet(results.assign(**row_provenance(device)), out, meta)
    atomic_write_parquet(timings, timings_out, meta)
    log.info("wrote %s: %d rows (%d presses)", out, len(df), len(specs))
    return results


def kvpress_main(name: str, body) -> None:
    """The kvpress stages' entry point (they cannot use `stage_main`, see above): logging, then
    `body()`, a bad param or a missing kvpress as one line and exit 2."""
    logging.basicConfig(level=os.environ.get("SMARTKV_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        body()
    except ParamError as err:
        print(f"error: {PARAMS_FILE}: {err}", file=sys.stderr)
        sys.exit(2)
    except EnvironmentMissing as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info("stage %s done in %.1f s", name, time.perf_counter() - start)


def main() -> None:
    kvpress_main("peers", lambda: run(load_params()))


if __name__ == "__main__":
    main()
