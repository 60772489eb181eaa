// Decode attention of one query per head over a mixed-precision KV history, read straight from
// the packed codes: no full-precision copy of the history is ever made.
//
// History of one layer, oldest first (the token order of smartkv/cache/mixed.py):
//   [ sinks: float ][ quantized: n_quant tokens in packed units ][ window: float ]
// The quantized tokens are laid out as a virtual flat array in token-major order,
//   layer-major units: [n, B, 2 (K, V), H, D]      head-major units: [n, B, H, 2, D],
// cut into units of `unit_len` values (a token's K and V over all heads, one head's K and V,
// or either alone with kv_split). Each unit is one row of some level's QuantizedRows; the
// level's int32 index says which unit each row holds (empty index: rows in unit order).
// With `evicted_masked`, a unit stored at no level is an evicted (0-bit) unit: the tokens whose
// slices it holds get no attention from that (batch row, KV head); without it, such a unit is a
// corrupt layout and is refused.
//
// Keys (scores): k = shift + kscale * (code * s + z) per group (key smoothing optional), so
//   q . k = q . shift + sum_groups [ s * sum_d (q * kscale)_d code_d + z * sum_d (q * kscale)_d ]
// The query side (q * kscale, its group sums, q . shift) is computed once per head; each token
// costs one unpack of D codes and a dot product with the codes per query head.
// Values: sum_t p_t (code * s + z) = sum_t (p_t s) code + sum_t p_t z, so per group the weighted
// codes and the weighted zero-points accumulate separately and meet once at the end.
// Symmetric rows (value = (code - offset) * s) fold the same way with z = -offset * s.
//
// Grouped-query attention: the g query heads of a KV head share one unpack per token. Work is
// split over pieces of 256 stored rows per (batch row, KV head) in one OpenMP region (scores, then
// softmax per query head, then values into per-piece partial sums, reduced in piece order): a model
// with fewer KV heads than threads, or not a multiple (3 on 2 threads), still keeps every thread
// busy, and the results do not depend on the thread count. The softmax weights are written to
// `probs`, so the importance tracker needs no second q.k.
//
// Tokens go through in small blocks: a block's codes are unpacked (unpack.h: eight codes per word)
// into floats, then scored four tokens at a time (four independent dot-product chains instead of
// one) and their values added eight at a time with the accumulator in registers. Every sum still
// takes its terms in the order of the one-token-at-a-time loop, so the blocks change no bit of the
// result (checked against the unblocked kernel on 2,017 synthetic histories and 60 captured layers
// of SmolLM2 at 4k tokens). On those 4k layers, one thread, the kernel takes about a fifth less CPU
// time than unblocked with one table load per byte; in a whole 4k decode step on two threads the
// difference was within the machine's run-to-run spread (same-process A/B: 1.007x, 0.93-1.06).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "unpack.h"

namespace {

// Helpers are forced inline so that each one is compiled into both clones of attend_head
// (AVX2 and baseline x86-64); a call to an out-of-line copy would run the baseline code.
#define SKV_INLINE inline __attribute__((always_inline))

struct Level {
  int np = 0;
  const uint8_t* pptr[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t pstride[4] = {0, 0, 0, 0};
  int pwidth[4] = {0, 0, 0, 0};
  int pshift[4] = {0, 0, 0, 0};
  const at::Half* sptr = nullptr;
  int64_t sstride = 0;
  const at::Half* zptr = nullptr;  // null: symmetric
  int64_t zstride = 0;
  float offset = 0.0f;
  int bits = 0;
  int64_t rows = 0;
  const int32_t* index = nullptr;  // unit of each row; null: row r holds unit r
};

struct Ctx {
  int64_t B, Hq, Hkv, D, g, S, W, n, T, unit_len, group, ng;
  bool head_major;
  bool evicted_masked;
  const float* q;
  const float* sink_k;
  const float* sink_v;
  const float* win_k;
  const float* win_v;
  const float* k_shift;  // [B, Hkv, D] or null
  const float* k_scale;
  const bool* allowed;  // [B, T] or null
  float scaling;
  const Level* levels;
  int64_t n_levels;
  float* out;
  float* probs;
};

int plane_widths(int bits, int* w) {
  int np = 0, rest = bits;
  for (int width : {8, 4, 2, 1}) {
    if (rest >= width) {
      w[np++] = width;
      rest -= width;
    }
  }
  return np;
}

// Eight floats as one value (GCC's vector extension, so both clones of the callers get it: AVX2
// registers in one, pairs of SSE registers in the other). Arithmetic on it is lane by lane, with
// the rounding of the scalar code, so blocked loops built from it give the scalar loops' floats.
typedef float v8f __attribute__((vector_size(32)));

SKV_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

SKV_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

// The dot products of a with R right-hand sides b[r], each over eight lane sums, then a fixed
// reduction tree and the tail: eight partial sums so that the loop vectorizes without re-associating
// (-ffp-contract=off and no fast-math keep a plain reduction serial). One dot is a chain of n / 8
// dependent additions; R independent chains keep the adders busy instead of waiting on one, and
// each chain does what R = 1 does, so a block's scores equal one-token scores bit for bit.
template <int R>
SKV_INLINE void dot_rows(const float* __restrict a, const float* const* b, int64_t n, float* out) {
  v8f s[R];
  for (int r = 0; r < R; ++r) s[r] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f av = load8(a + i);
    for (int r = 0; r < R; ++r) s[r] += av * load8(b[r] + i);
  }
  for (int r = 0; r < R; ++r) {
    float tail = 0.0f;
    for (int64_t k = i; k < n; ++k) tail += a[k] * b[r][k];
    out[r] = ((s[r][0] + s[r][1]) + (s[r][2] + s[r][3])) + ((s[r][4] + s[r][5]) + (s[r][6] + s[r][7])) + tail;
  }
}

// y += a[0] x[0] + a[1] x[1] + ... + a[m-1] x[m-1], added one term at a time in that order (so each
// y[i] gets the additions m calls of axpy, the m = 1 case, would give it), with y held in registers
// across the m terms instead of loaded and stored once per term.
SKV_INLINE void axpy_rows(const float* a, const float* const* x, int m, float* __restrict y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v = load8(y + i);
    for (int r = 0; r < m; ++r) v += a[r] * load8(x[r] + i);
    store8(y + i, v);
  }
  for (; i < n; ++i)
    for (int r = 0; r < m; ++r) y[i] += a[r] * x[r][i];
}

// One dot product and one y += a x: the blocked loops with one row.
SKV_INLINE float dot(const float* a, const float* b, int64_t n) {
  float out;
  dot_rows<1>(a, &b, n, &out);
  return out;
}

SKV_INLINE void axpy(float a, const float* x, float* y, int64_t n) { axpy_rows(&a, &x, 1, y, n); }

// Where token t's K (kv = 0) or V (kv = 1) slice of one (batch row, KV head) lives: the slice
// index grows by 2 * B * Hkv per token, a multiple of the slices per unit (1, 2, Hkv or 2 * Hkv),
// so the unit grows by a fixed step and the offset inside it never changes.
struct SliceWalk {
  int64_t unit0, step, off;
  SliceWalk(const Ctx& C, int64_t b, int64_t h, int kv) {
    const int64_t slice0 = C.head_major ? (b * C.Hkv + h) * 2 + kv : (b * 2 + kv) * C.Hkv + h;
    const int64_t per_unit = C.unit_len / C.D;
    unit0 = slice0 / per_unit;
    off = (slice0 - unit0 * per_unit) * C.D;
    step = 2 * C.B * C.Hkv / per_unit;
  }
  // The token whose slice unit `u` holds, or -1 when u holds another batch row's or head's.
  SKV_INLINE int64_t token_of(int64_t u, int64_t n) const {
    const int64_t d = u - unit0;
    if (d < 0) return -1;
    const int64_t t = step == 1 ? d : d / step;
    return (t * step == d && t < n) ? t : -1;
  }
};

// float16 bits -> float, branch-free: move exponent and mantissa into float position and
// multiply by 2^112 to re-bias (exact for normal and subnormal halves; scales and zero-points
// are finite, so inf/nan need no care). c10::Half's portable conversion is several times longer.
SKV_INLINE float half_to_float(const at::Half h) {
  const uint32_t x = h.x;
  const uint32_t bits = (x & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &bits, 4);
  f *= 5.192296858534828e+33f;  // 2^112
  return (x & 0x8000u) ? -f : f;
}

// The D codes of row `row`'s slice at `off` as floats, with the scale/zero pointers at its first
// group. Within one level's loop the widths do not change, so the branches here always go the
// same way and are predicted.
SKV_INLINE void load_codes(const Level& L, int64_t row, int64_t off, int64_t D, int64_t G, uint8_t* codes, float* cf,
                           const at::Half** sc, const at::Half** zc) {
  for (int p = 0; p < L.np; ++p) {
    const uint8_t* src = L.pptr[p] + row * L.pstride[p] + off * L.pwidth[p] / 8;
    if (p == 0)
      smartkv::unpack_any<true>(L.pwidth[p], src, D * L.pwidth[p] / 8, L.pshift[p], codes);
    else
      smartkv::unpack_any<false>(L.pwidth[p], src, D * L.pwidth[p] / 8, L.pshift[p], codes);
  }
  for (int64_t d = 0; d < D; ++d) cf[d] = static_cast<float>(codes[d]);
  *sc = L.sptr + row * L.sstride + off / G;
  *zc = L.zptr ? L.zptr + row * L.zstride + off / G : nullptr;
}

// exp(x) for x <= 0 (softmax after subtracting the max), branch-free so that the loop vectorizes:
// 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), p the degree-6
// Taylor polynomial (relative error < 2e-7 for |r| <= ln 2 / 2). Below -87 it returns 0.
SKV_INLINE float exp_nonpositive(float x) {
  const float keep = x >= -87.0f ? 1.0f : 0.0f;  // masked (-inf) and negligible scores give exactly 0
  x = std::max(x, -87.0f);
  // round to nearest by the 1.5 * 2^23 trick (a plain add and subtract, which vectorizes)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n * keep;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SKV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SKV_CLONES
#endif

// The query side of one (batch row, KV head), computed once per call: per query head j of the group,
// the scaled query qs, the query folded with the key scale qk, qk's group sums and q . shift.
struct Prep {
  const float* qs;    // [g, D]
  const float* qk;    // [g, D]
  const float* qsum;  // [g, ng]
  const float* cst;   // [g]
};

int64_t prep_floats(const Ctx& C) { return C.g * (2 * C.D + C.ng + 1); }

Prep prep_at(const Ctx& C, const float* buf) {
  return {buf, buf + C.g * C.D, buf + 2 * C.g * C.D, buf + 2 * C.g * C.D + C.g * C.ng};
}

// Query folding, then the scores of the sinks and the window (full precision), and -inf for every
// quantized token when evictions are masked (rows that hold a token overwrite it later).
void prep_head(const Ctx& C, int64_t b, int64_t h, float* buf) {
  const int64_t D = C.D, g = C.g, ng = C.ng, T = C.T, G = C.group;
  float* qs = buf;
  float* qk = qs + g * D;
  float* qsum = qk + g * D;
  float* cst = qsum + g * ng;
  const int64_t kv_off = (b * C.Hkv + h) * D;
  for (int64_t j = 0; j < g; ++j) {
    const float* qj = C.q + (b * C.Hq + h * g + j) * D;
    for (int64_t d = 0; d < D; ++d) qs[j * D + d] = qj[d] * C.scaling;
    for (int64_t d = 0; d < D; ++d) qk[j * D + d] = C.k_scale ? qs[j * D + d] * C.k_scale[kv_off + d] : qs[j * D + d];
    cst[j] = C.k_shift ? dot(qs + j * D, C.k_shift + kv_off, D) : 0.0f;
    for (int64_t gi = 0; gi < ng; ++gi) {
      float s = 0.0f;
      for (int64_t d = 0; d < G; ++d) s += qk[j * D + gi * G + d];
      qsum[j * ng + gi] = s;
    }
  }
  float* P = C.probs + (b * C.Hq + h * g) * T;  // row j at P + j * T
  for (int64_t t = 0; t < C.S; ++t) {
    const float* k = C.sink_k + ((b * C.Hkv + h) * C.S + t) * D;
    for (int64_t j = 0; j < g; ++j) P[j * T + t] = dot(qs + j * D, k, D);
  }
  if (C.evicted_masked)  // a token no level's row names was evicted: it keeps this -inf score
    for (int64_t j = 0; j < g; ++j) std::fill(P + j * T + C.S, P + j * T + C.S + C.n, -std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < C.W; ++t) {
    const float* k = C.win_k + ((b * C.Hkv + h) * C.W + t) * D;
    for (int64_t j = 0; j < g; ++j) P[j * T + C.S + C.n + t] = dot(qs + j * D, k, D);
  }
}

// Rows are unpacked and scored in blocks of this many tokens (see dot_rows); the buffer of unpacked
// codes holds one block.
constexpr int kScoreBlock = 4;
constexpr int kValueBlock = 8;
constexpr int kBlockRows = kValueBlock > kScoreBlock ? kValueBlock : kScoreBlock;

// The scores of a block of nb unpacked tokens (codes as floats at rows[k], metadata at sc[k] and
// zc[k]) for every query head of the group: per head, q . shift + sum over groups of
// scale * (qk . codes) + zero * sum(qk), in that order.
SKV_INLINE void score_block(const Ctx& C, const Prep& Q, const Level& L, float* P, int nb, const int64_t* tok,
                            const float* const* rows, const at::Half* const* sc, const at::Half* const* zc) {
  const int64_t D = C.D, g = C.g, ng = C.ng, T = C.T, G = C.group;
  for (int64_t j = 0; j < g; ++j) {
    float s[kScoreBlock];
    for (int k = 0; k < nb; ++k) s[k] = Q.cst[j];
    for (int64_t gi = 0; gi < ng; ++gi) {
      const float* a = Q.qk + j * D + gi * G;
      const float* bs[kScoreBlock];
      float dc[kScoreBlock];
      for (int k = 0; k < nb; ++k) bs[k] = rows[k] + gi * G;
      if (nb == kScoreBlock)
        dot_rows<kScoreBlock>(a, bs, G, dc);
      else
        for (int k = 0; k < nb; ++k) dc[k] = dot(a, bs[k], G);
      for (int k = 0; k < nb; ++k) {
        const float scale = half_to_float(sc[k][gi]);
        const float zero = zc[k] ? half_to_float(zc[k][gi]) : -L.offset * scale;
        s[k] += scale * dc[k] + zero * Q.qsum[j * ng + gi];
      }
    }
    for (int k = 0; k < nb; ++k) P[j * T + C.S + tok[k]] = s[k];
  }
}

// Scores of the quantized tokens held in rows [r0, r1) of level L, for one (batch row, KV head),
// unpacked and scored kScoreBlock tokens at a time.
SKV_CLONES void score_rows(const Ctx& C, int64_t b, int64_t h, const Prep& Q, const Level& L, int64_t r0, int64_t r1,
                           uint8_t* codes, float* cf) {
  float* P = C.probs + (b * C.Hq + h * C.g) * C.T;
  const SliceWalk kwalk(C, b, h, 0);
  int64_t tok[kScoreBlock];
  const at::Half* sc[kScoreBlock];
  const at::Half* zc[kScoreBlock];
  const float* rows[kScoreBlock];
  int nb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = kwalk.token_of(L.index ? L.index[r] : r, C.n);
    if (t < 0) continue;  // a row of another batch row or head
    rows[nb] = cf + nb * C.D;
    load_codes(L, r, kwalk.off, C.D, C.group, codes, cf + nb * C.D, &sc[nb], &zc[nb]);
    tok[nb++] = t;
    if (nb == kScoreBlock) {
      score_block(C, Q, L, P, nb, tok, rows, sc, zc);
      nb = 0;
    }
  }
  if (nb) score_block(C, Q, L, P, nb, tok, rows, sc, zc);
}

// Softmax of one query head's scores in place (masked tokens get exactly 0; nothing to attend: all 0).
SKV_CLONES void softmax_row(const Ctx& C, int64_t b, float* row) {
  const int64_t T = C.T;
  const bool* allowed = C.allowed ? C.allowed + b * T : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (allowed)
    for (int64_t t = 0; t < T; ++t)
      if (!allowed[t]) row[t] = neg_inf;
  float m = neg_inf;
  for (int64_t t = 0; t < T; ++t) m = std::max(m, row[t]);
  if (m == neg_inf) {
    std::fill(row, row + T, 0.0f);
    return;
  }
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= T; t += 8)
    for (int k = 0; k < 8; ++k) {
      row[t + k] = exp_nonpositive(row[t + k] - m);
      part[k] += row[t + k];
    }
  double total = 0.0;
  for (; t < T; ++t) {
    row[t] = exp_nonpositive(row[t] - m);
    total += row[t];
  }
  for (int k = 0; k < 8; ++k) total += part[k];
  const float inv = static_cast<float>(1.0 / total);
  for (int64_t t2 = 0; t2 < T; ++t2) row[t2] *= inv;
}

// A block of nb unpacked tokens' weighted values into acc [g, D] and weighted zero-points into
// zacc [g, ng], the tokens taken in block order (see axpy_rows).
SKV_INLINE void value_block(const Ctx& C, const Level& L, const float* P, int nb, const int64_t* tok,
                            const float* const* rows, const at::Half* const* sc, const at::Half* const* zc, float* acc,
                            float* zacc) {
  const int64_t D = C.D, g = C.g, ng = C.ng, T = C.T, G = C.group;
  for (int64_t j = 0; j < g; ++j) {
    float p[kValueBlock];
    for (int k = 0; k < nb; ++k) p[k] = P[j * T + C.S + tok[k]];
    for (int64_t gi = 0; gi < ng; ++gi) {
      float a[kValueBlock];
      const float* xs[kValueBlock];
      for (int k = 0; k < nb; ++k) {
        a[k] = p[k] * half_to_float(sc[k][gi]);
        xs[k] = rows[k] + gi * G;
      }
      axpy_rows(a, xs, nb, acc + j * D + gi * G, G);
      float& z = zacc[j * ng + gi];
      for (int k = 0; k < nb; ++k) z += zc[k] ? p[k] * half_to_float(zc[k][gi]) : -a[k] * L.offset;
    }
  }
}

// Weighted values of the quantized tokens in rows [r0, r1) of level L into acc [g, D] (weighted codes
// times scale) and zacc [g, ng] (weighted zero-points), for one (batch row, KV head). Tokens are
// added in row order, kValueBlock at a time, so every sum takes its terms in the order of one axpy
// per token.
SKV_CLONES void value_rows(const Ctx& C, int64_t b, int64_t h, const Level& L, int64_t r0, int64_t r1, float* acc,
                           float* zacc, uint8_t* codes, float* cf) {
  const float* P = C.probs + (b * C.Hq + h * C.g) * C.T;
  const SliceWalk vwalk(C, b, h, 1);
  int64_t tok[kValueBlock];
  const at::Half* sc[kValueBlock];
  const at::Half* zc[kValueBlock];
  const float* rows[kValueBlock];
  int nb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = vwalk.token_of(L.index ? L.index[r] : r, C.n);
    if (t < 0) continue;
    bool any = false;
    for (int64_t j = 0; j < C.g; ++j) any = any || P[j * C.T + C.S + t] != 0.0f;
    if (!any) continue;  // masked (or underflowed) for every query head: skip the unpack
    rows[nb] = cf + nb * C.D;
    load_codes(L, r, vwalk.off, C.D, C.group, codes, cf + nb * C.D, &sc[nb], &zc[nb]);
    tok[nb++] = t;
    if (nb == kValueBlock) {
      value_block(C, L, P, nb, tok, rows, sc, zc, acc, zacc);
      nb = 0;
    }
  }
  if (nb) value_block(C, L, P, nb, tok, rows, sc, zc, acc, zacc);
}

// Weighted values of the sinks and the window (full precision) into acc [g, D].
SKV_CLONES void value_dense(const Ctx& C, int64_t b, int64_t h, float* acc) {
  const int64_t D = C.D, g = C.g, T = C.T;
  const float* P = C.probs + (b * C.Hq + h * g) * T;
  for (int64_t t = 0; t < C.S; ++t) {
    const float* v = C.sink_v + ((b * C.Hkv + h) * C.S + t) * D;
    for (int64_t j = 0; j < g; ++j) axpy(P[j * T + t], v, acc + j * D, D);
  }
  for (int64_t t = 0; t < C.W; ++t) {
    const float* v = C.win_v + ((b * C.Hkv + h) * C.W + t) * D;
    for (int64_t j = 0; j < g; ++j) axpy(P[j * T + C.S + C.n + t], v, acc + j * D, D);
  }
}

// A piece of work: rows [r0, r1) of level `level` for one (batch row, KV head), or (level -1) its
// sinks and window. Pieces are cut at fixed row counts, never by thread count, so that the sums, and
// so the results, do not depend on how many threads run.
struct Piece {
  int64_t bh;
  int64_t level;
  int64_t r0, r1;
};
constexpr int64_t kPieceRows = 256;

// The sinks and the window as contiguous float32 (a cache keeps them in FP16): converted here, in
// one C++ call, rather than by four more tensor ops in Python every layer and step.
at::Tensor as_float(const at::Tensor& t, const char* name, int64_t B, int64_t H, int64_t D) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.dim() == 4 && t.size(0) == B && t.size(1) == H &&
                  t.size(3) == D,
              name, " must be a floating-point [B, Hkv, n, D] tensor");
  return t.to(at::kFloat).contiguous();
}

}  // namespace

std::vector<at::Tensor> packed_decode_attention(
    at::Tensor query, at::Tensor sink_k, at::Tensor sink_v, at::Tensor win_k, at::Tensor win_v,
    std::vector<at::Tensor> planes, std::vector<int64_t> level_bits, std::vector<at::Tensor> scales,
    std::vector<at::Tensor> zeros, std::vector<at::Tensor> indices, int64_t n_quant, int64_t unit_len,
    bool head_major, int64_t group_size, c10::optional<at::Tensor> k_shift, c10::optional<at::Tensor> k_scale,
    c10::optional<at::Tensor> allowed, double scaling, bool evicted_masked) {
  TORCH_CHECK(at::isFloatingType(query.scalar_type()) && (query.dim() == 3 || (query.dim() == 4 && query.size(2) == 1)),
              "query must be a floating-point [B, Hq, D] or [B, Hq, 1, D] tensor");
  query = query.to(at::kFloat).reshape({query.size(0), query.size(1), query.size(-1)}).contiguous();
  Ctx C;
  C.B = query.size(0);
  C.Hq = query.size(1);
  C.D = query.size(2);
  C.Hkv = sink_k.size(1);
  TORCH_CHECK(C.Hkv >= 1 && C.Hq % C.Hkv == 0, "query heads ", C.Hq, " are not a multiple of KV heads ", C.Hkv);
  C.g = C.Hq / C.Hkv;
  sink_k = as_float(sink_k, "sink_k", C.B, C.Hkv, C.D);
  sink_v = as_float(sink_v, "sink_v", C.B, C.Hkv, C.D);
  win_k = as_float(win_k, "win_k", C.B, C.Hkv, C.D);
  win_v = as_float(win_v, "win_v", C.B, C.Hkv, C.D);
  C.S = sink_k.size(2);
  C.W = win_k.size(2);
  TORCH_CHECK(sink_v.size(2) == C.S && win_v.size(2) == C.W, "keys and values disagree in length");
  C.n = n_quant;
  C.T = C.S + C.n + C.W;
  C.unit_len = unit_len;
  C.head_major = head_major;
  C.evicted_masked = evicted_masked;
  C.group = group_size;
  TORCH_CHECK(C.D % 8 == 0, "head_dim ", C.D, " must be a multiple of 8 (whole bytes per head in every plane)");
  TORCH_CHECK(group_size >= 1 && C.D % group_size == 0, "group_size ", group_size, " must divide head_dim ", C.D);
  TORCH_CHECK(unit_len >= C.D && unit_len % C.D == 0 && (2 * C.Hkv * C.D) % unit_len == 0,
              "unit_len ", unit_len, " must be D, 2D, H*D or 2*H*D");
  C.ng = C.D / group_size;
  C.scaling = static_cast<float>(scaling);

  // Levels, and a check that every unit is stored at exactly one level.
  const size_t nl = level_bits.size();
  TORCH_CHECK(nl <= 127 && scales.size() == nl && indices.size() == nl && (zeros.empty() || zeros.size() == nl),
              "level lists disagree in length");
  std::vector<Level> levels(nl);
  const int64_t n_units = C.n * C.B * (2 * C.Hkv * C.D / unit_len);
  std::vector<int8_t> unit_level(n_units, -1);
  size_t pi = 0;
  for (size_t l = 0; l < nl; ++l) {
    Level& L = levels[l];
    const int bits = static_cast<int>(level_bits[l]);
    TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8");
    int w[4];
    L.np = plane_widths(bits, w);
    const at::Tensor& s = scales[l];
    TORCH_CHECK(s.dim() == 2 && s.scalar_type() == at::kHalf && s.stride(1) == 1 && s.size(1) == unit_len / group_size,
                "scale of level ", l, " must be float16 [N, unit_len / group_size] with contiguous rows");
    const int64_t rows = s.size(0);
    int shift = bits;
    for (int p = 0; p < L.np; ++p) {
      TORCH_CHECK(pi < planes.size(), "too few planes for the levels' bit widths");
      const at::Tensor& t = planes[pi++];
      TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kByte && t.stride(1) == 1 && t.size(0) == rows &&
                      t.size(1) >= unit_len * w[p] / 8,
                  "plane of level ", l, " must be uint8 [N, unit_len * width / 8] with contiguous rows");
      shift -= w[p];
      L.pptr[p] = t.data_ptr<uint8_t>();
      L.pstride[p] = t.stride(0);
      L.pwidth[p] = w[p];
      L.pshift[p] = shift;
    }
    L.sptr = s.data_ptr<at::Half>();
    L.sstride = s.stride(0);
    if (!zeros.empty()) {
      const at::Tensor& z = zeros[l];
      TORCH_CHECK(z.scalar_type() == at::kHalf && z.sizes() == s.sizes() && z.stride(1) == 1,
                  "zero of level ", l, " must be float16 shaped like its scale");
      L.zptr = z.data_ptr<at::Half>();
      L.zstride = z.stride(0);
    } else {
      L.offset = bits > 1 ? static_cast<float>((1 << (bits - 1)) - 1) : 0.0f;
    }
    const at::Tensor& idx = indices[l];
    TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(),
                "index of level ", l, " must be a contiguous int32 vector");
    TORCH_CHECK(idx.numel() == rows || (idx.numel() == 0 && rows == n_units),
                "index of level ", l, " has ", idx.numel(), " entries for ", rows, " rows");
    const int32_t* ip = idx.numel() ? idx.data_ptr<int32_t>() : nullptr;
    L.bits = bits;
    L.rows = rows;
    L.index = ip;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t u = ip ? ip[r] : r;
      TORCH_CHECK(u >= 0 && u < n_units, "unit ", u, " out of range for ", n_units, " units");
      TORCH_CHECK(unit_level[u] < 0, "unit ", u, " is stored twice");
      unit_level[u] = static_cast<int8_t>(l);
    }
  }
  TORCH_CHECK(pi == planes.size(), "more planes than the levels' bit widths need");
  if (!evicted_masked)
    for (int64_t u = 0; u < n_units; ++u) TORCH_CHECK(unit_level[u] >= 0, "unit ", u, " is stored at no level");

  at::Tensor shift_t, scale_t;
  C.k_shift = C.k_scale = nullptr;
  TORCH_CHECK(k_shift.has_value() == k_scale.has_value(), "k_shift and k_scale come together");
  if (k_shift.has_value()) {
    for (const at::Tensor* t : {&*k_shift, &*k_scale})
      TORCH_CHECK(at::isFloatingType(t->scalar_type()) && t->numel() == C.B * C.Hkv * C.D,
                  "k_shift and k_scale must be floating-point [B, Hkv, D] (or [B, Hkv, 1, D])");
    shift_t = k_shift->to(at::kFloat).contiguous();
    scale_t = k_scale->to(at::kFloat).contiguous();
    C.k_shift = shift_t.data_ptr<float>();
    C.k_scale = scale_t.data_ptr<float>();
  }
  C.allowed = nullptr;
  if (allowed.has_value()) {
    TORCH_CHECK(allowed->scalar_type() == at::kBool && allowed->is_contiguous() && allowed->dim() == 2 &&
                    allowed->size(0) == C.B && allowed->size(1) == C.T,
                "allowed must be a contiguous bool [B, T] tensor");
    C.allowed = allowed->data_ptr<bool>();
  }
  at::Tensor out = at::zeros({C.B, C.Hq, C.D}, query.options());
  at::Tensor probs = at::empty({C.B, C.Hq, C.T}, query.options());
  C.q = query.data_ptr<float>();
  C.sink_k = sink_k.data_ptr<float>();
  C.sink_v = sink_v.data_ptr<float>();
  C.win_k = win_k.data_ptr<float>();
  C.win_v = win_v.data_ptr<float>();
  C.levels = levels.data();
  C.n_levels = static_cast<int64_t>(nl);
  C.out = out.data_ptr<float>();
  C.probs = probs.data_ptr<float>();
  if (C.T == 0) return {out, probs};
  // Work is cut into pieces of rows so that the threads share it evenly even when there are fewer
  // (batch row, KV head) pairs than threads, or not a multiple of them (SmolLM2: 3 KV heads).
  // Scores, softmax and values run one after the other inside one parallel region (two barriers).
  const int64_t BH = C.B * C.Hkv;
  std::vector<Piece> pieces;
  for (int64_t bh = 0; bh < BH; ++bh) {
    pieces.push_back({bh, -1, 0, 0});
    for (int64_t l = 0; l < C.n_levels; ++l)
      for (int64_t r0 = 0; r0 < levels[l].rows; r0 += kPieceRows)
        pieces.push_back({bh, l, r0, std::min(levels[l].rows, r0 + kPieceRows)});
  }
  const int64_t n_pieces = static_cast<int64_t>(pieces.size());
  const int64_t pf = prep_floats(C);
  std::vector<float> prep(BH * pf);
  for (int64_t bh = 0; bh < BH; ++bh) prep_head(C, bh / C.Hkv, bh % C.Hkv, prep.data() + bh * pf);
  const int64_t acc_floats = C.g * (C.D + C.ng);  // [g, D] weighted values, then [g, ng] weighted zero-points
  std::vector<float> partial(n_pieces * acc_floats, 0.0f);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_pieces)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<uint8_t> codes(C.D + 16);
    std::vector<float> cf(kBlockRows * C.D);  // one block of unpacked rows (score_rows, value_rows)
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_pieces; ++i) {
      const Piece& pc = pieces[i];
      if (pc.level < 0) continue;  // sinks and window were scored with the query folding
      score_rows(C, pc.bh / C.Hkv, pc.bh % C.Hkv, prep_at(C, prep.data() + pc.bh * pf), levels[pc.level], pc.r0,
                 pc.r1, codes.data(), cf.data());
    }
#pragma omp for schedule(static)
    for (int64_t row = 0; row < C.B * C.Hq; ++row) softmax_row(C, row / C.Hq, C.probs + row * C.T);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_pieces; ++i) {
      const Piece& pc = pieces[i];
      float* acc = partial.data() + i * acc_floats;
      if (pc.level < 0)
        value_dense(C, pc.bh / C.Hkv, pc.bh % C.Hkv, acc);
      else
        value_rows(C, pc.bh / C.Hkv, pc.bh % C.Hkv, levels[pc.level], pc.r0, pc.r1, acc, acc + C.g * C.D,
                   codes.data(), cf.data());
    }
  }
  // Each head's pieces summed in piece order, then its weighted zero-points added per group.
  std::vector<float> zsum(C.g * C.ng);
  for (int64_t i = 0; i < n_pieces; ++i) {
    const int64_t bh = pieces[i].bh;
    if (i == 0 || pieces[i - 1].bh != bh) std::fill(zsum.begin(), zsum.end(), 0.0f);
    float* o = C.out + (bh / C.Hkv * C.Hq + bh % C.Hkv * C.g) * C.D;
    const float* a = partial.data() + i * acc_floats;
    for (int64_t k = 0; k < C.g * C.D; ++k) o[k] += a[k];
    for (int64_t k = 0; k < C.g * C.ng; ++k) zsum[k] += a[C.g * C.D + k];
    if (i + 1 == n_pieces || pieces[i + 1].bh != bh)
      for (int64_t j = 0; j < C.g; ++j)
        for (int64_t d = 0; d < C.D; ++d) o[j * C.D + d] += zsum[j * C.ng + d / C.group];
  }
  return {out, probs};
}
