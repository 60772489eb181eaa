// Fused CPU de-quantization: packed bit planes -> scaled values, scattered into a buffer.
// Loaded by smartkv/kernels.py (torch.utils.cpp_extension.load); the PyTorch reference is
// QuantizedRows.dequantize in smartkv/quantize.py. Built with -ffp-contract=off so float32
// results are bit-identical to the reference (same operations in the same order, no FMA).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "half.h"
#include "unpack.h"

namespace {

using smartkv::unpack_any;

// float32 -> bfloat16 bits, round to nearest even: the arithmetic of c10's round_to_nearest_even,
// written with selects and masks instead of branches so that the store loop vectorizes
// (float16: smartkv::to_fp16_bits in half.h).
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(f != f);
  return static_cast<uint16_t>((0x7FC0u & nan_mask) | (r & ~nan_mask));
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
  static inline uint16_t cvt(float v) { return smartkv::to_fp16_bits(v); }
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
