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

// Eight codes of one plane as the eight bytes of a word, little-end field first (the tables'
// layout): from 4 bytes of 4-bit fields, from 2 bytes of 2-bit fields. Shifts and masks in one
// register instead of a table load and a 2- or 4-byte store per source byte; the eight codes then
// leave in one 8-byte store, which an 8-byte load (the float conversion's) reads back at once.
// Narrower stores under a wider load stall that load until they retire: on this layout that stall
// was most of the time spent unpacking 2- and 4-bit rows.
#define SKV_UNPACK_INLINE inline __attribute__((always_inline))  // into each caller's target clone
SKV_UNPACK_INLINE uint64_t spread_nibbles(uint32_t x) {
  uint64_t lo = x & 0x0F0F0F0Fu, hi = (x >> 4) & 0x0F0F0F0Fu;  // fields 2i and 2i + 1 in byte i
  lo = (lo | (lo << 16)) & 0x0000FFFF0000FFFFull;
  lo = (lo | (lo << 8)) & 0x00FF00FF00FF00FFull;  // field 2i in byte 2i
  hi = (hi | (hi << 16)) & 0x0000FFFF0000FFFFull;
  hi = (hi | (hi << 8)) & 0x00FF00FF00FF00FFull;
  return lo | (hi << 8);
}

SKV_UNPACK_INLINE uint64_t spread_pairs(uint16_t x) {
  uint64_t y = x;
  y = (y | (y << 24)) & 0x000000FF000000FFull;  // fields 0-3 in bits 0-7, fields 4-7 in bits 32-39
  y = (y | (y << 12)) & 0x000F000F000F000Full;  // two fields in the low bits of each 16
  return (y | (y << 6)) & 0x0303030303030303ull;  // one field per byte
}

// The next eight codes of a W-bit plane (W bytes of it) as one word.
template <int W>
SKV_UNPACK_INLINE uint64_t eight_codes(const uint8_t* src) {
  if (W == 1) return kTables.w1[src[0]];
  if (W == 2) {
    uint16_t x;
    std::memcpy(&x, src, 2);
    return spread_pairs(x);
  }
  uint32_t x;
  std::memcpy(&x, src, 4);
  return spread_nibbles(x);
}

// Unpack one plane of `nbytes` bytes into codes (each value shifted left by `shift`);
// the first plane assigns, later planes OR in. Eight codes per step, then the bytes of a last
// partial step through the per-byte tables. Writes up to 8/w - 1 codes past the row end, which
// the caller's buffer has room for. A field shifted by `shift` never leaves its byte
// (shift + w <= bits <= 8), so shifting a whole word is shifting every field.
template <int W, bool FIRST>
SKV_UNPACK_INLINE void unpack_plane(const uint8_t* __restrict src, int64_t nbytes, int shift,
                                    uint8_t* __restrict codes) {
  if (W == 8) {
    if (FIRST) {
      std::memcpy(codes, src, nbytes);
    } else {
      for (int64_t j = 0; j < nbytes; ++j) codes[j] |= src[j];
    }
    return;
  }
  int64_t j = 0;
  for (; j + W <= nbytes; j += W) {
    uint64_t v = eight_codes<W>(src + j) << shift;
    uint8_t* out = codes + 8 * (j / W);
    if (!FIRST) { uint64_t old; std::memcpy(&old, out, 8); v |= old; }
    std::memcpy(out, &v, 8);
  }
  for (; j < nbytes; ++j) {  // W = 2 or 4 only (W = 1 takes one byte per step)
    uint8_t* out = codes + (8 / W) * j;
    if (W == 2) {
      uint32_t v = kTables.w2[src[j]] << shift;
      if (!FIRST) { uint32_t old; std::memcpy(&old, out, 4); v |= old; }
      std::memcpy(out, &v, 4);
    } else {
      uint16_t v = uint16_t(kTables.w4[src[j]] << shift);
      if (!FIRST) { uint16_t old; std::memcpy(&old, out, 2); v |= old; }
      std::memcpy(out, &v, 2);
    }
  }
}

template <bool FIRST>
SKV_UNPACK_INLINE void unpack_any(int w, const uint8_t* src, int64_t nbytes, int shift, uint8_t* codes) {
  switch (w) {
    case 8: unpack_plane<8, FIRST>(src, nbytes, shift, codes); break;
    case 4: unpack_plane<4, FIRST>(src, nbytes, shift, codes); break;
    case 2: unpack_plane<2, FIRST>(src, nbytes, shift, codes); break;
    default: unpack_plane<1, FIRST>(src, nbytes, shift, codes); break;
  }
}

}  // namespace smartkv
