"""The Triton decode-attention kernel agrees with de-quantize + SDPA (`reference_decode_attention`).

Here (no GPU) the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
the kernels are defined) on CPU tensors: the same kernel source, executed with numpy. On a CUDA
machine `SMARTKV_TEST_DEVICE=cuda` runs the same tests compiled, on CUDA tensors
(`scripts/gpu_check.sh`). Histories come from `make_history` (tests/test_packed_attention.py),
laid out by hand as `smartkv.cache.mixed` lays them out. Shapes stay small: the interpreter is slow.

A missing `triton` fails this file (the `gpu` and `dev` extras install it); it skips only when
SMARTKV_NO_KERNEL=1 is set on purpose.
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("SMARTKV_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit functions are defined (conftest.py sets it first)
elif not torch.cuda.is_available():
    raise RuntimeError(f"SMARTKV_TEST_DEVICE={DEVICE} but torch sees no CUDA device")

from smartkv import kernels  # noqa: E402

if kernels.disabled():
    pytest.skip("SMARTKV_NO_KERNEL=1 is set: the PyTorch path is in use on purpose", allow_module_level=True)

import triton  # noqa: E402,F401  (missing: this file errors, it does not skip)

from smartkv import packed_attention  # noqa: E402
from smartkv.packed_attention import evicted_positions, reference_decode_attention  # noqa: E402
from smartkv.quantize import QuantizedRows  # noqa: E402
from smartkv.triton_kernels.packed_attention import triton_decode_attention  # noqa: E402

if DEVICE.type == "cpu" and type(triton.language.standard.zeros).__name__ != "InterpretedFunction":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it): "
                       "run with TRITON_INTERPRET=1 in the environment")
from test_packed_attention import make_history  # noqa: E402


def on_device(history):
    """The history with every tensor on DEVICE."""
    def move(x):
        return None if x is None else x.to(DEVICE)

    levels = [(QuantizedRows(tuple(move(p) for p in rows.planes), move(rows.scale), move(rows.zero), rows.bits,
                             rows.length, rows.group_size, rows.scale_format, move(rows.shared)), move(index))
              for rows, index in history.levels]
    return packed_attention.PackedHistory(
        move(history.sink_k), move(history.sink_v), levels, history.n_quant, history.unit_len, history.head_major,
        move(history.win_k), move(history.win_v), move(history.k_shift), move(history.k_scale), history.evicts)


def agree(query, history, scaling, allowed=None, **options):
    history = on_device(history)
    query = query.to(DEVICE)
    allowed = None if allowed is None else allowed.to(DEVICE)
    out, probs = triton_decode_attention(query, history, scaling, allowed, **options)
    ref_out, ref_probs = reference_decode_attention(query, history, scaling, allowed)
    assert out.shape == ref_out.shape and out.dtype == query.dtype and probs.shape == ref_probs.shape
    assert out.device == DEVICE and probs.dtype == torch.float32
    out_err = float((out.float() - ref_out.float()).abs().max())
    prob_err = float((probs - ref_probs).abs().max())
    assert out_err <= 1e-5 * max(1.0, float(ref_out.abs().max())), out_err
    assert prob_err <= 2e-6, prob_err
    return out.cpu(), probs.cpu()


@pytest.mark.parametrize("bit_set", [(2,), (3,), (4,), (8,), (2, 3, 4, 8), (1, 5), (6, 7)])
@pytest.mark.parametrize("smoothing", [False, True])
def test_every_width_alone_and_mixed_per_unit(bit_set, smoothing):
    history = make_history(1, 2, 32, 3, 45, 4, bit_set=bit_set, smoothing=smoothing, group=16, seed=sum(bit_set))
    query = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(1)) * 3
    agree(query, history, 0.2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_metadata_through_its_fp16_copy(symmetric):
    """`packed_decode_attention` hands the kernel an exact FP16 copy of int8 scales and zero-points."""
    history = make_history(1, 2, 32, 3, 45, 4, symmetric=symmetric, group=16, seed=9, scale_format="int8")
    query = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(9)) * 2
    assert packed_attention.kernel_can_take(query.to(DEVICE), on_device(history))
    copy = packed_attention._fp16_metadata(history)
    assert all(rows.scale.dtype == torch.float16 for rows, _ in copy.levels)
    for got, want in zip(packed_attention.dequantized_history(copy), packed_attention.dequantized_history(history)):
        assert torch.equal(got, want)  # the copy is exact: same values as the int8 rows
    agree(query, copy, 0.2)


@pytest.mark.parametrize("bit_set", [(4,), (2, 3, 4, 8)])
def test_symmetric_rows(bit_set):
    history = make_history(1, 2, 32, 2, 40, 3, bit_set=bit_set, symmetric=True, group=16, seed=5)
    agree(torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(2)), history, 0.2)


# (query heads, KV heads, head_dim): GQA 3:1 (SmolLM2's ratio), MHA, MQA 8:1, a head_dim that is not a power of 2
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 32), (2, 2, 16), (8, 1, 16), (4, 2, 24)])
@pytest.mark.parametrize("head_major", [False, True])  # granularity "layer" / "head"
@pytest.mark.parametrize("kv_split", [False, True])
def test_head_geometries_and_granularities(hq, hkv, d, head_major, kv_split):
    history = make_history(1, hkv, d, 2, 30, 3, head_major=head_major, kv_split=kv_split, group=8, seed=hq * 10 + d)
    agree(torch.randn(1, hq, 1, d, generator=torch.Generator().manual_seed(hq)), history, d**-0.5)


@pytest.mark.parametrize("head_major", [False, True])
def test_batch_with_left_padding(head_major):
    history = make_history(3, 2, 32, 3, 40, 5, head_major=head_major, seed=3)
    query = torch.randn(3, 4, 1, 32, generator=torch.Generator().manual_seed(3))
    allowed = torch.ones(3, history.length, dtype=torch.bool)
    allowed[1, :20] = False  # row 1 left-padded into its quantized tokens
    allowed[2] = False  # row 2 has nothing to attend: zeros, as the reference gives
    _, probs = agree(query, history, 0.2, allowed)
    assert float(probs[1, :, :20].abs().max()) == 0.0 and float(probs[2].abs().max()) == 0.0
    assert torch.allclose(probs[0].sum(-1), torch.ones(4))


@pytest.mark.parametrize("head_major", [False, True])
def test_evicted_units_get_no_attention(head_major):
    history = make_history(2, 2, 32, 3, 40, 4, head_major=head_major, seed=12)
    rows, index = history.levels[1]
    keep = torch.arange(rows.n_rows) % 3 != 0  # every third unit of one level evicted (held at no level)
    history.levels[1] = (rows.select(keep), index[keep].contiguous())
    history.evicts = True
    gone = evicted_positions(history)
    assert gone is not None and int(gone.sum()) > 0
    _, probs = agree(torch.randn(2, 4, 1, 32, generator=torch.Generator().manual_seed(12)), history, 0.2)
    assert float(probs.masked_select(gone.repeat_interleave(2, dim=1)).abs().max()) == 0.0


def test_edges_no_sinks_no_window_and_no_quantized_tokens():
    agree(torch.randn(1, 4, 1, 32), make_history(1, 2, 32, 0, 30, 0, seed=4), 0.2)
    empty = make_history(1, 2, 32, 3, 0, 6, smoothing=False, seed=5)
    assert empty.levels == []
    agree(torch.randn(1, 4, 1, 32), empty, 0.2)
    rows_in_order = make_history(1, 2, 32, 1, 20, 2, bit_set=(3,), seed=6)  # one level, index None
    assert rows_in_order.levels[0][1] is None
    agree(torch.randn(1, 4, 1, 32), rows_in_order, 0.2)


@pytest.mark.parametrize("block_t,splits", [(8, 1), (8, 3), (16, 2), (32, 8)])
def test_token_splits_and_blocks_do_not_change_the_result(block_t, splits):
    """Splits cut through sinks, quantized tokens and window alike; the combine step merges them."""
    history = make_history(1, 2, 32, 5, 50, 7, seed=7)
    agree(torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(7)), history, 0.2,
          block_t=block_t, splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_query_and_history(dtype):
    history = on_device(make_history(1, 2, 32, 3, 30, 4, dtype=dtype, seed=8))
    query = torch.randn(1, 4, 1, 32, dtype=dtype).to(DEVICE)
    out, probs = triton_decode_attention(query, history, 0.2)
    ref_out, ref_probs = reference_decode_attention(query, history, 0.2)
    assert out.dtype == dtype
    # the reference rounds re-centred keys and the output to the half dtype; the kernel keeps float32
    assert float((out.float() - ref_out.float()).abs().max()) < 3e-2
    assert float((probs - ref_probs).abs().max()) < 2e-2


def test_dispatch_by_device(monkeypatch):
    """CPU tensors keep the C++ kernel (Triton is never called); CUDA tensors take Triton unless
    SMARTKV_NO_KERNEL=1, and then the reference (the CPU extension is not built for them)."""
    import smartkv.triton_kernels.packed_attention as gpu

    calls = []
    real = gpu.triton_decode_attention
    monkeypatch.setattr(gpu, "triton_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    history = make_history(1, 2, 32, 2, 20, 3, seed=9)
    query = torch.randn(1, 4, 1, 32)
    if DEVICE.type == "cpu":
        assert kernels.kernel_available()  # the C++ kernel serves CPU tensors
        packed_attention.packed_decode_attention(query, history, 0.2)
        assert calls == []
        return
    dev_history, dev_query = on_device(history), query.to(DEVICE)
    assert packed_attention.kernel_can_take(dev_query, dev_history)
    packed_attention.packed_decode_attention(dev_query, dev_history, 0.2)
    assert calls == [1]
    monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("the CPU extension was built for CUDA tensors"))
    packed_attention.packed_decode_attention(dev_query, dev_history, 0.2)
    assert calls == [1]


def test_decode_kernel_ready_by_device(monkeypatch):
    """What the cache asks before publishing a packed history: C++ on CPU, Triton on CUDA, neither when switched off."""
    from smartkv import triton_kernels

    assert packed_attention.decode_kernel_ready(torch.device("cuda")) == triton_kernels.available() is True
    monkeypatch.setenv("SMARTKV_NO_KERNEL", "1")
    assert not packed_attention.decode_kernel_ready(torch.device("cuda"))
    assert not packed_attention.decode_kernel_ready(torch.device("cpu"))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on CUDA every other test here compiles the kernels already")
def test_kernels_compile_for_a_hopper_gpu():
    """The interpreter accepts code the compiler refuses: compile for sm_90 too (the wheel's ptxas, no GPU)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "smartkv.triton_kernels.compile_check", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("_unit_map_kernel", "_attend_split_kernel", "_combine_kernel"):
        assert f"{name}: sm_90 cubin" in proc.stdout
