"""Dev-seed probe: SmartKV variants vs uniform/KIVI at matched bytes on classic passkey prompts."""
import json, math, random, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
from smartkv.models import load_model
from smartkv.runner import RunSpec, encode, prefill, fork, memory_of
from smartkv.cache.base import clear_active_update

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
def make_prompt(tok, length, depth, rng):
    key = str(rng.randint(10000, 99999))
    head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    q = "\nWhat is the pass key? The pass key is"
    per = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    n = max(1, (length - 80) // per)
    at = int(n * depth)
    text = head + FILLER * at + needle + FILLER * (n - at) + q
    return text, " " + key

@torch.no_grad()
def score(model, pre, cache, ans_ids):
    feed = torch.cat([pre.input_ids[:, -1:], ans_ids[:, :-1]], dim=1)
    mask = torch.ones(1, pre.input_ids.shape[1] + feed.shape[1] - 1, dtype=torch.long)
    logits = model(input_ids=feed, attention_mask=mask, past_key_values=cache, use_cache=True).logits[0].float()
    clear_active_update()
    lp = torch.log_softmax(logits, -1)
    tgt = ans_ids[0]
    logp = float(lp[torch.arange(len(tgt)), tgt].mean())
    exact = bool((logits.argmax(-1) == tgt).all())
    return exact, logp, lp

def main():
    runs = json.loads(open(sys.argv[1]).read())
    n_prompts = int(sys.argv[2])
    model, tok = load_model("default")
    rng = random.Random(100)
    results = {r["label"]: {"acc": 0, "logp": 0.0, "kl": 0.0, "ratio": 0.0, "n": 0} for r in runs}
    results["fp16"] = {"acc": 0, "logp": 0.0, "kl": 0.0, "ratio": 1.0, "n": 0}
    lengths = [int(x) for x in sys.argv[4].split(",")]
    t0 = time.time()
    for i in range(n_prompts):
        L = lengths[i % len(lengths)]
        text, ans = make_prompt(tok, L, [0.1, 0.3, 0.5, 0.7, 0.9][i % 5], rng)
        ids, mask = encode(tok, [text])
        ans_ids = tok(ans, add_special_tokens=False, return_tensors="pt")["input_ids"]
        pre = prefill(model, ids, mask, 0.9)
        c, _ = fork(pre, RunSpec("fp16", "fp16"), model)
        ex, lpv, ref = score(model, pre, c, ans_ids)
        r = results["fp16"]; r["acc"] += ex; r["logp"] += lpv; r["n"] += 1
        for run in runs:
            spec = RunSpec(run["label"], run["method"], run.get("params", {}))
            try:
                cache, _ = fork(pre, spec, model)
                ex, lpv, lp = score(model, pre, cache, ans_ids)
                kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
                mem = memory_of(cache)
            except Exception as e:
                print("ERR", run["label"], e); continue
            r = results[run["label"]]; r["acc"] += ex; r["logp"] += lpv; r["kl"] += kl; r["ratio"] += mem["ratio"]; r["n"] += 1
        print(f"prompt {i} L={ids.shape[1]} {time.time()-t0:.0f}s", flush=True)
    print(f"{'run':28s} {'acc':>6s} {'logp':>8s} {'KL':>8s} {'ratio':>6s}")
    for k, r in results.items():
        n = max(r["n"], 1)
        print(f"{k:28s} {r['acc']:>3d}/{r['n']:<3d} {r['logp']/n:8.3f} {r['kl']/n:8.4f} {r['ratio']/n if k!='fp16' else 1:6.3f}")
main()
