"""Per-token importance from the attention that queries pay to cached keys.

For every layer the tracker keeps, per batch row, KV head and cached token:
- `cumulative`: attention mass summed over every query so far (H2O, Zhang et al. 2023);
- `count`: how many queries could see the token (unmasked), so that `normalized` =
  cumulative / count is the mean attention a token gets while visible (ZipCache, He et
  et al. 2024: accumulated mass favours early tokens just because more queries saw them);
- `ema`: an exponential moving average over queries in order, ema <- decay*ema + (1-decay)*a,
  so recent queries weigh most (at prefill, a soft version of SnapKV's observation window);
- `window`: the attention of the last `obs_window` prompt queries, averaged (SnapKV, Li et
  al. 2024; kvpress's `SnapKVPress` uses a window of 64): the end of a prompt is the question,
  so what it reads is what decoding will read. After the prompt, decode queries update it as
  an EMA with `decay`. Scores can be average-pooled over neighbouring tokens (`score(..., pool)`,
  SnapKV pools over 5) so that a needle's neighbours share its importance;
- the mean attention entropy of the layer, a per-layer sensitivity signal (layer-aware budgets).

Grouped-query attention: the query heads that share a KV head add up. Padded keys get no
mass and are not counted. Shapes: stats are [B, H_kv, T]; `count` is [B, T].

A tracker keeps only the statistics its signal needs (`keep`), in `dtype`. The shared
prefill of the study keeps all of them in float32 (it is FP16 work every method shares);
a SmartKV cache keeps one signal in FP16, and those bytes are part of its memory
(`bytes_per_token`), counted against its budget like codes and scales.
"""

from __future__ import annotations

import math

import torch

SIGNALS = ("cumulative", "normalized", "ema", "window")
# The statistics each signal reads.
NEEDS = {"cumulative": ("cumulative",), "normalized": ("cumulative", "count"), "ema": ("ema",),
         "window": ("window",)}
ALL_STATS = ("cumulative", "ema", "window", "count")
_PER_HEAD = ("cumulative", "ema", "window")  # [B, H, T]; count is [B, T]
# Bound the [B, H, g, q, T] float32 block of scores the prefill materializes at once.
_MAX_SCORE_ELEMENTS = 1 << 24
_ENTROPY_ROWS = 256
_NEG = -1e30  # a finite "minus infinity": softmax gives exactly 0 and p * s stays finite


class LayerImportance:
    def __init__(self, keep: tuple[str, ...] = ALL_STATS, dtype: torch.dtype = torch.float32) -> None:
        self.keep, self.dtype = keep, dtype
        self.cumulative: torch.Tensor | None = None
        self.ema: torch.Tensor | None = None
        self.window: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.n_tokens = 0
        self.queries = 0  # queries observed so far (the first observation is the prompt's)
        self.entropy_sum = 0.0
        self.entropy_rows = 0

    def stats(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.keep if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.stats().values())

    def _grow(self, batch: int, heads: int, n_tokens: int, device) -> None:
        if self.n_tokens == 0 and not self.stats():
            for name in self.keep:
                shape = (batch, heads, 0) if name in _PER_HEAD else (batch, 0)
                setattr(self, name, torch.zeros(shape, device=device, dtype=self.dtype))
        extra = n_tokens - self.n_tokens
        if extra > 0:
            for name, t in self.stats().items():
                setattr(self, name, torch.nn.functional.pad(t, (0, extra)))
            self.n_tokens = n_tokens

    # --- beam search / cropping: statistics follow the batch rows and tokens they belong to ---
    def select_rows(self, index: torch.Tensor) -> None:
        for name, t in self.stats().items():
            setattr(self, name, t.index_select(0, index.to(t.device)))

    def repeat_rows(self, repeats: int) -> None:
        for name, t in self.stats().items():
            setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def reorder_tokens(self, order: torch.Tensor) -> None:
        """Reorder the first order.shape[1] tokens of each row by `order` [B, t] (new j <- old order[b, j]):
        the statistics follow a layer that reorders its prompt sink-first (smartkv/cache/padding.py)."""
        from smartkv.cache.padding import permute_columns

        for name, t in self.stats().items():
            setattr(self, name, permute_columns(t, order))

    def crop(self, n_tokens: int) -> None:
        """Forget tokens from `n_tokens` on. What the dropped tokens' queries added to the kept
        tokens stays (an EMA cannot be unwound): assisted decoding's rejected drafts leave that trace."""
        if self.n_tokens > n_tokens:
            for name, t in self.stats().items():
                setattr(self, name, t[..., :n_tokens].contiguous())
            self.n_tokens = n_tokens

    def _add(self, name: str, value: torch.Tensor, decay: float | None = None) -> None:
        """stat <- stat * decay + value (accumulated in float32, held in `dtype`)."""
        if name not in self.keep:
            return
        t = getattr(self, name)
        n = value.shape[-1]
        keep_share = 1.0 if decay is None else decay
        # The same float32 multiply and add as `(t.float() * keep_share + value)`, in place on one
        # copy: this runs every decode step and layer, and each temporary is as long as the history.
        merged = t[..., :n].to(torch.float32, copy=True).mul_(keep_share).add_(value).to(self.dtype)
        if n == t.shape[-1]:
            setattr(self, name, merged)
        else:  # an oracle tracker may already know tokens this cache has not seen yet
            rest = t[..., n:].float() * keep_share
            setattr(self, name, torch.cat([merged, rest.to(self.dtype)], dim=-1))

    def score(self, signal: str, pool: int = 1) -> torch.Tensor:
        """[B, H, T] float32 importance; `pool` > 1 averages each token with its neighbours."""
        if signal not in NEEDS:
            raise ValueError(f"unknown importance signal {signal!r}; allowed: {SIGNALS}")
        missing = [n for n in NEEDS[signal] if n not in self.keep]
        if missing:
            raise ValueError(f"signal {signal!r} needs {missing}, which this tracker does not keep ({self.keep})")
        if signal == "normalized":
            out = self.cumulative.float() / self.count.float().clamp(min=1.0).unsqueeze(1)
        else:
            out = getattr(self, signal).float()
        if pool > 1 and out.shape[-1] > 1:
            b, h, t = out.shape
            out = torch.nn.functional.avg_pool1d(out.reshape(b * h, 1, t), pool, stride=1, padding=pool // 2,
                                                 count_include_pad=False)[..., :t].reshape(b, h, t)
        return out

    @property
    def entropy(self) -> float:
        return self.entropy_sum / max(self.entropy_rows, 1)


class ImportanceTracker:
    """Importance statistics for every layer of one cache."""

    def __init__(self, decay: float = 0.9, obs_window: int = 64, keep: tuple[str, ...] | None = None,
                 dtype: torch.dtype = torch.float32, per_head: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        if obs_window < 1:
            raise ValueError(f"obs_window must be >= 1, got {obs_window!r}")
        keep = ALL_STATS if keep is None else tuple(n for n in ALL_STATS if n in keep)
        self.decay, self.obs_window, self.keep, self.dtype = decay, obs_window, keep, dtype
        # per_head=False sums the KV heads: [B, 1, T], 1/H_kv of the bytes, for one precision per token
        self.per_head = per_head
        self.layers: dict[int, LayerImportance] = {}

    @property
    def horizon(self) -> int:
        """Query rows back from the newest that a prompt's `ema`, `window` and entropy read:
        past it the EMA weight is under 2^-40 of the newest row's."""
        return max(self.obs_window, _ENTROPY_ROWS, math.ceil(40 * math.log(2) / -math.log(self.decay)))

    @classmethod
    def for_signal(cls, signal: str, decay: float = 0.9, obs_window: int = 64,
                   dtype: torch.dtype = torch.float16, per_head: bool = True) -> "ImportanceTracker":
        """A tracker that keeps only what `signal` reads, in `dtype` (what a SmartKV cache holds)."""
        if signal not in NEEDS:
            raise ValueError(f"unknown importance signal {signal!r}; allowed: {SIGNALS}")
        return cls(decay, obs_window, NEEDS[signal], dtype, per_head)

    def layer(self, idx: int) -> LayerImportance:
        if idx not in self.layers:
            self.layers[idx] = LayerImportance(self.keep, self.dtype)
        return self.layers[idx]

    @property
    def nbytes(self) -> int:
        return sum(li.nbytes for li in self.layers.values())

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) batch rows `index` in every layer (beam search's reorder)."""
        for li in self.layers.values():
            li.select_rows(index)

    def repeat_rows(self, repeats: int) -> None:
        for li in self.layers.values():
            li.repeat_rows(repeats)

    def crop(self, layer_idx: int, n_tokens: int) -> None:
        if layer_idx in self.layers:
            self.layers[layer_idx].crop(n_tokens)

    def bytes_per_token(self, batch: int, heads: int) -> int:
        """Bytes one more cached token adds to one layer's statistics."""
        size = self.dtype.itemsize  # (no tensor: the budget check asks this every layer and step)
        heads = heads if self.per_head else 1
        return sum(batch * (heads if n in _PER_HEAD else 1) * size for n in self.keep)

    def compatible(self, other: "ImportanceTracker") -> bool:
        """Can this tracker's statistics stand in for `other`'s (same decay and window, a superset kept)?"""
        return (self.decay == other.decay and self.obs_window == other.obs_window
                and set(other.keep) <= set(self.keep) and (self.per_head or not other.per_head))

    def copy(self, keep: tuple[str, ...] | None = None, dtype: torch.dtype | None = None,
             per_head: bool | None = None) -> "ImportanceTracker":
        """A copy keeping `keep` (default: the same statistics) in `dtype` (default: the same),
        per KV head or summed over them (`per_head`, default: the same)."""
        per_head = self.per_head if per_head is None else per_head
        out = ImportanceTracker(self.decay, self.obs_window, self.keep if keep is None else keep,
                                self.dtype if dtype is None else dtype, per_head)
        missing = set(out.keep) - set(self.keep)
        if missing:
            raise ValueError(f"cannot copy statistics {sorted(missing)} this tracker does not keep")
        if per_head and not self.per_head:
            raise ValueError("cannot copy per-head statistics from a tracker that summed its heads")
        summed = self.per_head and not per_head
        for idx, li in self.layers.items():
            c = out.layer(idx)
            for name in out.keep:
                t = getattr(li, name)
                if t is not None and summed and name in _PER_HEAD:
                    t = t.float().sum(dim=1, keepdim=True)
                setattr(c, name, None if t is None else t.to(out.dtype, copy=True))
            c.n_tokens, c.queries = li.n_tokens, li.queries
            c.entropy_sum, c.entropy_rows = li.entropy_sum, li.entropy_rows
        return out

    @torch.no_grad()
    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        """Add the attention of `query` [B, Hq, q, D] over `key` [B, Hkv, T, D] to layer `layer_idx`.

        `attention_mask` is what the model passed to attention: None (plain causal, the queries
        are the last q positions), boolean [B, 1, q, T] (True = may attend) or additive float.
        Work is done in chunks of query rows; with a causal mask a chunk only scores the keys
        its rows can see, which halves the prefill cost.
        """
        b, hq, q, d = query.shape
        hkv, t = key.shape[1], key.shape[2]
        groups = hq // hkv
        li = self.layer(layer_idx)
        li._grow(b, hkv if self.per_head else 1, t, key.device)
        if q == 1 and li.n_tokens == t:
            self._observe_step(li, query, key, attention_mask, scaling)
            return
        qg = (query.float() * scaling).view(b, hkv, groups, q, d)
        kf = key.float()
        # EMA weights of the q queries in order: the newest gets (1 - decay).
        steps = torch.arange(q - 1, -1, -1, device=key.device, dtype=torch.float32)
        weights = (1.0 - self.decay) * torch.pow(torch.tensor(self.decay), steps)
        # The prompt's observation window: its last `obs_window` queries, averaged. Later
        # multi-token chunks (chunked prefill, assisted decoding) continue the EMA instead.
        first = li.queries == 0
        w_eff = min(self.obs_window, q)
        win_weights = torch.where(steps < w_eff, 1.0 / w_eff, 0.0) if first else weights
        # Entropy (a per-layer sensitivity summary) is sampled on the last rows only.
        entropy_from = max(0, q - _ENTROPY_ROWS)
        # Without `cumulative` and `count`, only the newest rows matter: the EMA weight of a row
        # `horizon` rows back is below 2^-40 of the newest's, and the window and the entropy
        # sample read the last rows only. Skipping the older rows halves a 1k prefill's cost.
        start = 0 if {"cumulative", "count"} & set(self.keep) else max(0, q - self.horizon)
        red_all = torch.zeros(b * hkv, 3, t, device=key.device)  # mass, ema, window
        count = torch.zeros(b, t, device=key.device)
        chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, b * hq * t))
        for r0 in range(start, q, chunk):
            r1 = min(q, r0 + chunk)
            # keys beyond the chunk's last query are masked for a causal model; skip them
            visible = t - q + r1
            scores = torch.einsum("bhgqd,bhtd->bhgqt", qg[:, :, :, r0:r1], kf[:, :, :visible])
            allowed = _allowed(attention_mask, b, q, t, r0, r1, key.device)[..., :visible]  # [B, 1, r, v]
            scores.masked_fill_(~allowed.unsqueeze(1), _NEG)
            probs = torch.softmax(scores, dim=-1)
            live = allowed[:, 0].any(-1)  # [B, r]: rows with something to attend (left padding)
            if not bool(live.all()):
                probs.mul_(live[:, None, None, :, None])
            # one matmul reduces over (query head, query row) with three weightings: mass, EMA, window
            rows = r1 - r0
            w = torch.stack([torch.ones(rows, device=key.device), weights[r0:r1], win_weights[r0:r1]],
                            dim=1).repeat(groups, 1)
            red_all[..., :visible] += torch.matmul(w.t(), probs.view(b * hkv, groups * rows, visible))
            count[:, :visible] += allowed[:, 0].sum(dim=1).float()
            if r1 > entropy_from:
                e0 = max(r0, entropy_from) - r0
                s, p = scores[:, :, :, e0:], probs[:, :, :, e0:]
                # H = logsumexp(s) - sum(p * s); masked scores are a finite -1e30 with p = 0 there
                ent = torch.logsumexp(s, dim=-1) - (p * s.clamp_min(-1e4)).sum(-1)
                lv = live[:, e0:]
                li.entropy_sum += float((ent * lv[:, None, None, :]).sum())
                li.entropy_rows += int(lv.sum()) * hkv * groups
        red_all = red_all.view(b, hkv, 3, t)
        if not self.per_head:
            red_all = red_all.sum(dim=1, keepdim=True)
        li._add("cumulative", red_all[:, :, 0])
        li._add("ema", red_all[:, :, 1], self.decay**q)
        li._add("window", red_all[:, :, 2], 0.0 if first else self.decay**q)
        li._add("count", count)
        li.queries += q

    def _observe_step(self, li: LayerImportance, query, key, attention_mask, scaling: float) -> None:
        """One decode query: the same statistics with a handful of ops (this runs every step and layer)."""
        b, hq, _, d = query.shape
        hkv, t = key.shape[1], key.shape[2]
        qg = query.float().view(b, hkv, hq // hkv, d) * scaling
        scores = torch.matmul(qg, key.float().transpose(-1, -2))  # [B, Hkv, g, T]
        allowed = None
        if attention_mask is not None:
            allowed = _allowed(attention_mask, b, 1, t, 0, 1, key.device)[:, :, 0]  # [B, 1, T]
            scores = scores.masked_fill(~allowed.unsqueeze(2), _NEG)
        mass = torch.softmax(scores, dim=-1).sum(dim=2)  # [B, Hkv, T]
        self.add_step(li, mass, None if allowed is None else allowed[:, 0])

    @torch.no_grad()
    def observe_weights(self, layer_idx: int, probs: torch.Tensor, kv_heads: int, allowed: torch.Tensor | None) -> None:
        """Add one decode query's softmax weights `probs` [B, Hq, T], as the attention pass computed
        them (smartkv.packed_attention), to layer `layer_idx`: what `observe` adds for that query,
        without a second q.k. `allowed`: bool [B, T] of the keys the query could see (None: all)."""
        b, hq, t = probs.shape
        li = self.layer(layer_idx)
        p = probs.float()
        mass = p.view(b, kv_heads, hq // kv_heads, t).sum(dim=2)  # [B, Hkv, T]
        fold = _kernel_fold(mass) if li.stats() and li.n_tokens <= t else None
        if fold is not None:
            self.add_step(li, mass, allowed, fold)
            return
        li._grow(b, kv_heads if self.per_head else 1, t, probs.device)
        if li.n_tokens != t:
            # a tracker that knows later tokens (oracle): `observe` takes its general path, which also
            # samples the entropy, H = -sum p log p (masked keys have p = 0 and add nothing)
            ent = -(p * p.clamp_min(1e-45).log()).sum(-1)  # [B, Hq]
            live = torch.ones(b, dtype=torch.bool, device=p.device) if allowed is None else allowed.any(-1)
            li.entropy_sum += float((ent * live[:, None]).sum())
            li.entropy_rows += int(live.sum()) * hq
        self.add_step(li, mass, allowed)

    def step_terms(self, li: LayerImportance) -> dict[str, tuple[float, float | None]]:
        """How one decode query's mass folds into each per-head statistic: name -> (share of the old
        value kept, weight on the mass; None: the mass as it is). stat <- stat * keep + mass * weight."""
        first = li.queries == 0
        return {"cumulative": (1.0, None), "ema": (self.decay, 1.0 - self.decay),
                "window": (0.0, None) if first else (self.decay, 1.0 - self.decay)}

    def add_step(self, li: LayerImportance, mass: torch.Tensor, allowed: torch.Tensor | None, fold=None) -> None:
        """Fold one decode query's attention `mass` [B, Hkv, T] (query heads of a group summed) into `li`.
        `fold` None: the PyTorch path, on statistics that hold T tokens. Else the C++ fold
        (smartkv/csrc/tracker_step.cpp, bit-identical), which grows statistics of at most T tokens to T
        and folds each in one pass: this runs for every layer at every decode step."""
        t = mass.shape[-1]
        if not self.per_head:
            mass = mass.sum(dim=1, keepdim=True)
        for name, (keep, weight) in self.step_terms(li).items():
            if name not in li.keep:
                continue
            if fold is None:
                li._add(name, mass if weight is None else mass * weight, keep)
            else:
                setattr(li, name, fold(getattr(li, name).contiguous(), mass, keep, 1.0 if weight is None else weight))
        if "count" in li.keep:  # (built only when kept: this runs every step and layer)
            if fold is not None:  # [B, T]: grown as the PyTorch path's `_grow` does
                li.count = torch.nn.functional.pad(li.count, (0, t - li.count.shape[-1]))
            li._add("count", torch.ones_like(mass[:, 0]) if allowed is None else allowed.float())
        if fold is not None:
            li.n_tokens = t
        li.queries += 1


def _kernel_fold(mass: torch.Tensor):
    """The C++ extension's `fold_attention_step` where it folds this mass (CPU float32), else None. A failed
    build raises KernelBuildError unless SMARTKV_NO_KERNEL=1, as it does for the attention kernel that made
    the weights."""
    from smartkv import kernels

    if mass.device.type != "cpu" or mass.dtype != torch.float32:
        return None
    module = kernels.kernel_module()
    return None if module is None else module.fold_attention_step


def _allowed(mask, b: int, q: int, t: int, r0: int, r1: int, device) -> torch.Tensor:
    if mask is None:
        pos = torch.arange(r0, r1, device=device) + (t - q)
        allowed = torch.arange(t, device=device)[None, :] <= pos[:, None]
        return allowed.view(1, 1, r1 - r0, t).expand(b, 1, r1 - r0, t)
    m = mask[:, :, r0:r1, -t:] if mask.shape[-2] > 1 else mask[..., -t:]
    return may_attend(m)[:, :1].expand(b, 1, r1 - r0, t)


def may_attend(mask: torch.Tensor) -> torch.Tensor:
    """A model's attention mask as booleans (True = may attend): bool masks as they are, additive
    float masks where they are above half the dtype's minimum (transformers writes the minimum)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def layer_entropies(tracker: ImportanceTracker, n_layers: int) -> list[float]:
    """Mean attention entropy (nats) per layer; NaN for a layer never observed."""
    return [tracker.layers[i].entropy if i in tracker.layers else math.nan for i in range(n_layers)]
