"""The C++ fold of a decode query's attention into the tracker (tracker_step.cpp) is the PyTorch path, bit for bit.

`ImportanceTracker.observe_weights` folds the packed kernel's softmax weights into each statistic
in one C++ pass per statistic when the extension is there (the mass summed over query heads by
torch, as before); `add_step` is the PyTorch path it stands in for. Both run here on the same weights, step after step, and every statistic must be equal
(`torch.equal`, not close): the study's allocations read these bytes. A failed kernel build fails
these tests; they skip only when SMARTKV_NO_KERNEL=1 is set on purpose.
"""

import pytest
import torch

from smartkv import importance
from smartkv.importance import ALL_STATS, ImportanceTracker


def softmax_weights(gen, b, hq, t, masked: bool):
    """Weights as the kernel returns them: a softmax over scores of a real spread, some keys masked."""
    scores = torch.randn(b, hq, t, generator=gen) * 6.0
    if masked:
        scores[torch.rand(b, 1, t, generator=gen).expand(b, hq, t) < 0.2] = float("-inf")
        scores[..., -1] = 0.0  # the query's own key: every row has something to attend
    return torch.softmax(scores, dim=-1)


def pair(keep, dtype, per_head, decay=0.9):
    return (ImportanceTracker(decay=decay, keep=keep, dtype=dtype, per_head=per_head),
            ImportanceTracker(decay=decay, keep=keep, dtype=dtype, per_head=per_head))


def run_steps(monkeypatch, fast, slow, b, hkv, groups, t0, steps, masked, seed, prefill=True):
    """Observe a prompt of t0 keys through the general path (both trackers alike), then `steps` decode
    queries: `fast` through the C++ fold, `slow` through the PyTorch path. Returns the layers."""
    gen = torch.Generator().manual_seed(seed)
    hq, d = hkv * groups, 16
    if prefill:
        q, k = torch.randn(b, hq, 4, d, generator=gen), torch.randn(b, hkv, t0, d, generator=gen)
        for tr in (fast, slow):
            tr.observe(0, q, k, None, d**-0.5)
    for step in range(steps):
        t = t0 + step + 1
        probs = softmax_weights(gen, b, hq, t, masked)
        allowed = (probs[:, 0] > 0) if masked else None
        fast.observe_weights(0, probs, hkv, allowed)
        with monkeypatch.context() as m:
            m.setattr(importance, "_kernel_fold", lambda mass: None)
            slow.observe_weights(0, probs, hkv, allowed)
    return fast.layers[0], slow.layers[0]


def assert_same(a, b):
    assert a.keep == b.keep and a.n_tokens == b.n_tokens and a.queries == b.queries
    for name in a.keep:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name}: {int((x != y).sum())} of {x.numel()} values differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hkv,groups", [(1, 1), (1, 4), (2, 3), (3, 7), (5, 3), (4, 8), (2, 16)])
def test_fold_is_the_pytorch_path(kernel, monkeypatch, dtype, per_head, hkv, groups):
    fast, slow = pair(ALL_STATS, dtype, per_head)
    a, b = run_steps(monkeypatch, fast, slow, b=2, hkv=hkv, groups=groups, t0=37, steps=5, masked=True,
                     seed=hkv * 100 + groups)
    assert a.queries == 4 + 5  # the prompt's four queries, then five decode queries
    assert_same(a, b)


@pytest.mark.parametrize("signal", ["ema", "window", "cumulative", "normalized"])
@pytest.mark.parametrize("t0", [1, 31, 200, 1029])
def test_fold_per_signal_and_length(kernel, monkeypatch, signal, t0):
    """What a SmartKV cache keeps (one signal, FP16), at lengths on and off the vector width."""
    fast = ImportanceTracker.for_signal(signal, decay=0.85)
    slow = ImportanceTracker.for_signal(signal, decay=0.85)
    a, b = run_steps(monkeypatch, fast, slow, b=1, hkv=5, groups=3, t0=t0, steps=17, masked=False, seed=t0)
    assert_same(a, b)


def test_fold_without_a_prefill_starts_like_the_pytorch_path(kernel, monkeypatch):
    """A layer first seen at a decode query (no prompt observed): the window statistic's first fold
    replaces instead of decaying, on both paths."""
    fast, slow = pair(("window", "ema"), torch.float16, True)
    a, b = run_steps(monkeypatch, fast, slow, b=3, hkv=2, groups=2, t0=9, steps=4, masked=False, seed=3,
                     prefill=False)
    assert_same(a, b)


def test_fold_changes_the_statistics(kernel, monkeypatch):
    """Not vacuous: a fold moves the EMA off its old values and gives the new token its mass."""
    fast, slow = pair(("ema",), torch.float32, True)
    a, _ = run_steps(monkeypatch, fast, slow, b=1, hkv=1, groups=2, t0=8, steps=0, masked=False, seed=1)
    before = a.ema.clone()
    probs = torch.full((1, 2, 9), 1.0 / 9)
    fast.observe_weights(0, probs, 1, None)
    after = fast.layers[0].ema
    assert after.shape[-1] == 9
    expected = before * 0.9 + (2.0 / 9) * (1 - 0.9)
    assert torch.allclose(after[..., :8], expected) and not torch.equal(after[..., :8], before)
    assert torch.allclose(after[..., 8], torch.tensor(2.0 / 9 * (1 - 0.9)))


def test_fold_rejects_what_it_cannot_take(kernel):
    fold = kernel.kernel_module().fold_attention_step
    mass = torch.rand(1, 2, 10)
    with pytest.raises(RuntimeError, match="does not fit"):
        fold(torch.zeros(1, 3, 9), mass, 0.9, 0.1)  # other heads
    with pytest.raises(RuntimeError, match="does not fit"):
        fold(torch.zeros(1, 2, 11), mass, 0.9, 0.1)  # more tokens held than the query saw
    with pytest.raises(RuntimeError, match="not one of"):
        fold(torch.zeros(1, 2, 9, dtype=torch.float64), mass, 0.9, 0.1)
    with pytest.raises(RuntimeError, match="float32"):
        fold(torch.zeros(1, 2, 9), mass.double(), 0.9, 0.1)
