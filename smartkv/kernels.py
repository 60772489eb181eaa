"""Fused CPU de-quantization: packed bit planes -> scaled values, scattered straight into a buffer.

`dequantize_into(rows, out, index)` does what `out.index_copy_(0, index, rows.dequantize(out.dtype))`
does (or `out[:N] = rows.dequantize(out.dtype)` when `index` is None) in one pass over each row,
with no intermediate tensors: unpack the planes of a row into uint8 codes through small per-byte
tables, then `code * scale + zero` (asymmetric) or `(code - offset) * scale` (symmetric) in
float32, converted to `out.dtype` on store. The arithmetic is the reference's, in the same order
and without fused multiply-adds (-ffp-contract=off), so float32 results are bit-identical to
`QuantizedRows.dequantize(torch.float32)` and lower-precision results equal its conversion.

The C++ extension is built on first use with `torch.utils.cpp_extension.load_inline` into
`$SMARTKV_HOME/torch_extensions/<torch and python version>/` (default home `~/.cache/smartkv`);
torch's own file baton in that directory keeps two processes from building at once, and a
thread lock does the same within one process. If the build fails (no compiler, say) or
`SMARTKV_NO_KERNEL=1` is set, the PyTorch path is used instead and the reason is logged once
at INFO; `dequantize_into` always works either way.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from smartkv.quantize import QuantizedRows

log = logging.getLogger(__name__)

_EXT_NAME = "smartkv_dequant"
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Per-byte tables: the 8/w fields of a byte value, one field per output byte, little-end first.
struct Tables {
  uint64_t w1[256];
  uint32_t w2[256];
  uint16_t w4[256];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      uint64_t t1 = 0;
      for (int k = 0; k < 8; ++k) t1 |= uint64_t((b >> k) & 1) << (8 * k);
      uint32_t t2 = 0;
      for (int k = 0; k < 4; ++k) t2 |= uint32_t((b >> (2 * k)) & 3) << (8 * k);
      uint16_t t4 = 0;
      for (int k = 0; k < 2; ++k) t4 |= uint16_t((b >> (4 * k)) & 15) << (8 * k);
      w1[b] = t1;
      w2[b] = t2;
      w4[b] = t4;
    }
  }
};
const Tables kTables;

// Unpack one plane of `nbytes` bytes into codes (each value shifted left by `shift`);
// the first plane assigns, later planes OR in. Writes up to 8/w - 1 codes past the row end,
// which the caller's buffer has room for. A field shifted by `shift` never leaves its byte
// (shift + w <= bits <= 8), so shifting the whole table word is shifting every field.
template <int W, bool FIRST>
inline void unpack_plane(const uint8_t* __restrict src, int64_t nbytes, int shift, uint8_t* __restrict codes) {
  if (W == 8) {
    if (FIRST) {
      std::memcpy(codes, src, nbytes);
    } else {
      for (int64_t j = 0; j < nbytes; ++j) codes[j] |= src[j];
    }
    return;
  }
  for (int64_t j = 0; j < nbytes; ++j) {
    if (W == 1) {
      uint64_t v = kTables.w1[src[j]] << shift;
      if (!FIRST) { uint64_t old; std::memcpy(&old, codes + 8 * j, 8); v |= old; }
      std::memcpy(codes + 8 * j, &v, 8);
    } else if (W == 2) {
      uint32_t v = kTables.w2[src[j]] << shift;
      if (!FIRST) { uint32_t old; std::memcpy(&old, codes + 4 * j, 4); v |= old; }
      std::memcpy(codes + 4 * j, &v, 4);
    } else {
      uint16_t v = uint16_t(kTables.w4[src[j]] << shift);
      if (!FIRST) { uint16_t old; std::memcpy(&old, codes + 2 * j, 2); v |= old; }
      std::memcpy(codes + 2 * j, &v, 2);
    }
  }
}

template <bool FIRST>
inline void unpack_any(int w, const uint8_t* src, int64_t nbytes, int shift, uint8_t* codes) {
  switch (w) {
    case 8: unpack_plane<8, FIRST>(src, nbytes, shift, codes); break;
    case 4: unpack_plane<4, FIRST>(src, nbytes, shift, codes); break;
    case 2: unpack_plane<2, FIRST>(src, nbytes, shift, codes); break;
    default: unpack_plane<1, FIRST>(src, nbytes, shift, codes); break;
  }
}

// float32 -> bfloat16 / float16 bits, round to nearest even: the arithmetic of c10's
// round_to_nearest_even and fp16_ieee_from_fp32_value (software path), written with selects
// and masks instead of branches so that the store loop vectorizes.
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(f != f);
  return static_cast<uint16_t>((0x7FC0u & nan_mask) | (r & ~nan_mask));
}

inline uint16_t to_fp16_bits(float f) {
  const uint32_t inf_bits = 239u << 23, zero_bits = 17u << 23;
  float scale_to_inf, scale_to_zero;
  std::memcpy(&scale_to_inf, &inf_bits, 4);
  std::memcpy(&scale_to_zero, &zero_bits, 4);
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = std::max(bias, 0x71000000u);
  const uint32_t bb = (bias >> 1) + 0x07800000u;
  float bf;
  std::memcpy(&bf, &bb, 4);
  base = bf + base;
  uint32_t bits;
  std::memcpy(&bits, &base, 4);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  return static_cast<uint16_t>((sign >> 16) | (0x7E00u & nan_mask) | (nonsign & ~nan_mask));
}

template <typename out_t> struct Store;
template <> struct Store<float> {
  using raw = float;
  static inline float cvt(float v) { return v; }
};
template <> struct Store<at::BFloat16> {
  using raw = uint16_t;
  static inline uint16_t cvt(float v) { return to_bf16_bits(v); }
};
template <> struct Store<at::Half> {
  using raw = uint16_t;
  static inline uint16_t cvt(float v) { return to_fp16_bits(v); }
};

template <typename out_t, bool SYM>
inline void scale_group(const uint8_t* __restrict c, int64_t n, float s, float z,
                        typename Store<out_t>::raw* __restrict o) {
  for (int64_t i = 0; i < n; ++i) {
    float v = static_cast<float>(static_cast<int32_t>(c[i]));
    if (SYM) {
      v = v - z;  // z holds the symmetric offset here
      v = v * s;
    } else {
      v = v * s;
      v = v + z;
    }
    o[i] = Store<out_t>::cvt(v);
  }
}

struct Params {
  int np;
  const uint8_t* pptr[8];
  int64_t pstride[8], pbytes[8];
  int pwidth[8], pshift[8];
  const at::Half* sptr;
  int64_t sstride;
  const at::Half* zptr;
  int64_t zstride;
  void* optr;
  int64_t ostride;
  const void* index;
  int64_t length, groups, group_size;
  float offset;
};

// Rows [begin, end): one clone for AVX2 machines, one for any x86-64 (picked at load time).
template <typename out_t, bool SYM, typename idx_t>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void rows_range(const Params& P, uint8_t* codes, int64_t begin, int64_t end) {
  using raw_t = typename Store<out_t>::raw;
  raw_t* optr = static_cast<raw_t*>(P.optr);
  const idx_t* index = static_cast<const idx_t*>(P.index);
  for (int64_t r = begin; r < end; ++r) {
    unpack_any<true>(P.pwidth[0], P.pptr[0] + r * P.pstride[0], P.pbytes[0], P.pshift[0], codes);
    for (int p = 1; p < P.np; ++p)
      unpack_any<false>(P.pwidth[p], P.pptr[p] + r * P.pstride[p], P.pbytes[p], P.pshift[p], codes);
    const int64_t dst = index ? static_cast<int64_t>(index[r]) : r;
    raw_t* o = optr + dst * P.ostride;
    const at::Half* sr = P.sptr + r * P.sstride;
    const at::Half* zr = SYM ? nullptr : P.zptr + r * P.zstride;
    for (int64_t g = 0; g < P.groups; ++g) {
      const int64_t start = g * P.group_size;
      const int64_t cnt = std::min(P.group_size, P.length - start);
      const float s = static_cast<float>(sr[g]);
      const float z = SYM ? P.offset : static_cast<float>(zr[g]);
      scale_group<out_t, SYM>(codes + start, cnt, s, z, o + start);
    }
  }
}

template <typename out_t, bool SYM, typename idx_t>
void run(const std::vector<at::Tensor>& planes, const std::vector<int64_t>& widths,
         const at::Tensor& scale, const at::Tensor* zero, int64_t bits, int64_t length,
         int64_t group_size, at::Tensor& out, const idx_t* index) {
  Params P;
  const int64_t n = scale.size(0);
  P.np = static_cast<int>(planes.size());
  int shift = static_cast<int>(bits);
  for (int p = 0; p < P.np; ++p) {
    P.pptr[p] = planes[p].data_ptr<uint8_t>();
    P.pstride[p] = planes[p].stride(0);
    P.pwidth[p] = static_cast<int>(widths[p]);
    P.pbytes[p] = (length * widths[p] + 7) / 8;
    shift -= P.pwidth[p];
    P.pshift[p] = shift;
  }
  P.sptr = scale.data_ptr<at::Half>();
  P.sstride = scale.stride(0);
  P.zptr = zero ? zero->data_ptr<at::Half>() : nullptr;
  P.zstride = zero ? zero->stride(0) : 0;
  P.optr = out.data_ptr<out_t>();
  P.ostride = out.stride(0);
  P.index = index;
  P.length = length;
  P.groups = scale.size(1);
  P.group_size = group_size;
  P.offset = (SYM && bits > 1) ? static_cast<float>((1 << (bits - 1)) - 1) : 0.0f;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, length));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(length + 16);
    rows_range<out_t, SYM, idx_t>(P, buf.data(), begin, end);
  });
}

template <typename out_t, typename idx_t>
void dispatch_sym(const std::vector<at::Tensor>& planes, const std::vector<int64_t>& widths,
                  const at::Tensor& scale, const c10::optional<at::Tensor>& zero, int64_t bits,
                  int64_t length, int64_t group_size, at::Tensor& out, const idx_t* index) {
  if (zero.has_value()) {
    run<out_t, false, idx_t>(planes, widths, scale, &zero.value(), bits, length, group_size, out, index);
  } else {
    run<out_t, true, idx_t>(planes, widths, scale, nullptr, bits, length, group_size, out, index);
  }
}

template <typename out_t>
void dispatch_index(const std::vector<at::Tensor>& planes, const std::vector<int64_t>& widths,
                    const at::Tensor& scale, const c10::optional<at::Tensor>& zero, int64_t bits,
                    int64_t length, int64_t group_size, at::Tensor& out,
                    const c10::optional<at::Tensor>& index) {
  if (!index.has_value()) {
    dispatch_sym<out_t, int32_t>(planes, widths, scale, zero, bits, length, group_size, out, nullptr);
  } else if (index->scalar_type() == at::kInt) {
    dispatch_sym<out_t, int32_t>(planes, widths, scale, zero, bits, length, group_size, out,
                                 index->data_ptr<int32_t>());
  } else {
    dispatch_sym<out_t, int64_t>(planes, widths, scale, zero, bits, length, group_size, out,
                                 index->data_ptr<int64_t>());
  }
}

}  // namespace

void dequantize_into(std::vector<at::Tensor> planes, std::vector<int64_t> widths, at::Tensor scale,
                     c10::optional<at::Tensor> zero, int64_t bits, int64_t length, int64_t group_size,
                     at::Tensor out, c10::optional<at::Tensor> index) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8");
  TORCH_CHECK(!planes.empty() && planes.size() <= 8 && planes.size() == widths.size(), "planes and widths disagree");
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.stride(1) == 1,
              "scale must be a float16 [N, groups] tensor with contiguous rows");
  const int64_t n = scale.size(0);
  TORCH_CHECK(scale.size(1) == (length + group_size - 1) / group_size, "scale has the wrong number of groups");
  int64_t wsum = 0;
  for (size_t p = 0; p < planes.size(); ++p) {
    const auto& t = planes[p];
    TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kByte && t.stride(1) == 1 && t.size(0) == n,
                "each plane must be a uint8 [N, bytes] tensor with contiguous rows");
    TORCH_CHECK(widths[p] == 1 || widths[p] == 2 || widths[p] == 4 || widths[p] == 8, "bad plane width");
    TORCH_CHECK(t.size(1) >= (length * widths[p] + 7) / 8, "plane is too short for the row length");
    wsum += widths[p];
  }
  TORCH_CHECK(wsum == bits, "plane widths do not add up to bits");
  if (zero.has_value()) {
    TORCH_CHECK(zero->scalar_type() == at::kHalf && zero->dim() == 2 && zero->size(0) == n &&
                    zero->size(1) == scale.size(1) && zero->stride(1) == 1,
                "zero must be a float16 tensor shaped like scale");
  }
  TORCH_CHECK(out.dim() == 2 && out.size(1) == length && out.stride(1) == 1, "out must be [M, length] with contiguous rows");
  const int64_t m = out.size(0);
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == n && index->is_contiguous(),
                "index must be a contiguous 1-D tensor of N entries");
    TORCH_CHECK(index->scalar_type() == at::kInt || index->scalar_type() == at::kLong, "index must be int32 or int64");
    if (index->scalar_type() == at::kInt) {
      const int32_t* ip = index->data_ptr<int32_t>();
      for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < m, "index ", ip[i], " out of range for ", m, " rows");
    } else {
      const int64_t* ip = index->data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < m, "index ", ip[i], " out of range for ", m, " rows");
    }
  } else {
    TORCH_CHECK(m >= n, "out has fewer rows than there are quantized rows");
  }
  if (n == 0 || length == 0) return;
  switch (out.scalar_type()) {
    case at::kFloat: dispatch_index<float>(planes, widths, scale, zero, bits, length, group_size, out, index); break;
    case at::kBFloat16: dispatch_index<at::BFloat16>(planes, widths, scale, zero, bits, length, group_size, out, index); break;
    case at::kHalf: dispatch_index<at::Half>(planes, widths, scale, zero, bits, length, group_size, out, index); break;
    default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16");
  }
}
"""

_lock = threading.Lock()
_module = None
_tried = False
_reason: str | None = None
_logged = False


def _home() -> Path:
    env = os.environ.get("SMARTKV_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "smartkv"


def build_directory() -> Path:
    """Where the extension is built and cached (one directory per torch and Python version)."""
    tag = f"{_EXT_NAME}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return _home() / "torch_extensions" / tag


def _build():
    from torch.utils.cpp_extension import load_inline

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = load_inline(
        name=_EXT_NAME,
        cpp_sources=[_CPP_SOURCE],
        functions=["dequantize_into"],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )
    log.debug("smartkv kernel loaded from %s in %.1f s", directory, time.perf_counter() - start)
    return module


def _note_fallback(reason: str) -> None:
    global _logged, _reason
    _reason = reason
    if not _logged:
        _logged = True
        log.info("smartkv: fused de-quantization kernel unavailable (%s); using the PyTorch path", reason)


def _load():
    """The compiled module, or None (SMARTKV_NO_KERNEL=1, or the build failed)."""
    global _module, _tried
    if os.environ.get("SMARTKV_NO_KERNEL", "") not in ("", "0"):
        _note_fallback("SMARTKV_NO_KERNEL is set")
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = _build()
            except Exception as exc:  # no compiler, failed build, failed import: fall back
                _module = None
                lines = str(exc).strip().splitlines()
                _note_fallback(f"build failed: {type(exc).__name__}: {lines[-1] if lines else ''}")
            _tried = True
    return _module


def kernel_available() -> bool:
    """Whether the fused kernel is (or can be) built and loaded; builds it if it was not yet."""
    return _load() is not None


def fallback_reason() -> str | None:
    """Why the PyTorch path is used, or None while the kernel is in use (or not yet tried)."""
    return _reason


def dequantize_reference(rows: "QuantizedRows", out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch path: `rows.dequantize(out.dtype)` scattered into `out` (rows `index`, else the first N)."""
    deq = rows.dequantize(out.dtype)
    if index is None:
        out[: rows.n_rows] = deq
    else:
        out.index_copy_(0, index.long(), deq)
    return out


def _kernel_can_take(rows: "QuantizedRows", out: torch.Tensor, index: torch.Tensor | None) -> bool:
    if out.device.type != "cpu" or out.dtype not in _OUT_DTYPES or out.dim() != 2 or out.stride(1) != 1:
        return False
    if rows.scale.device.type != "cpu" or rows.scale.dtype != torch.float16:
        return False
    if index is not None and (index.device.type != "cpu" or index.dtype not in (torch.int32, torch.int64)):
        return False
    return True


def dequantize_into(rows: "QuantizedRows", out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Write the de-quantized `rows` into `out[index[i]]` (or `out[i]` when `index` is None); returns `out`.

    `out` is a [M, rows.length] float32/bfloat16/float16 CPU tensor with contiguous rows; `index`
    is an int32 or int64 tensor of `rows.n_rows` distinct row numbers, or None. The result equals
    `out.index_copy_(0, index.long(), rows.dequantize(out.dtype))` exactly. Other devices and
    dtypes take the PyTorch path.
    """
    if out.dim() != 2 or out.shape[1] != rows.length:
        raise ValueError(f"out must be [M, {rows.length}], got shape {tuple(out.shape)}")
    if index is not None and (index.dim() != 1 or index.shape[0] != rows.n_rows):
        raise ValueError(f"index must hold {rows.n_rows} row numbers, got shape {tuple(index.shape)}")
    module = _load()
    if module is None or not _kernel_can_take(rows, out, index):
        return dequantize_reference(rows, out, index)
    from smartkv.quantize import plane_widths

    planes = [p if p.stride(-1) == 1 else p.contiguous() for p in rows.planes]
    scale = rows.scale if rows.scale.stride(-1) == 1 else rows.scale.contiguous()
    zero = rows.zero
    if zero is not None and zero.stride(-1) != 1:
        zero = zero.contiguous()
    if index is not None and not index.is_contiguous():
        index = index.contiguous()
    module.dequantize_into(
        planes, list(plane_widths(rows.bits)), scale, zero, rows.bits, rows.length, rows.group_size, out, index
    )
    return out
