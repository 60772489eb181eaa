"""Long-context perplexity: how well the model predicts a continuation after `length` tokens.

KV-cache quantization papers (KIVI, Liu et al. 2024; KVQuant, Hooper et al. 2024) report
perplexity on long text (PG-19, WikiText-2). Offline, we generate our own "village
chronicle": a cast whose homes, trades and belongings are fixed per sample and restated
throughout, so the context carries facts that make the continuation predictable, and damage
to old cached tokens shows up as a worse perplexity.

The prompt is the first ~`length` tokens of the text; `target` (and meta["continuation"])
holds the next `continuation_tokens` (default 512) tokens or a sentence more, starting with the separating
space, so prompt + continuation is the whole text. The continuation is teacher-forced through
each method's cache in forwards of 16 tokens (`smartkv.runner.forced_logits`), so a cache that
adapts while decoding adapts within it, and its NLL is paired over prompts.
"""

from __future__ import annotations

from random import Random
from typing import Any, Callable

from smartkv.tasks.filler import ADJECTIVES, OBJECTS, PLACES, TIMES, SentenceStream, filler_sentence, rng_for
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample
from smartkv.tasks.sizing import count_tokens, fit_units

NAMES = ["Mara", "Tobin", "Elsa", "Joren", "Ilka", "Bram", "Nessa", "Orrin", "Petra", "Caleb", "Wren", "Dario"]
TRADES = ["weaver", "smith", "potter", "miller", "baker", "cooper", "tailor", "mason", "fisher", "carter"]
HOMES = ["the mill", "the harbor", "the orchard", "the old tower", "the bridge", "the market square",
         "the chapel", "the stone farm"]


def _make_world(rng: Random, size: int = 6) -> list[dict[str, str]]:
    names = rng.sample(NAMES, size)
    return [
        {"name": n, "trade": rng.choice(TRADES), "home": rng.choice(HOMES),
         "thing": rng.choice(OBJECTS), "mood": rng.choice(ADJECTIVES)}
        for n in names
    ]


def _story_sentence(world: list[dict[str, str]]) -> Callable[[Random], str]:
    templates = [
        lambda a, b, r: f"{a['name']} the {a['trade']} lived near {a['home']}.",
        lambda a, b, r: f"{r.choice(TIMES)}, {a['name']} carried {a['thing']} back to {a['home']}.",
        lambda a, b, r: f"{a['name']} met {b['name']} the {b['trade']} {r.choice(PLACES)}.",
        lambda a, b, r: f"Everyone knew that {a['thing']} belonged to {a['name']} the {a['trade']}.",
        lambda a, b, r: f"{b['name']} asked {a['name']} to lend {a['thing']} for a day.",
        lambda a, b, r: f"As usual, {a['name']} felt {a['mood']} when walking home to {a['home']}.",
    ]

    def sentence(rng: Random) -> str:
        # One sentence in four is plain filler so the text is not a pure template loop.
        if rng.random() < 0.25:
            return filler_sentence(rng)
        a, b = rng.sample(world, 2)
        return rng.choice(templates)(a, b, rng)

    return sentence


@register_task("perplexity", "long synthetic story: context of `length` tokens + ~512-token continuation",
               uses_depth=False)
def generate(
    tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
    continuation_tokens: int = 512,
) -> list[Sample]:
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = ("perplexity", seed, length, i)
            stream = SentenceStream(rng_for(*key, "text"), _story_sentence(_make_world(rng_for(*key, "world"))))
            n, prompt = fit_units(lambda n: " ".join(stream.take(n)), lambda s: s, tokenizer, length,
                                  what="perplexity context")

            def tail(m: int) -> str:
                # Sentences after the context; the leading space joins them to the prompt.
                return "".join(" " + s for s in stream.take(n + m)[n:])

            m, continuation = fit_units(tail, lambda s: s, tokenizer, continuation_tokens,
                                        what="perplexity continuation")
            if count_tokens(tokenizer, continuation) < continuation_tokens:
                # At least `continuation_tokens`: one more sentence past the largest that fits.
                continuation = tail(m + 1)
            samples.append(Sample(
                task="perplexity",
                sample_id=f"perplexity-s{seed}-L{length}-{i}",
                prompt=prompt,
                answers=[],
                metric="perplexity",
                context_length=length,
                depth=None,
                meta={"continuation": continuation,
                      "continuation_tokens": count_tokens(tokenizer, continuation)},
                target=continuation,
            ))
    return samples
