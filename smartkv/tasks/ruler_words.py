"""RULER aggregation tasks (Hsieh et al. 2024, Sec. 3.3): common words extraction (CWE) and
frequent words extraction (FWE).

CWE: a numbered list where a few words appear `freq_common` times and many others
`freq_uncommon` times (RULER: 30 and 3); the answer is the common words. Longer contexts add
uncommon words, not common occurrences. FWE: coded (nonsense) words drawn with a Zipf law of
exponent `alpha` (RULER: 2.0); the answer is the three most frequent. Both use
string_match_all. We ask for 4 and 3 words (RULER: 10 and 3) so answers fit ~32 tokens.
"""

from __future__ import annotations

from typing import Any

from smartkv.tasks.filler import SentenceStream, distinct_word_maker, english_words, rng_for
from smartkv.tasks.registry import register_task
from smartkv.tasks.sample import Sample
from smartkv.tasks.sizing import fit_units

CWE_HEADER = (
    "Below is a numbered list of words. Some of the words appear more often than others. "
    "Memorize the ones that appear most often.\n\n"
)
FWE_HEADER = (
    "Read the following coded text and keep track of how often each coded word appears. "
    "You will be asked for the most frequent coded words.\n\n"
)


def _cwe_prompt(common, uncommon, fc, fu, shuffle_key, question):
    words = [w for w in common for _ in range(fc)] + [w for w in uncommon for _ in range(fu)]
    rng_for(*shuffle_key, len(uncommon)).shuffle(words)
    body = " ".join(f"{k + 1}. {w}" for k, w in enumerate(words))
    return CWE_HEADER + body + question


@register_task("ruler_cwe", "RULER common words extraction from a numbered word list", uses_depth=False)
def generate_cwe(
    tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
    num_common: int = 4, freq_common: int = 30, freq_uncommon: int = 3,
) -> list[Sample]:
    if freq_common <= freq_uncommon:
        raise ValueError(f"ruler_cwe: freq_common ({freq_common}) must exceed freq_uncommon ({freq_uncommon})")
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = ("ruler_cwe", seed, length, i)
            rng = rng_for(*key, "case")
            english = english_words()
            rng.shuffle(english)
            common, rest = english[:num_common], english[num_common:]
            # Real words first, then pseudo-words once the small English list runs out.
            pool = SentenceStream(rng_for(*key, "pool"), distinct_word_maker(set(english)))
            question = (
                f"\n\nQuestion: What are the {num_common} most common words in the list above? "
                f"Answer: The {num_common} words that appear most often in the list are:"
            )

            def build(n, fc):
                uncommon = rest[:n] + pool.take(max(0, n - len(rest)))
                return _cwe_prompt(common, uncommon, fc, freq_uncommon, key, question)

            # Short contexts cannot hold 4 x 30 occurrences; halve the common frequency (never
            # to or below the uncommon one) until the list fits, and record what was used.
            fc = freq_common
            while True:
                try:
                    n, prompt = fit_units(lambda n: build(n, fc), lambda s: s, tokenizer, length, what="ruler_cwe")
                    break
                except ValueError:
                    if fc <= freq_uncommon + 1:
                        raise
                    fc = max(freq_uncommon + 1, fc // 2)
            samples.append(Sample(
                task="ruler_cwe",
                sample_id=f"ruler_cwe-s{seed}-L{length}-{i}",
                prompt=prompt,
                answers=list(common),
                metric="ruler_all",
                context_length=length,
                depth=None,
                meta={"freq_common": fc, "freq_uncommon": freq_uncommon, "num_uncommon": n},
            ))
    return samples


def zipf_counts(total: int, alpha: float) -> list[int]:
    """Occurrences per rank for `total` words under a Zipf law, deterministic (no sampling):
    floor(total * k^-alpha / H) for ranks whose share is at least 2, then singletons for the
    remainder so the counts sum to `total`."""
    weights = [k ** -alpha for k in range(1, total + 1)]
    norm = sum(weights)
    counts = []
    for w in weights:
        c = int(total * w / norm)
        if c < 2:
            break
        counts.append(c)
    return counts + [1] * (total - sum(counts))


@register_task("ruler_fwe", "RULER frequent words extraction from Zipf-distributed coded words", uses_depth=False)
def generate_fwe(
    tokenizer: Any, *, n_per_cell: int, lengths: list[int], depths: list[float], seed: int,
    num_top: int = 3, alpha: float = 2.0,
) -> list[Sample]:
    samples = []
    for length in lengths:
        for i in range(n_per_cell):
            key = ("ruler_fwe", seed, length, i)
            vocab = SentenceStream(rng_for(*key, "vocab"), distinct_word_maker())
            question = (
                f"\n\nQuestion: What are the {num_top} most frequent coded words in the text above? "
                f"Answer: According to the coded text above, the {num_top} most frequent coded words are:"
            )

            def build(n):
                counts = zipf_counts(n, alpha)
                names = vocab.take(len(counts))
                words = [w for w, c in zip(names, counts) for _ in range(c)]
                rng_for(*key, "shuffle", n).shuffle(words)
                return FWE_HEADER + " ".join(words) + question, counts

            n, (prompt, counts) = fit_units(build, lambda b: b[0], tokenizer, length, what="ruler_fwe")
            # The top words must be strictly more frequent than the next, or the answer is ambiguous.
            if len(counts) <= num_top or any(counts[k] <= counts[k + 1] for k in range(num_top)):
                raise ValueError(
                    f"ruler_fwe: length {length} holds only {n} coded words, too few for a clear top {num_top}"
                )
            samples.append(Sample(
                task="ruler_fwe",
                sample_id=f"ruler_fwe-s{seed}-L{length}-{i}",
                prompt=prompt,
                answers=vocab.take(num_top),
                metric="ruler_all",
                context_length=length,
                depth=None,
                meta={"top_counts": counts[: num_top + 1], "num_words": n, "alpha": alpha},
            ))
    return samples
