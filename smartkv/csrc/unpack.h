// Bit-plane unpacking shared by the de-quantization and packed-attention kernels.
// The layout is smartkv/quantize.py's: a b-bit code is split into planes of 8/4/2/1 bits,
// most significant first, each packed densely into uint8 (little-end field first).
#pragma once

#include <cstdint>
#include <cstring>

namespace smartkv {

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
inline const Tables kTables;  // C++17 inline variable: one copy across translation units

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

}  // namespace smartkv
