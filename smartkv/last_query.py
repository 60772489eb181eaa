"""Rank from every prompt query: the prompt's last token attended once more, for the statistics only.

`runner.prefill` leaves the prompt's last token out, so that `generate` feeds it through each
forked method's own cache and the first answer token is read from that cache's (quantized)
keys. The price of that split is that the forks allocate from statistics that never saw the
one prompt query that produces the first answer token. A SmartKV cache driven by
`model.generate` itself has no such gap: it allocates at the first decode step, after the
whole prompt was attended.

`attend_last_query` closes the gap on a prefill: the last prompt token goes once through the
prefill's FP16 tracking cache, so its attention folds into the statistics (as one decode
query, the way `generate`'s first step folds it), and then its key and value are dropped, so
the forks still hold the prompt minus its last token and `generate` still feeds it through
their caches. The statistics of the kept tokens are exactly those of an FP16 generation cut
after one step (`runner.oracle_tracker(model, pre, 1)`, the probe's `lookahead-1`): the
docs/internals.md, "The missing query", measures what that ranking is worth at 4k tokens.

The study's forks (`smartkv.evaluate`), the command line's `generate`, `demo` and `bench` fork
from such a prefill.
"""

from __future__ import annotations

import time

import torch

from smartkv.cache.base import clear_active_update
from smartkv.runner import Prefill, positions


@torch.no_grad()
def attend_last_query(model, pre: Prefill) -> Prefill:
    """Fold the attention of the prompt's last token into `pre`'s importance statistics and
    leave its keys and values as they were (the prompt minus its last token). In place; returns
    `pre`, its `seconds` including this forward. A prefill that tracked nothing is left alone."""
    cache = pre.cache
    if cache.tracker is None:
        return pre
    held = cache.get_seq_length()
    if held != pre.input_ids.shape[1] - 1:
        raise ValueError(f"attend_last_query expects a prefill of the prompt minus its last token "
                         f"({pre.input_ids.shape[1] - 1} tokens); the cache holds {held}")
    start = time.perf_counter()
    model(input_ids=pre.input_ids[:, -1:], attention_mask=pre.attention_mask, past_key_values=cache,
          position_ids=positions(pre.attention_mask)[:, -1:], use_cache=True, logits_to_keep=1)
    clear_active_update()
    cache.crop(-1)  # the key and value go; what the query added to the kept tokens stays
    pre.seconds += time.perf_counter() - start
    return pre
