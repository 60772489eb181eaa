"""Why kvpress's SnapKV scores 0 on the study's needles: keep-fraction sweep and the tokens it evicts first.

Run in the kvpress venv from the repository root, after `dvc repro prepare`:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv-kvpress/bin/python docs/probes/kvpress_keep_probe.py

Part 1 scores the first 10 1k needle prompts of test seed 0 under SnapKV, ExpectedAttention and
StreamingLLM at several kept fractions (the stage's own `run_sample`). Part 2 prints, for a few
layers, the 12 positions SnapKV scores lowest in each KV head, beside the pass key's digit tokens.
Measured 2026-11-28 (SmolLM2-135M, float32): SnapKV 2/10 at 0.99 kept and 0/10 at 0.9, against
StreamingLLM 10/10 at both and no press 10/10; in layer 0 SnapKV's lowest scores fall on the
ten digit tokens of the key (two KV heads of three) and on the BOS token (one head), so with the
same ratio in every layer it evicts the needle from layer 0 first.
"""

from __future__ import annotations

import torch

from smartkv.kvpress_peers import PeerSpec, load, make_press, prompt_ids, record_prefill, run_sample
from smartkv.study.driver import read_tasks
from stages.peers import model_dir


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load(model_dir("default"))
    samples = [s for s in read_tasks("data/tasks.parquet", "test")[0]
               if s.task == "niah" and s.context_length == 1024][:10]
    for kept in (0.99, 0.9, 0.5, 0.15):
        for press in ("snapkv", "expected_attention", "streaming_llm"):
            scores = [run_sample(model, tok, s, PeerSpec(f"{press}-{kept}", press, kept), 8)["score"] for s in samples]
            print(f"{press} kept {kept}: {sum(scores):.0f}/{len(scores)}", flush=True)
    none = [run_sample(model, tok, s, PeerSpec("none", "none", 1.0), 8)["score"] for s in samples]
    print(f"no press: {sum(none):.0f}/{len(none)}")

    s = samples[0]
    ids = prompt_ids(model, tok, s)[:, :-1]
    digits = [i for i, t in enumerate(ids[0].tolist()) if tok.decode([t]).strip().isdigit()]
    print("digit token positions", digits, "of", ids.shape[1])
    base, records = record_prefill(model, ids)
    press = make_press(PeerSpec("s", "snapkv", 0.99))
    press.post_init_from_model(model)
    with torch.no_grad():
        for li in (0, 10, 20, len(records) - 1):
            module, kwargs, _ = records[li]
            score = press.score(module, kwargs["hidden_states"], base.layers[li].keys, base.layers[li].values,
                                None, kwargs)
            low = score[0].argsort(dim=-1)[:, :12].tolist()
            print(f"layer {li}: lowest-scored positions per KV head", [sorted(h) for h in low])


if __name__ == "__main__":
    main()
