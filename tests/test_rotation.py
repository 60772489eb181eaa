"""Key rotation: orthogonal, exact round trip, and it tames outlier channels at 2 bits."""

import pytest
import torch

from smartkv.cache.mixed import MixedPrecisionLayer, MixedSpec
from smartkv.rotation import rotation


@pytest.mark.parametrize("dim", [64, 128, 256, 80])
def test_rotation_is_orthogonal(dim):
    r = rotation(dim, torch.float64)
    assert torch.allclose(r @ r.t(), torch.eye(dim, dtype=torch.float64), atol=1e-6)
    g = torch.Generator().manual_seed(dim)  # seeded: the draws must not depend on which tests ran before
    q, k = torch.randn(5, dim, dtype=torch.float64, generator=g), torch.randn(7, dim, dtype=torch.float64, generator=g)
    assert torch.allclose((q @ r) @ (k @ r).t(), q @ k.t(), atol=1e-9)  # attention scores unchanged
    assert torch.equal(rotation(dim), rotation(dim))  # a function of head_dim: nothing to store


def _keys_with_outliers(n=256, heads=2, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, n, dim, generator=g)
    k[..., 3] = k[..., 3] * 20 + 15  # an outlier channel with a large offset, as real keys have
    k[..., 17] *= 12
    return k


def _key_error(rotate: bool) -> float:
    k = _keys_with_outliers()
    v = torch.randn_like(k)
    layer = MixedPrecisionLayer(MixedSpec(bit_set=(2,), group_size=32, key_rotation=rotate))
    layer.update(k, v)  # no budget, window 0: every token goes straight to the 2-bit store
    assert layer.n_quant == k.shape[2]
    buf = torch.empty(layer.store.n_units, layer.unit_len)
    k_back, v_back = layer._from_units(layer.store.dequantize_into(buf), k.shape[2])
    return float(((k_back - k.half().float()) ** 2).mean())


def test_rotation_cuts_two_bit_key_error_on_outlier_channels():
    plain, rotated = _key_error(False), _key_error(True)
    assert rotated < 0.5 * plain, (plain, rotated)
