// One decode query's attention mass folded into one importance statistic, in one pass.
//
// The reference is the PyTorch path of ImportanceTracker.add_step (smartkv/importance.py): for a
// statistic held in `state` [B, H, T0] (float32, float16 or bfloat16) and the query's attention mass
// `mass` [B, H, T] in float32 (T >= T0: the newest tokens are not in the statistic yet),
//
//     value = mass * weight                                  (weight 1: the mass as it is)
//     state = (pad(state, T).float() * keep_share + value).to(state.dtype)
//
// Each value is the reference's float32 multiply, multiply and add in its order (built with
// -ffp-contract=off: no FMA) and the same round-to-nearest-even cast, so the result is bit-identical;
// tests/test_tracker_step.py checks it. The mass itself (softmax weights summed over a KV head's
// query heads, and over the KV heads for a per-token statistic) stays torch's sum: its order of
// additions depends on the vector width and the thread split, and a copy of it would not be the
// same sum on every machine. What this replaces is the rest: a pad, the weight, a float32 copy,
// a multiply, an add and the cast back, six tensor ops over the history for every statistic, layer
// and decode step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "half.h"
#include "kernels.h"

namespace {

template <typename T> struct Stat;
template <> struct Stat<float> {
  static inline float load(float x) { return x; }
  static inline float store(float v) { return v; }
};
template <> struct Stat<at::Half> {
  static inline float load(at::Half x) { return smartkv::fp16_bits_to_float(x.x); }
  static inline at::Half store(float v) { return at::Half(smartkv::to_fp16_bits(v), at::Half::from_bits()); }
};
template <> struct Stat<at::BFloat16> {
  static inline float load(at::BFloat16 x) { return static_cast<float>(x); }
  static inline at::BFloat16 store(float v) { return at::BFloat16(v); }  // round to nearest even
};

// Rows [begin, end) of [B * H] rows: out[r, :T0] from the held values, out[r, T0:] from the zeros the
// reference pads with.
template <typename T>
__attribute__((target_clones("avx2", "default")))
void fold_rows(const T* __restrict state, const float* __restrict mass, T* __restrict out, int64_t begin,
               int64_t end, int64_t t0, int64_t t, float keep, float weight) {
  for (int64_t r = begin; r < end; ++r) {
    const T* st = state + r * t0;
    const float* m = mass + r * t;
    T* o = out + r * t;
    for (int64_t j = 0; j < t0; ++j) {
      const float value = m[j] * weight;
      o[j] = Stat<T>::store(Stat<T>::load(st[j]) * keep + value);
    }
    for (int64_t j = t0; j < t; ++j) {
      const float value = m[j] * weight;
      o[j] = Stat<T>::store(0.0f * keep + value);
    }
  }
}

}  // namespace

at::Tensor fold_attention_step(at::Tensor state, at::Tensor mass, double keep_share, double weight) {
  TORCH_CHECK(state.device().is_cpu() && mass.device().is_cpu(), "fold_attention_step: CPU tensors only");
  TORCH_CHECK(mass.dim() == 3 && mass.scalar_type() == at::kFloat && mass.is_contiguous(),
              "fold_attention_step: mass must be contiguous float32 [B, H, T]");
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous(), "fold_attention_step: state must be contiguous [B, H, T0]");
  const int64_t b = mass.size(0), h = mass.size(1), t = mass.size(2), t0 = state.size(2);
  TORCH_CHECK(state.size(0) == b && state.size(1) == h && t0 <= t, "fold_attention_step: state ", state.sizes(),
              " does not fit mass ", mass.sizes());
  at::Tensor out = at::empty({b, h, t}, state.options());
  const float keep = static_cast<float>(keep_share), w = static_cast<float>(weight);  // as torch casts a scalar
  const int64_t rows = b * h;
  // a row is little work: split rows over threads only where there are enough values to pay for it
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, t));
  const float* m = mass.data_ptr<float>();
  auto run = [&](auto* st, auto* o) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(o)>>;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      fold_rows<T>(st, m, o, begin, end, t0, t, keep, w);
    });
  };
  switch (state.scalar_type()) {
    case at::kFloat: run(state.data_ptr<float>(), out.data_ptr<float>()); break;
    case at::kHalf: run(state.data_ptr<at::Half>(), out.data_ptr<at::Half>()); break;
    case at::kBFloat16: run(state.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "fold_attention_step: state dtype ", state.scalar_type(),
                         " is not one of float32, float16, bfloat16");
  }
  return out;
}
