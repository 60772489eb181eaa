"""Would the kvpress peers do better if their press also saw the prompt's last query?

Run in the kvpress venv from the repository root, after `dvc repro prepare`:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv-kvpress/bin/python docs/probes/kvpress_last_query_probe.py

The study's peers (`smartkv.kvpress_peers`) prefill the prompt minus its last token under the
press, then feed the last token through the compressed cache: the press never scores with the
query of the prompt's last token, which SmartKV's ranking now sees (`smartkv/last_query.py`).
This probe runs the protocol most generous to a press instead, kvpress's own usage: the whole
prompt is prefilled inside `with press(model):`, so the press scores with every prompt query, the
last one included, and the first answer token is read from that uncompressed prefill's logits;
the rest of the gold answer is then fed teacher-forced through the compressed cache, as the
study scores it (exact = the argmax is the gold token at every step). Where a press scores
(near) zero under this protocol too, the missing query is not what makes it lose.

Measured 2026-12-04 (SmolLM2-135M, float32, 45 test needles: the first 30 at 1k and 15 at 2k in
seed order; `kvpress_last_query_probe.txt`): SnapKV 0/45, StreamingLLM 9/45, ExpectedAttention
0/45 at 0.15 kept, the same counts the study's protocol gives these 45 prompts in the committed
`data/peers.parquet` (0, 9, 0).
"""

from __future__ import annotations

import sys

import torch

from smartkv.answer_scores import target_ids
from smartkv.kvpress_peers import PeerSpec, load, make_press, prompt_ids
from smartkv.study.driver import read_tasks
from stages.peers import model_dir

N_PER_LENGTH = {1024: 30, 2048: 15}
# 0.15 kept only: at 0.10 every press already scores 0 of 210 in the study
SPECS = [PeerSpec(f"{p}-k0.15", p, 0.15) for p in ("snapkv", "streaming_llm", "expected_attention")]


def generous_exact(model, tok, sample, spec) -> bool:
    ids = prompt_ids(model, tok, sample)
    gold = target_ids(tok, sample.prompt, sample.target)
    press = make_press(spec)
    with torch.no_grad(), press(model):
        out = model(input_ids=ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[0, -1]
    pos = ids.shape[1]
    with torch.no_grad():
        for step, g in enumerate(gold):
            if int(logits.argmax()) != g:
                return False
            if step + 1 == len(gold):
                return True
            logits = model(input_ids=torch.tensor([[g]]), past_key_values=cache,
                           position_ids=torch.tensor([[pos + step]]), use_cache=True).logits[0, -1]
    return True


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load(model_dir("default"))
    pool = [s for seed, ss in sorted(read_tasks("data/tasks.parquet", "test").items()) for s in ss if s.task == "niah"]
    samples = []
    for length, n in N_PER_LENGTH.items():
        samples += [s for s in pool if s.context_length == length][:n]
    print(f"{len(samples)} test needle prompts, in seed order ({N_PER_LENGTH})", flush=True)
    for spec in SPECS:
        found = sum(generous_exact(model, tok, s, spec) for s in samples)
        print(f"{spec.label}: {found}/{len(samples)} (whole prompt under the press, first token from the prefill)",
              flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
