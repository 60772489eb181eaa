"""The `Sample` of a pass-key prompt built by `build_haystack`: shared by `niah` and `passkey`,
which differ in their filler and keys, not in what a sample records."""

from __future__ import annotations

from smartkv.tasks.haystack import Haystack
from smartkv.tasks.sample import Sample


def passkey_sample(task: str, sample_id: str, hay: Haystack, passkey: str, length: int, depth: float,
                   target: str = "") -> Sample:
    """One pass-key prompt, scored by whether the answer contains the key; the first needle's
    and the haystack's character spans go to `meta` (needle analysis reads them)."""
    return Sample(
        task=task,
        sample_id=sample_id,
        prompt=hay.prompt,
        answers=[passkey],
        metric="contains",
        context_length=length,
        depth=depth,
        meta={"needle_char_span": hay.needle_spans[0], "haystack_char_span": hay.haystack_span},
        target=target,
    )
