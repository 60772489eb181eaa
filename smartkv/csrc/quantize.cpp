// Fused CPU quantization: rows of float32 values -> FP16 scale (and zero-point) per group and the
// codes packed into bit planes, in one pass per row. The PyTorch reference is the body of
// `quantize_rows` in smartkv/quantize.py, and this is bit-identical to it: the same float32
// operations in the same order (built with -ffp-contract=off, no FMA), IEEE division, round half
// to even, the same FP16 rounding (nearest even, then one step down for the zero-point / up for
// the scale where that rounding went the wrong way), the same plane layout.
//
// Why: a SmartKV layer quantizes its whole prompt at its first allocation (and every uniform or
// KIVI cache at prefill); the PyTorch path spends ~25 passes over the values in small ops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "half.h"
#include "kernels.h"

namespace {

constexpr float kFp16Max = 65504.0f;

#define SKQ_INLINE inline __attribute__((always_inline))

SKQ_INLINE uint16_t half_bits(float f) { return smartkv::to_fp16_bits(f); }

SKQ_INLINE float half_value(uint16_t bits) { return smartkv::fp16_bits_to_float(bits); }

// The neighbouring FP16 value of `bits` towards +inf (up) or -inf (down), as torch.nextafter gives.
SKQ_INLINE uint16_t half_step(uint16_t bits, bool up) {
  if ((bits & 0x7FFFu) == 0) return up ? 0x0001u : 0x8001u;
  const bool negative = bits & 0x8000u;
  return static_cast<uint16_t>(up != negative ? bits + 1 : bits - 1);
}

// `_round_fp16(x, "down")` / `"up"`: clamp to the FP16 range, round, step once if that passed x.
SKQ_INLINE uint16_t round_fp16(float x, bool up) {
  x = std::min(std::max(x, -kFp16Max), kFp16Max);
  uint16_t h = half_bits(x);
  const float hf = half_value(h);
  if (up ? hf < x : hf > x) h = half_step(h, up);
  return h;
}

// Min and max (or the largest magnitude) in eight lanes, so that the loops vectorize: min and max
// are exact whatever the order (finite values; a tie of -0 and +0 may keep either, equal values).
SKQ_INLINE void reduce_min_max(const float* x, int64_t n, float* lo, float* hi) {
  float l[8], h[8];
  for (int k = 0; k < 8; ++k) l[k] = h[k] = x[0];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      l[k] = x[i + k] < l[k] ? x[i + k] : l[k];
      h[k] = x[i + k] > h[k] ? x[i + k] : h[k];
    }
  for (; i < n; ++i) {
    l[0] = x[i] < l[0] ? x[i] : l[0];
    h[0] = x[i] > h[0] ? x[i] : h[0];
  }
  for (int k = 1; k < 8; ++k) {
    l[0] = l[k] < l[0] ? l[k] : l[0];
    h[0] = h[k] > h[0] ? h[k] : h[0];
  }
  *lo = l[0];
  *hi = h[0];
}

SKQ_INLINE float reduce_absmax(const float* x, int64_t n) {
  float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) m[k] = std::fabs(x[i + k]) > m[k] ? std::fabs(x[i + k]) : m[k];
  for (; i < n; ++i) m[0] = std::fabs(x[i]) > m[0] ? std::fabs(x[i]) : m[0];
  for (int k = 1; k < 8; ++k) m[0] = m[k] > m[0] ? m[k] : m[0];
  return m[0];
}

// The reference rounds half to even, then clamps to the code range; for an integer range, clamping
// first gives the same codes, and then |v| <= 255, where adding and removing 1.5 * 2^23 rounds half
// to even (default rounding mode) in two plain operations that vectorize, unlike a libm call.
SKQ_INLINE float clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

SKQ_INLINE float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

struct Planes {
  int np = 0;
  int width[4] = {0, 0, 0, 0};
  int shift[4] = {0, 0, 0, 0};
  uint8_t* ptr[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t stride[4] = {0, 0, 0, 0};
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void quantize_row(const float* x, int64_t length, int64_t G, int bits, bool symmetric, at::Half* scale_out,
                  at::Half* zero_out, const Planes& P, int64_t row, uint8_t* codes) {
  const int64_t groups = (length + G - 1) / G;
  for (int64_t gi = 0; gi < groups; ++gi) {
    const float* xg = x + gi * G;
    const int64_t n = std::min(G, length - gi * G);  // a last, shorter group: the reference pads with
                                                    // the last value, which changes no min, max or absmax
    uint8_t* cg = codes + gi * G;
    if (symmetric) {
      const int qmax = (1 << (bits - 1)) - 1;
      const float absmax = reduce_absmax(xg, n);
      uint16_t sb = round_fp16(absmax / static_cast<float>(qmax), true);
      if (!(half_value(sb) > 0.0f)) sb = half_bits(1.0f);
      const float s = half_value(sb);
      const float lim = static_cast<float>(qmax);
      for (int64_t i = 0; i < n; ++i) cg[i] = static_cast<uint8_t>(round_even(clamp(xg[i] / s, -lim, lim)) + lim);
      scale_out[gi].x = sb;
    } else {
      const int qmax = (1 << bits) - 1;
      float lo, hi;
      reduce_min_max(xg, n, &lo, &hi);
      const uint16_t zb = round_fp16(lo, false);
      const float z = half_value(zb);
      uint16_t sb = round_fp16((hi - z) / static_cast<float>(qmax), true);
      if (!(half_value(sb) > 0.0f)) sb = half_bits(1.0f);
      const float s = half_value(sb);
      const float lim = static_cast<float>(qmax);
      for (int64_t i = 0; i < n; ++i) cg[i] = static_cast<uint8_t>(round_even(clamp((xg[i] - z) / s, 0.0f, lim)));
      scale_out[gi].x = sb;
      zero_out[gi].x = zb;
    }
  }
  // Planes, most significant first: value k of each byte's 8 / w fields sits at bits [k * w, (k + 1) * w).
  for (int p = 0; p < P.np; ++p) {
    const int w = P.width[p], per_byte = 8 / w, shift = P.shift[p];
    const uint8_t mask = static_cast<uint8_t>((1u << w) - 1u);
    uint8_t* dst = P.ptr[p] + row * P.stride[p];
    const int64_t nbytes = (length * w + 7) / 8;
    const int64_t full = length / per_byte;  // bytes whose fields are all values (the last may be padded)
    for (int64_t j = 0; j < full; ++j) {
      uint8_t byte = 0;
      for (int k = 0; k < per_byte; ++k)
        byte |= static_cast<uint8_t>(((codes[j * per_byte + k] >> shift) & mask) << (k * w));
      dst[j] = byte;
    }
    for (int64_t j = full; j < nbytes; ++j) {
      uint8_t byte = 0;
      for (int k = 0; k < per_byte && j * per_byte + k < length; ++k)
        byte |= static_cast<uint8_t>(((codes[j * per_byte + k] >> shift) & mask) << (k * w));
      dst[j] = byte;
    }
  }
}

}  // namespace

std::vector<at::Tensor> quantize_rows(at::Tensor x, int64_t bits, int64_t group_size, bool symmetric) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "x must be a contiguous float32 [N, L] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && (!symmetric || bits >= 2), "bits must be in 1..8 (2..8 symmetric)");
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1");
  const int64_t n = x.size(0), length = x.size(1);
  const int64_t groups = (length + group_size - 1) / group_size;
  Planes P;
  std::vector<at::Tensor> out;
  int rest = static_cast<int>(bits), shift = static_cast<int>(bits);
  for (int w : {8, 4, 2, 1}) {
    if (rest >= w) {
      rest -= w;
      shift -= w;
      at::Tensor plane = at::empty({n, (length * w + 7) / 8}, x.options().dtype(at::kByte));
      P.width[P.np] = w;
      P.shift[P.np] = shift;
      P.ptr[P.np] = plane.data_ptr<uint8_t>();
      P.stride[P.np] = plane.size(1);
      ++P.np;
      out.push_back(plane);
    }
  }
  at::Tensor scale = at::empty({n, groups}, x.options().dtype(at::kHalf));
  at::Tensor zero = symmetric ? at::Tensor() : at::empty({n, groups}, x.options().dtype(at::kHalf));
  const float* xp = x.data_ptr<float>();
  at::Half* sp = scale.data_ptr<at::Half>();
  at::Half* zp = symmetric ? nullptr : zero.data_ptr<at::Half>();
  if (n && length) {
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> codes(groups * group_size);
      for (int64_t r = begin; r < end; ++r)
        quantize_row(xp + r * length, length, group_size, static_cast<int>(bits), symmetric, sp + r * groups,
                     zp ? zp + r * groups : nullptr, P, r, codes.data());
    });
  }
  out.push_back(scale);
  if (!symmetric) out.push_back(zero);
  return out;
}
