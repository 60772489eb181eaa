"""Triton kernels: one decode query's attention over a mixed-precision history, read from the packed codes.

The GPU counterpart of `smartkv/csrc/packed_attention.cpp` (same inputs, same `(out, probs)`), after
the split-K "flash-decoding" scheme (Dao et al., 2023, "Flash-Decoding for long-context inference")
with KIVI-style de-quantization folded into the attention loop (Liu et al., 2024, "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache"). Three launches per layer and step:

1. `_unit_map_kernel`: which level and row holds each unit (int32 per unit, `row * 16 + level`,
   -1 where no level holds it: an evicted unit). A few bytes per unit, never the values.
2. `_attend_split_kernel`, grid (batch row x KV head, split of the tokens): for a block of tokens it
   reads sinks and window at full precision and the quantized tokens' codes straight from each
   level's bit planes (any width 1..8, mixed per unit), de-quantizes them group-wise in registers,
   and folds the key centre into the query side (q . k = q . shift + (q * kscale) . k_quantized).
   The g query heads of the KV head share each load. Raw scores go to the `probs` buffer; an online
   softmax keeps the split's max, sum and un-normalised value sum.
3. `_combine_kernel`: merges the splits into the output and turns the raw scores into the softmax
   weights the importance tracker reads (masked and evicted tokens get exactly 0; a row with
   nothing to attend gets zeros), in place.

Levels are passed as a small int64 table of raw addresses (bit planes, scale, zero-point, index),
so a single compiled kernel serves any mix of widths; the addresses are turned back into pointers
inside the kernel. The history at full precision never exists in global memory.

Layout (see `smartkv.packed_attention.PackedHistory`): quantized tokens form a virtual token-major
array [n, B, 2, Hkv, D] ("layer" granularity) or [n, B, Hkv, 2, D] ("head"), cut into units of
`unit_len` values; token t's K (kv=0) or V (kv=1) slice of (b, h) is slice number
t * 2 * B * Hkv + slice0(b, h, kv), and lies in unit slice // (unit_len / D) at offset
(slice % (unit_len / D)) * D.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from smartkv.quantize import QuantizedRows, plane_widths
from smartkv.triton_kernels import MAX_LEVELS  # map entry = row << 4 | level

# Columns of the level table (int64 [levels, _COLS]).
_PLANE = 0  # 4 plane addresses (0 where the width has fewer planes)
_WIDTH = 4  # 4 plane widths
_SHIFT = 8  # 4 left shifts of each plane's bits inside the code
_SCALE = 12  # address of the fp16 scales [rows, unit_len / group]
_ZERO = 13  # address of the fp16 zero-points, 0 when symmetric
_BITS = 14
_INDEX = 15  # address of the int32 unit of each row, 0 when row r holds unit r
_ROWS = 16
_NPLANES = 17
_COLS = 18


@triton.jit
def _unit_map_kernel(table_ptr, map_ptr, COLS: tl.constexpr, BLOCK: tl.constexpr):
    lvl = tl.program_id(1)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.load(table_ptr + lvl * COLS + 16)  # table columns: _ROWS
    index_addr = tl.load(table_ptr + lvl * COLS + 15)  # _INDEX
    live = r < rows
    unit = r
    if index_addr != 0:
        unit = tl.load(index_addr.to(tl.pointer_type(tl.int32)) + r, mask=live, other=0)
    tl.store(map_ptr + unit, r * 16 + lvl, mask=live)


@triton.jit
def _load_slices(t, live, stride_sink_t, stride_win_t, S, N, full_ptr_sink, full_ptr_win, sink_off, win_off,
                 slice0, step, map_ptr, table_ptr, UNIT_LEN, GROUP, HD, d, dm, COLS: tl.constexpr):
    """[BLOCK_T, DP] float32 slices of tokens `t` (one of K or V): full-precision rows for sinks and
    window, de-quantized codes (before key smoothing) for the quantized tokens; and which tokens are
    quantized and which of those some level holds."""
    in_sink = live & (t < S)
    in_win = live & (t >= S + N)
    in_q = live & (t >= S) & (t < S + N)
    dm2 = dm[None, :]
    ts = tl.where(in_sink, t, 0).to(tl.int64)
    x = tl.load(full_ptr_sink + sink_off + ts[:, None] * stride_sink_t + d[None, :], mask=in_sink[:, None] & dm2,
                other=0.0).to(tl.float32)
    tw = tl.where(in_win, t - S - N, 0).to(tl.int64)
    x += tl.load(full_ptr_win + win_off + tw[:, None] * stride_win_t + d[None, :], mask=in_win[:, None] & dm2,
                 other=0.0).to(tl.float32)
    per_unit = UNIT_LEN // HD
    sl = tl.where(in_q, t - S, 0).to(tl.int64) * step + slice0
    unit = sl // per_unit
    off = (sl % per_unit) * HD
    entry = tl.load(map_ptr + unit, mask=in_q, other=-1)
    held = in_q & (entry >= 0)
    lvl = tl.where(held, entry & 15, 0).to(tl.int64)
    row = tl.where(held, entry >> 4, 0).to(tl.int64)
    tb = table_ptr + lvl * COLS
    pos = off[:, None] + d[None, :]  # position of each value inside its unit
    qmask = held[:, None] & dm2
    n_planes = tl.load(tb + 17, mask=held, other=0)  # _NPLANES
    code = tl.zeros(pos.shape, dtype=tl.int64)
    for p in tl.static_range(4):
        pm = held & (n_planes > p)
        w = tl.load(tb + 4 + p, mask=pm, other=1)  # _WIDTH
        shift = tl.load(tb + 8 + p, mask=pm, other=0)  # _SHIFT
        base = tl.load(tb + p, mask=pm, other=0).to(tl.pointer_type(tl.uint8))  # _PLANE
        row_bytes = UNIT_LEN * w // 8
        bit = pos * w[:, None]
        byte = tl.load(base[:, None] + (row * row_bytes)[:, None] + (bit >> 3), mask=pm[:, None] & dm2, other=0)
        field = (byte.to(tl.int64) >> (bit & 7)) & ((1 << w[:, None]) - 1)
        code |= field << shift[:, None]
    groups = (UNIT_LEN + GROUP - 1) // GROUP  # per unit; the last may be shorter
    gi = row[:, None] * groups + pos // GROUP
    sc_addr = tl.load(tb + 12, mask=held, other=0)  # _SCALE
    sc_ptr = sc_addr.to(tl.pointer_type(tl.float16))
    scale = tl.load(sc_ptr[:, None] + gi, mask=qmask, other=0.0).to(tl.float32)
    z_addr = tl.load(tb + 13, mask=held, other=0)  # _ZERO
    asym = z_addr != 0
    zero = tl.load(z_addr.to(tl.pointer_type(tl.float16))[:, None] + gi, mask=qmask & asym[:, None],
                   other=0.0).to(tl.float32)
    bits = tl.load(tb + 14, mask=held, other=1)  # _BITS
    offset = tl.where(bits > 1, (1 << (bits - 1)) - 1, 0).to(tl.float32)
    c = code.to(tl.float32)
    # the reference's operation order: asymmetric c * s + z, symmetric (c - offset) * s
    val = tl.where(asym[:, None], c * scale + zero, (c - offset[:, None]) * scale)
    val = tl.where(qmask, val, 0.0)
    return x, val, in_q, held


@triton.jit
def _attend_split_kernel(
    q_ptr, sink_k, sink_v, win_k, win_v, shift_ptr, kscale_ptr, allowed_ptr, map_ptr, table_ptr,
    scores_ptr, m_ptr, l_ptr, acc_ptr,
    B, HKV, G, S, N, W, UNIT_LEN, GROUP, HD, CHUNK, N_SPLITS, scaling,
    sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, wk_b, wk_h, wk_t, wv_b, wv_h, wv_t,
    HEAD_MAJOR: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ALLOWED: tl.constexpr,
    DP: tl.constexpr, GQ: tl.constexpr, BLOCK_T: tl.constexpr, COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    T = S + N + W
    HQ = HKV * G
    j = tl.arange(0, GQ)
    jm = j < G
    d = tl.arange(0, DP)
    dm = d < HD
    qrow = (b * HQ + h * G + j).to(tl.int64)
    q = tl.load(q_ptr + qrow[:, None] * HD + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0) * scaling
    kv = (b * HKV + h).to(tl.int64)
    if HAS_SMOOTH:
        ksh = tl.load(shift_ptr + kv * HD + d, mask=dm, other=0.0)
        ksc = tl.load(kscale_ptr + kv * HD + d, mask=dm, other=0.0)
        centre = tl.sum(q * ksh[None, :], axis=1)  # q . shift, once per query head
    else:
        ksc = tl.full([DP], 1.0, tl.float32)
        centre = tl.zeros([GQ], dtype=tl.float32)
    step = 2 * B * HKV
    if HEAD_MAJOR:
        slice_k = kv * 2
        slice_v = slice_k + 1
    else:
        slice_k = (b * 2 * HKV + h).to(tl.int64)
        slice_v = slice_k + HKV
    m_i = tl.full([GQ], float("-inf"), tl.float32)
    l_i = tl.zeros([GQ], dtype=tl.float32)
    acc = tl.zeros([GQ, DP], dtype=tl.float32)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, T)
    for t0 in range(start, stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        live = t < stop
        kx, kq, in_q, held = _load_slices(t, live, sk_t, wk_t, S, N, sink_k, win_k, b * sk_b + h * sk_h,
                                          b * wk_b + h * wk_h, slice_k, step, map_ptr, table_ptr, UNIT_LEN, GROUP,
                                          HD, d, dm, COLS)
        key = kx + kq * ksc[None, :]
        s = tl.sum(q[:, None, :] * key[None, :, :], axis=2)  # [GQ, BLOCK_T]
        s += tl.where(in_q, 1.0, 0.0)[None, :] * centre[:, None]
        ok = live & (held | ~in_q)
        if HAS_ALLOWED:
            ok = ok & (tl.load(allowed_ptr + b * T + t, mask=live, other=0) != 0)
        s = tl.where(ok[None, :], s, float("-inf"))
        tl.store(scores_ptr + qrow[:, None] * T + t[None, :], s, mask=jm[:, None] & live[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vx, vq, _, _ = _load_slices(t, live, sv_t, wv_t, S, N, sink_v, win_v, b * sv_b + h * sv_h,
                                    b * wv_b + h * wv_h, slice_v, step, map_ptr, table_ptr, UNIT_LEN, GROUP,
                                    HD, d, dm, COLS)
        value = vx + vq
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * value[None, :, :], axis=1)
        m_i = m_new
    part = qrow * N_SPLITS + split
    tl.store(m_ptr + part, m_i, mask=jm)
    tl.store(l_ptr + part, l_i, mask=jm)
    tl.store(acc_ptr + part[:, None] * DP + d[None, :], acc, mask=jm[:, None])


@triton.jit
def _combine_kernel(scores_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, T, HD, N_SPLITS,
                    SP: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    sp = tl.arange(0, SP)
    spm = sp < N_SPLITS
    ms = tl.load(m_ptr + row * N_SPLITS + sp, mask=spm, other=float("-inf"))
    top = tl.max(ms, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(ms - top_safe)  # 0 for a split with nothing to attend
    total = tl.sum(tl.load(l_ptr + row * N_SPLITS + sp, mask=spm, other=0.0) * weight, axis=0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # no division by 0 in either branch
    t = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    tm = t < T
    s = tl.load(scores_ptr + row * T + t, mask=tm, other=float("-inf"))
    tl.store(scores_ptr + row * T + t, tl.exp(s - top_safe) * inv, mask=tm)
    if blk == 0:
        d = tl.arange(0, DP)
        parts = tl.load(acc_ptr + (row * N_SPLITS + sp)[:, None] * DP + d[None, :], mask=spm[:, None], other=0.0)
        out = tl.sum(parts * weight[:, None], axis=0) * inv
        tl.store(out_ptr + row * HD + d, out, mask=d < HD)


def _level_table(levels, device) -> torch.Tensor:
    table = torch.zeros(max(len(levels), 1), _COLS, dtype=torch.int64)
    for lvl, (rows, index) in enumerate(levels):
        widths = plane_widths(rows.bits)
        shift = rows.bits
        for p, (plane, w) in enumerate(zip(rows.planes, widths)):
            shift -= w
            table[lvl, _PLANE + p] = plane.data_ptr()
            table[lvl, _WIDTH + p] = w
            table[lvl, _SHIFT + p] = shift
        table[lvl, _SCALE] = rows.scale.data_ptr()
        table[lvl, _ZERO] = 0 if rows.zero is None else rows.zero.data_ptr()
        table[lvl, _BITS] = rows.bits
        table[lvl, _INDEX] = 0 if index is None else index.data_ptr()
        table[lvl, _ROWS] = rows.n_rows
        table[lvl, _NPLANES] = len(widths)
    return table.to(device, non_blocking=True) if device.type != "cpu" else table


def _dense_rows(rows):
    """The level with rows whose planes, scales and zero-points are contiguous (the table holds one stride)."""
    if all(p.is_contiguous() for p in rows.planes) and rows.scale.is_contiguous() and (
            rows.zero is None or rows.zero.is_contiguous()):
        return rows
    return QuantizedRows(tuple(p.contiguous() for p in rows.planes), rows.scale.contiguous(),
                         None if rows.zero is None else rows.zero.contiguous(), rows.bits, rows.length,
                         rows.group_size)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(rows_of_work: int, blocks: int, device: torch.device) -> int:
    """Token splits per (batch row, KV head): enough programs to fill the GPU twice over."""
    if device.type == "cuda":
        target = 2 * _multiprocessors(device)
    else:
        target = 4  # the interpreter: a few splits, so that the combine step is exercised
    return max(1, min(blocks, -(-target // max(rows_of_work, 1)), 256))


def triton_decode_attention(query: torch.Tensor, history, scaling: float, allowed: torch.Tensor | None = None,
                            block_t: int | None = None, splits: int | None = None):
    """`packed_decode_attention`'s (out [B, Hq, 1, D] in the query's dtype, probs [B, Hq, T] float32) on the GPU.

    Inputs as `smartkv.packed_attention.packed_decode_attention` (shapes checked there). `block_t`
    (tokens per loop step) and `splits` (token splits per KV head) default to a choice by size.
    Unlike the C++ kernel, a unit stored at no level is not refused when `history.evicts` is False
    (that would need a device-to-host sync each step): it is masked like an evicted unit.
    """
    b, hq, _, hd = query.shape
    hkv = history.sink_k.shape[1]
    g = hq // hkv
    t_len = history.length
    device = query.device
    out = torch.zeros(b, hq, hd, dtype=torch.float32, device=device)
    probs = torch.empty(b, hq, t_len, dtype=torch.float32, device=device)
    if t_len == 0:
        return out.view(b, hq, 1, hd).to(query.dtype), probs
    levels = [(_dense_rows(rows), None if index is None else index.to(torch.int32).contiguous())
              for rows, index in history.levels if rows.n_rows]
    if len(levels) > MAX_LEVELS:
        raise ValueError(f"the Triton kernel takes at most {MAX_LEVELS} levels, got {len(levels)}")
    group = levels[0][0].group_size if levels else hd
    if any(rows.group_size != group for rows, _ in levels):
        raise ValueError("every level must share one group size")
    table = _level_table(levels, device)
    n_units = history.n_quant * b * 2 * hkv * hd // history.unit_len
    unit_map = torch.full((max(n_units, 1),), -1, dtype=torch.int32, device=device)
    if levels:
        most = max(rows.n_rows for rows, _ in levels)
        _unit_map_kernel[(triton.cdiv(most, 256), len(levels))](table, unit_map, COLS=_COLS, BLOCK=256)
    dp = triton.next_power_of_2(hd)
    gq = max(2, triton.next_power_of_2(g))
    if block_t is None:  # keep the [query heads, tokens, head_dim] product tile near 8K values
        block_t = max(8, min(64, triton.next_power_of_2(max(1, 8192 // (gq * dp)))))
    blocks = triton.cdiv(t_len, block_t)
    n_splits = splits or _splits(b * hkv, blocks, device)
    n_splits = max(1, min(n_splits, blocks))
    chunk = triton.cdiv(blocks, n_splits) * block_t
    n_splits = triton.cdiv(t_len, chunk)
    m = torch.empty(b * hq * n_splits, dtype=torch.float32, device=device)
    lsum = torch.empty_like(m)
    acc = torch.empty(b * hq * n_splits, dp, dtype=torch.float32, device=device)
    q = query.reshape(b, hq, hd).float().contiguous()
    smooth = history.k_shift is not None and history.n_quant > 0
    shift = history.k_shift.float().reshape(b, hkv, hd).contiguous() if smooth else q
    kscale = history.k_scale.float().reshape(b, hkv, hd).contiguous() if smooth else q
    allow = allowed.to(torch.bool).contiguous().view(torch.uint8) if allowed is not None else q
    sk, sv, wk, wv = (_rows_contiguous(x) for x in (history.sink_k, history.sink_v, history.win_k, history.win_v))
    _attend_split_kernel[(b * hkv, n_splits)](
        q, sk, sv, wk, wv, shift, kscale, allow, unit_map, table, probs, m, lsum, acc,
        b, hkv, g, history.sink_k.shape[2], history.n_quant, history.win_k.shape[2], history.unit_len, group, hd,
        chunk, n_splits, float(scaling),
        sk.stride(0), sk.stride(1), sk.stride(2), sv.stride(0), sv.stride(1), sv.stride(2),
        wk.stride(0), wk.stride(1), wk.stride(2), wv.stride(0), wv.stride(1), wv.stride(2),
        HEAD_MAJOR=history.head_major, HAS_SMOOTH=smooth, HAS_ALLOWED=allowed is not None,
        DP=dp, GQ=gq, BLOCK_T=block_t, COLS=_COLS,
    )
    block_r = min(1024, triton.next_power_of_2(t_len))
    _combine_kernel[(b * hq, triton.cdiv(t_len, block_r))](
        probs, m, lsum, acc, out, t_len, hd, n_splits,
        SP=max(2, triton.next_power_of_2(n_splits)), DP=dp, BLOCK_R=block_r,
    )
    return out.view(b, hq, 1, hd).to(query.dtype), probs


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernel indexes [B, H, n, D] with strides for B, H and n; only D must be contiguous."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()
