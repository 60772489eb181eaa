"""KIVI as published: parity with a reference written from the paper, beam search and cropping.

The reference follows Algorithm 1 of Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache" (ICML 2024), written from the paper's description:

- prefill of l tokens: r = l mod R; keys X_K[:l-r] are quantized per channel, X_K[l-r:]
  stay in full precision; values X_V[:l-R] are quantized per token, X_V[l-R:] stay;
- each decode step appends t_K, t_V, attends over [Q(X_Kg), X_Kr] and [Q(X_Vg), X_Vr] at
  full precision for the residuals, and only then: if X_Kr holds R keys they are quantized
  per channel and appended to Q(X_Kg); the oldest value beyond the newest R is quantized
  per token and appended to Q(X_Vg).

It holds de-quantized tensors (a simulation) and counts bytes by the paper's formula; the
numeric Q() is SmartKV's shared quantizer (tested in test_quantize.py), so that the test
pins the algorithm: which tokens are quantized, when, and along which axis.
"""

import pytest
import torch

from smartkv.cache.kivi import KIVILayer
from smartkv.methods import build_cache
from smartkv.models import tiny_model
from smartkv.quantize import quantize


class PaperKIVI:
    """KIVI's Algorithm 1 for one layer, on [B, H, T, D] tensors held at FP16."""

    def __init__(self, bits: int, group: int, residual: int):
        self.bits, self.group, self.R = bits, group, residual

    def _q_keys(self, x):  # per channel: groups of `group` consecutive tokens of one channel
        return quantize(x.float(), self.bits, self.group, axis=-2).dequantize() if x.numel() else x.float()

    def _q_values(self, x):  # per token: groups of `group` channels of one token
        return quantize(x.float(), self.bits, self.group, axis=-1).dequantize() if x.numel() else x.float()

    def prefill(self, k, v):
        k, v = k.half(), v.half()
        l = k.shape[-2]
        r = l % self.R
        self.kg, self.kr = self._q_keys(k[:, :, : l - r]), k[:, :, l - r :]
        nv = max(l - self.R, 0)
        self.vg, self.vr = self._q_values(v[:, :, :nv]), v[:, :, nv:]
        self.n_kg, self.n_vg = l - r, nv
        return k.float(), v.float()  # prefill attends at full precision

    def decode(self, tk, tv):
        self.kr = torch.cat([self.kr, tk.half()], -2)
        self.vr = torch.cat([self.vr, tv.half()], -2)
        seen = torch.cat([self.kg, self.kr.float()], -2), torch.cat([self.vg, self.vr.float()], -2)
        if self.kr.shape[-2] == self.R:  # after attention
            self.kg = torch.cat([self.kg, self._q_keys(self.kr)], -2)
            self.kr = self.kr[:, :, :0]
            self.n_kg += self.R
        if self.vr.shape[-2] > self.R:
            self.vg = torch.cat([self.vg, self._q_values(self.vr[:, :, :1])], -2)
            self.vr = self.vr[:, :, 1:]
            self.n_vg += 1
        return seen

    def nbytes(self, b, h, d):
        """Packed codes plus an FP16 scale and zero-point per group, plus 2 bytes per full-precision value."""
        per_group = self.group * self.bits // 8 + 4
        quant = (self.n_kg + self.n_vg) * b * h * d // self.group * per_group
        return quant + 2 * (self.kr.numel() + self.vr.numel())


@pytest.mark.parametrize("bits,group,residual,prefill_len", [(2, 32, 128, 300), (4, 32, 128, 77), (2, 16, 64, 128)])
def test_parity_with_the_paper_over_prefill_and_decode(bits, group, residual, prefill_len):
    b, h, d, steps = 2, 3, 64, 230
    g = torch.Generator().manual_seed(bits * 1000 + prefill_len)
    keys = torch.randn(b, h, prefill_len + steps, d, generator=g) * 2 + torch.linspace(-3, 3, d)  # channel offsets
    values = torch.randn(b, h, prefill_len + steps, d, generator=g)
    ref = PaperKIVI(bits, group, residual)
    layer = KIVILayer(bits, group, residual)

    got = layer.update(keys[:, :, :prefill_len], values[:, :, :prefill_len])
    want = ref.prefill(keys[:, :, :prefill_len], values[:, :, :prefill_len])
    for a, w in zip(got, want):
        assert torch.equal(a, w)
    assert layer.nbytes() == ref.nbytes(b, h, d)
    fp_values_seen = set()
    for t in range(prefill_len, prefill_len + steps):
        got = layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        want = ref.decode(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        assert torch.equal(got[0], want[0]), f"keys differ at step {t}"
        assert torch.equal(got[1], want[1]), f"values differ at step {t}"
        fp_values_seen.add(ref.vr.shape[-2])
        assert layer.nbytes() == ref.nbytes(b, h, d), f"bytes differ at step {t}"
        assert layer.n_qkeys == ref.n_kg and layer.n_qvalues == ref.n_vg
    # the run reached KIVI's steady state: R full-precision values, keys flushed block by block
    assert residual in fp_values_seen and ref.n_kg >= residual
    # and quantization really happened: the newest values are exact, the oldest are not
    assert not torch.equal(got[1][:, :, :1], values[:, :, :1])


def test_newest_values_stay_full_precision_and_quantize_after_attention():
    layer = KIVILayer(2, 32, 128)
    k, v = torch.randn(1, 1, 300, 32), torch.randn(1, 1, 300, 32)
    layer.update(k[:, :, :200], v[:, :, :200])
    assert layer.nbytes() > 0  # reading memory applies what the prefill owes
    assert (layer.n_qkeys, layer.keys.shape[-2]) == (128, 72)
    assert (layer.n_qvalues, layer.values.shape[-2]) == (72, 128)
    for t in range(200, 256):  # keys residual grows 72 -> 128 at t = 255
        keys, values = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    # the step that filled the key residual attended over all 128 of its keys at full precision
    assert torch.equal(keys[:, :, 128:], k[:, :, 128:256].half().float())
    assert torch.equal(values[:, :, -129:], v[:, :, 256 - 129 : 256].half().float())
    layer.nbytes()
    assert (layer.n_qkeys, layer.keys.shape[-2]) == (256, 0)
    assert (layer.n_qvalues, layer.values.shape[-2]) == (128, 128)


def test_bytes_are_storage_bytes():
    layer = KIVILayer(2, 32, 64)
    layer.update(torch.randn(1, 2, 150, 32), torch.randn(1, 2, 150, 32))
    layer.nbytes()
    held = [layer.keys, layer.values, *layer.qkeys.planes, layer.qkeys.scale, layer.qkeys.zero,
            *layer.qvalues.planes, layer.qvalues.scale, layer.qvalues.zero]
    assert layer.nbytes() == sum(t.untyped_storage().nbytes() for t in held)
    # no held tensor is a view into a larger (flushed) buffer
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in held)


# ---------------------------------------------------------------------------------------------
# Beam search and cropping on packed storage


def _filled_layer(k, v, prompt=150):
    layer = KIVILayer(2, 32, 64)
    out = layer.update(k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, k.shape[-2]):
        out = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    return layer, out


def _history(batch=3, tokens=170):
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 2, tokens, 32, generator=g), torch.randn(batch, 2, tokens, 32, generator=g)


@pytest.mark.parametrize("op,arg,index", [
    ("reorder_cache", torch.tensor([2, 0, 0]), [2, 0, 0]),
    ("batch_select_indices", torch.tensor([1, 2]), [1, 2]),
    ("batch_select_indices", torch.tensor([True, False, True]), [0, 2]),
    ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
])
def test_batch_operations_follow_the_rows(op, arg, index):
    k, v = _history()
    layer, _ = _filled_layer(k, v)
    getattr(layer, op)(arg)
    assert layer.batch == len(index)
    # the result must be the cache that the selected rows alone would have built, packed bytes included
    alone, _ = _filled_layer(k[index], v[index])
    nk, nv = torch.randn(len(index), 2, 1, 32), torch.randn(len(index), 2, 1, 32)
    for a, b in zip(layer.update(nk, nv), alone.update(nk, nv)):
        assert torch.equal(a, b)
    assert layer.nbytes() == alone.nbytes() and layer.get_seq_length() == k.shape[-2] + 1
    assert all(torch.equal(p, q) for p, q in zip(layer.qvalues.planes, alone.qvalues.planes))


def test_crop_of_the_last_steps_tokens_is_exact():
    k, v = _history(tokens=175)
    layer, _ = _filled_layer(k[:, :, :170], v[:, :, :170])
    layer.update(k[:, :, 170:], v[:, :, 170:])  # five draft tokens in one step, as assisted decoding does
    layer.crop(-3)  # three of them rejected
    assert layer.get_seq_length() == 172
    shorter, _ = _filled_layer(k[:, :, :172], v[:, :, :172])
    nk, nv = torch.randn(3, 2, 1, 32), torch.randn(3, 2, 1, 32)
    for a, b in zip(layer.update(nk, nv), shorter.update(nk, nv)):
        assert torch.equal(a, b)
    assert layer.nbytes() == shorter.nbytes()


def test_crop_into_quantized_tokens_says_what_is_possible():
    k, v = _history()
    layer, _ = _filled_layer(k, v)  # 170 tokens: 128 keys, 106 values quantized once settled
    layer.nbytes()
    with pytest.raises(NotImplementedError, match=r"KIVI cannot crop to 169 tokens: 128 keys and 106 values .*at most 0 tokens"):
        layer.crop(-1)
    with pytest.raises(ValueError, match="negative number"):
        layer.crop(5)
    layer.crop(0)
    assert layer.get_seq_length() == 170


def _generate(model, cache, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=12,
                          min_new_tokens=12, pad_token_id=0, do_sample=False, **kw)


def test_beam_search_and_assisted_decoding_in_generate():
    model = tiny_model("llama", seed=0, hidden_size=128, intermediate_size=256, head_dim=32)
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(0))
    # with a residual longer than the whole run nothing is quantized: KIVI must match DynamicCache exactly
    from transformers import DynamicCache

    want = _generate(model, DynamicCache(config=model.config), ids, num_beams=3)
    got = _generate(model, build_cache("kivi", model.config, bits=2, residual_length=512), ids, num_beams=3)
    assert torch.equal(got, want)
    cache = build_cache("kivi", model.config, bits=2)
    out = _generate(model, cache, ids, num_beams=3)
    assert out.shape == (1, 212) and cache.memory_report()["ratio"] < 0.8
    # assisted decoding crops rejected draft tokens (always inside the full-precision part)
    draft = tiny_model("llama", seed=1, hidden_size=64, intermediate_size=128, head_dim=16)
    want = _generate(model, DynamicCache(config=model.config), ids)
    got = _generate(model, build_cache("kivi", model.config, bits=2, residual_length=512), ids, assistant_model=draft)
    assert torch.equal(got, want)
    out = _generate(model, build_cache("kivi", model.config, bits=2), ids, assistant_model=draft)
    assert out.shape == (1, 212)


def paper_quantize(x: torch.Tensor, bits: int, group: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI's asymmetric quantizer as the paper states it, independent of smartkv.quantize: groups of
    `group` consecutive values along `axis`, scale = (max - min) / (2^b - 1), code = round((x - min) /
    scale), read back as code * scale + min. Returns (de-quantized x, each value's step)."""
    moved = x.float().movedim(axis, -1)
    shape = moved.shape
    g = moved.reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    deq = torch.round((g - lo) / step).clamp(0, 2 ** bits - 1) * step + lo
    return deq.reshape(shape).movedim(-1, axis), step.expand_as(g).reshape(shape).movedim(-1, axis)


@pytest.mark.parametrize("bits,group,residual,prefill_len", [(2, 32, 128, 300), (4, 32, 128, 160)])
def test_kivi_against_its_own_quantizer_from_the_paper(bits, group, residual, prefill_len):
    """The same schedule checked with a quantizer written here: every quantized key within one of the
    paper's per-channel steps of it (the layer stores its scale and zero-point in FP16, rounded
    outward, so not bit for bit), every full-precision one exact. Keys grouped per token instead
    would miss by many per-channel steps, since the channels are offset from each other."""
    b, h, d, steps = 1, 2, 64, 140
    g = torch.Generator().manual_seed(11 + bits)
    keys = torch.randn(b, h, prefill_len + steps, d, generator=g) * 0.05 + torch.linspace(-4, 4, d)
    values = torch.randn(b, h, prefill_len + steps, d, generator=g)
    layer = KIVILayer(bits, group, residual)
    layer.update(keys[:, :, :prefill_len], values[:, :, :prefill_len])
    for t in range(prefill_len, prefill_len + steps):
        got_k, got_v = layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    n = prefill_len + steps
    nk, nv = layer.n_qkeys, layer.n_qvalues  # what the last step attended over quantized
    k16, v16 = keys[:, :, :n].half().float(), values[:, :, :n].half().float()
    want_k, step_k = paper_quantize(k16[:, :, :nk], bits, group, axis=-2)
    want_v, step_v = paper_quantize(v16[:, :, :nv], bits, group, axis=-1)
    # keys flush in whole blocks of R; the last step saw its own value and the R before it at full precision
    assert nk % residual == 0 and nk > 0 and nv == n - residual - 1
    assert ((got_k[:, :, :nk] - want_k).abs() <= step_k * 1.01).all()
    assert ((got_v[:, :, :nv] - want_v).abs() <= step_v * 1.01).all()
    assert torch.equal(got_k[:, :, nk:], k16[:, :, nk:]) and torch.equal(got_v[:, :, nv:], v16[:, :, nv:])
    # grouped per token, the same keys come back far off the per-channel reference
    per_token, _ = paper_quantize(k16[:, :, :nk], bits, group, axis=-1)
    assert (per_token - want_k).abs().mean() > 3 * step_k.mean()
