"""Paired per-prompt measures of a cache from its teacher-forced logits over the gold answer.

A right/wrong bit per prompt carries little power when methods differ on a few prompts
(issue 8, "Power"). Teacher forcing the gold answer through each method's cache gives, at
the cost of one forward of the answer tokens:

- `forced_exact`: 1 if the argmax at every answer position is the gold token, i.e. greedy
  decoding would write the answer (exact match, as passkey retrieval is scored);
- `answer_logprob`: the gold answer's mean log-likelihood per token (for perplexity tasks its
  negative is the continuation's NLL);
- `kl_fp16`: the mean over answer positions of KL(p_FP16 || p_method) of the next-token
  distribution, against FP16 logits computed once per prompt (the distortion measure of
  KV-cache quantization work, e.g. KVQuant, Hooper et al. 2024, reports it beside perplexity).
"""

from __future__ import annotations

import torch


def target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of `target` as they follow `prompt`.

    Taken from the joint encoding when the prompt's own tokens are its prefix (a BPE merge
    across the boundary would otherwise give tokens the model never sees after this prompt);
    else from `target` alone.
    """
    if not target:
        raise ValueError("target is empty: nothing to teacher-force")
    head = tokenizer.encode(prompt, add_special_tokens=False)
    joint = tokenizer.encode(prompt + target, add_special_tokens=False)
    if joint[: len(head)] == head and len(joint) > len(head):
        return joint[len(head):]
    return tokenizer.encode(target, add_special_tokens=False)


def answer_measures(logits: torch.Tensor, target: torch.Tensor, ref_logprobs: torch.Tensor | None) -> dict:
    """`forced_exact`, `answer_logprob`, `kl_fp16` (NaN without a reference) and the argmax ids.

    logits [n, vocab] predict target [n]; ref_logprobs [n, vocab] are FP16's log-softmax.
    """
    target = target.reshape(-1)
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {target.shape[0]} target tokens")
    logp = torch.log_softmax(logits.float(), dim=-1)
    gold = logp.gather(1, target[:, None]).squeeze(1)
    argmax = logp.argmax(dim=-1)
    kl = float("nan")
    if ref_logprobs is not None:
        if ref_logprobs.shape != logp.shape:
            raise ValueError(f"reference log-probs {tuple(ref_logprobs.shape)} do not match logits {tuple(logp.shape)}")
        kl = float((ref_logprobs.exp() * (ref_logprobs - logp)).sum(dim=-1).clamp_min(0.0).mean())
    return {
        "forced_exact": float(bool((argmax == target).all())),
        "answer_logprob": float(gold.mean()),
        "kl_fp16": kl,
        "argmax": argmax.tolist(),
    }
