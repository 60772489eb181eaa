"""Per-token importance from the attention that queries pay to cached keys.

For every layer the tracker keeps, per batch row, KV head and cached token:
- `cumulative`: attention mass summed over every query so far (H2O, Zhang et al. 2023);
- `count`: how many queries could see the token (unmasked), so that `normalized` =
  cumulative / count is the mean attention a token gets while visible (ZipCache, He et
  et al. 2024: accumulated mass favours early tokens just because more queries saw them);
- `ema`: an exponential moving average over queries in order, ema <- decay*ema + (1-decay)*a,
  so recent queries weigh most (at prefill, a soft version of SnapKV's observation window);
- the mean attention entropy of the layer, a per-layer sensitivity signal (layer-aware budgets).

Grouped-query attention: the query heads that share a KV head add up. Padded keys get no
mass and are not counted. Shapes: stats are float32 [B, H_kv, T]; `count` is [B, T].
"""

from __future__ import annotations

import math

import torch

SIGNALS = ("cumulative", "normalized", "ema")
# Bound the [B, H, g, q, T] float32 block of scores the prefill materializes at once.
_MAX_SCORE_ELEMENTS = 1 << 24
_ENTROPY_ROWS = 256
_NEG = -1e30  # a finite "minus infinity": softmax gives exactly 0 and p * s stays finite


class LayerImportance:
    def __init__(self) -> None:
        self.cumulative: torch.Tensor | None = None
        self.ema: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.entropy_sum = 0.0
        self.entropy_rows = 0

    @property
    def n_tokens(self) -> int:
        return 0 if self.cumulative is None else self.cumulative.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.cumulative, self.ema, self.count) if t is not None)

    def _grow(self, batch: int, heads: int, n_tokens: int, device) -> None:
        if self.cumulative is None:
            z = torch.zeros(batch, heads, 0, device=device)
            self.cumulative, self.ema = z, z.clone()
            self.count = torch.zeros(batch, 0, device=device)
        extra = n_tokens - self.n_tokens
        if extra > 0:
            self.cumulative = torch.nn.functional.pad(self.cumulative, (0, extra))
            self.ema = torch.nn.functional.pad(self.ema, (0, extra))
            self.count = torch.nn.functional.pad(self.count, (0, extra))

    # --- beam search / cropping: statistics follow the batch rows and tokens they belong to ---
    def select_rows(self, index: torch.Tensor) -> None:
        if self.cumulative is not None:
            index = index.to(self.cumulative.device)
            self.cumulative, self.ema, self.count = (t.index_select(0, index) for t in (self.cumulative, self.ema, self.count))

    def repeat_rows(self, repeats: int) -> None:
        if self.cumulative is not None:
            self.cumulative, self.ema, self.count = (t.repeat_interleave(repeats, dim=0)
                                                     for t in (self.cumulative, self.ema, self.count))

    def crop(self, n_tokens: int) -> None:
        """Forget tokens from `n_tokens` on. What the dropped tokens' queries added to the kept
        tokens stays (an EMA cannot be unwound): assisted decoding's rejected drafts leave that trace."""
        if self.cumulative is not None and self.n_tokens > n_tokens:
            self.cumulative, self.ema, self.count = (t[..., :n_tokens].contiguous()
                                                     for t in (self.cumulative, self.ema, self.count))

    def score(self, signal: str) -> torch.Tensor:
        if signal == "cumulative":
            return self.cumulative
        if signal == "normalized":
            return self.cumulative / self.count.clamp(min=1.0).unsqueeze(1)
        if signal == "ema":
            return self.ema
        raise ValueError(f"unknown importance signal {signal!r}; allowed: {SIGNALS}")

    @property
    def entropy(self) -> float:
        return self.entropy_sum / max(self.entropy_rows, 1)


class ImportanceTracker:
    """Importance statistics for every layer of one cache."""

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.decay = decay
        self.layers: dict[int, LayerImportance] = {}

    def layer(self, idx: int) -> LayerImportance:
        if idx not in self.layers:
            self.layers[idx] = LayerImportance()
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

    def copy(self) -> "ImportanceTracker":
        out = ImportanceTracker(self.decay)
        for idx, li in self.layers.items():
            c = out.layer(idx)
            c.cumulative, c.ema, c.count = li.cumulative.clone(), li.ema.clone(), li.count.clone()
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
        li._grow(b, hkv, t, key.device)
        if q == 1 and li.n_tokens == t:
            self._observe_step(li, query, key, attention_mask, scaling)
            return
        qg = (query.float() * scaling).view(b, hkv, groups, q, d)
        kf = key.float()
        # EMA weights of the q queries in order: the newest gets (1 - decay).
        steps = torch.arange(q - 1, -1, -1, device=key.device, dtype=torch.float32)
        weights = (1.0 - self.decay) * torch.pow(torch.tensor(self.decay), steps)
        # Entropy (a per-layer sensitivity summary) is sampled on the last rows only.
        entropy_from = max(0, q - _ENTROPY_ROWS)
        mass = torch.zeros(b, hkv, t, device=key.device)
        ema_add = torch.zeros(b, hkv, t, device=key.device)
        count = torch.zeros(b, t, device=key.device)
        chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, b * hq * t))
        for r0 in range(0, q, chunk):
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
            # one matmul reduces over (query head, query row) with two weightings: 1 (mass) and EMA
            rows = r1 - r0
            w = torch.stack([torch.ones(rows, device=key.device), weights[r0:r1]], dim=1).repeat(groups, 1)
            red = torch.matmul(w.t(), probs.view(b * hkv, groups * rows, visible))  # [BH, 2, v]
            mass[..., :visible] += red[:, 0].view(b, hkv, visible)
            ema_add[..., :visible] += red[:, 1].view(b, hkv, visible)
            count[:, :visible] += allowed[:, 0].sum(dim=1).float()
            if r1 > entropy_from:
                e0 = max(r0, entropy_from) - r0
                s, p = scores[:, :, :, e0:], probs[:, :, :, e0:]
                # H = logsumexp(s) - sum(p * s); masked scores are a finite -1e30 with p = 0 there
                ent = torch.logsumexp(s, dim=-1) - (p * s.clamp_min(-1e4)).sum(-1)
                lv = live[:, e0:]
                li.entropy_sum += float((ent * lv[:, None, None, :]).sum())
                li.entropy_rows += int(lv.sum()) * hkv * groups
        extra = li.n_tokens - t  # an oracle tracker may already know tokens this cache has not seen yet
        if extra > 0:
            mass, ema_add = (torch.nn.functional.pad(x, (0, extra)) for x in (mass, ema_add))
            count = torch.nn.functional.pad(count, (0, extra))
        li.cumulative += mass
        li.ema = li.ema * (self.decay**q) + ema_add
        li.count += count


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
        li.cumulative += mass
        li.ema.mul_(self.decay).add_(mass, alpha=1.0 - self.decay)
        li.count += 1.0 if allowed is None else allowed[:, 0].float()


def _allowed(mask, b: int, q: int, t: int, r0: int, r1: int, device) -> torch.Tensor:
    if mask is None:
        pos = torch.arange(r0, r1, device=device) + (t - q)
        allowed = torch.arange(t, device=device)[None, :] <= pos[:, None]
        return allowed.view(1, 1, r1 - r0, t).expand(b, 1, r1 - r0, t)
    m = mask[:, :, r0:r1, -t:] if mask.shape[-2] > 1 else mask[..., -t:]
    if m.dtype == torch.bool:
        allowed = m
    else:
        allowed = m > torch.finfo(m.dtype).min / 2
    return allowed[:, :1].expand(b, 1, r1 - r0, t)


def layer_entropies(tracker: ImportanceTracker, n_layers: int) -> list[float]:
    """Mean attention entropy (nats) per layer; NaN for a layer never observed."""
    return [tracker.layers[i].entropy if i in tracker.layers else math.nan for i in range(n_layers)]
