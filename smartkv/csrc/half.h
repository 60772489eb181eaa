// float32 <-> float16 bits without branches, inlined into each caller (and so into every
// target_clones copy). Shared by dequant.cpp and quantize.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace smartkv {

// float32 -> float16 bits, round to nearest even: the arithmetic of c10's fp16_ieee_from_fp32_value
// (software path), written with selects and masks instead of branches so that loops vectorize.
inline __attribute__((always_inline)) uint16_t to_fp16_bits(float f) {
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

// float16 bits -> float32, exact for every finite value (normal and subnormal): move exponent and
// mantissa into float position and multiply by 2^112 to re-bias.
inline __attribute__((always_inline)) float fp16_bits_to_float(uint16_t x) {
  const uint32_t bits = (static_cast<uint32_t>(x) & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &bits, 4);
  f *= 5.192296858534828e+33f;  // 2^112
  return (x & 0x8000u) ? -f : f;
}

}  // namespace smartkv
