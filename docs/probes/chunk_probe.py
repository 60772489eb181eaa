"""Dev-seed probe: perplexity NLL of a 512-token continuation teacher-forced in one forward vs in
forwards of 16 tokens, for FP16, INT3, KIVI-2 and SmartKV 0.25 (3 dev prompts, seeds 101-103).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python docs/probes/chunk_probe.py
"""
import sys, time, torch
torch.set_grad_enabled(False)
torch.set_num_threads(1)
from smartkv import runner
from smartkv.runner import RunSpec, encode, forced_logits, fork, memory_of, prefill
from smartkv.models import load_model
from smartkv.tasks import generate_task
from smartkv.evaluate import _target

model, tok = load_model("default")
HEAD = {"bits": [0, 2, 3, 4, 8], "group_size": 64, "window": 32, "window_share": 0.1, "sink_tokens": 4,
        "allocation": "greedy", "signal": "ema", "key_smoothing": True, "prior": 0.5, "decay": 0.9, "realloc_freq": 16, "budget": 0.25}
runs = [RunSpec("fp16", "fp16"), RunSpec("int3", "uniform", {"bits": 3}), RunSpec("kivi-2", "kivi", {"bits": 2}),
        RunSpec("smartkv", "smartkv", HEAD, "smartkv"), RunSpec("smartkv-fixed", "smartkv", {**HEAD, "realloc_freq": 0}, "smartkv")]
res = {}
for seed in [101, 102, 103]:
    s = generate_task("perplexity", tok, n_per_cell=1, lengths=[1024], depths=[], seed=seed, continuation_tokens=512)[0]
    ids, mask = encode(tok, [s.prompt])
    target = _target(tok, s, "cpu")
    pre = prefill(model, ids, mask, 0.9, 64, keep=("ema",))
    for chunk in [511, 16]:
        for r in runs:
            cache, _ = fork(pre, r, model)
            t = time.time()
            lg, _ = forced_logits(model, pre, cache, target, chunk=chunk)
            nll = float(-torch.log_softmax(lg, -1)[torch.arange(target.shape[1]), target[0]].mean())
            m = memory_of(cache)
            res.setdefault((r.label, chunk), []).append((nll, m["ratio"], time.time() - t))
for k, v in sorted(res.items()):
    print(k, "nll %.4f kv %.3f s %.1f" % tuple(sum(x[i] for x in v) / len(v) for i in range(3)))
