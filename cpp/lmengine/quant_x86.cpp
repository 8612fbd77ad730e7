// AVX2 (+FMA, F16C; VNNI when compiled in) kernels for matmul_rows. Each kernel computes a tile
// of R weight rows x C tokens: a weight block is unpacked once and used for C tokens, an
// activation block is loaded once and used for R rows. Decode (up to 4 tokens, e.g. the two
// activation rows of a residual-quantized token) streams the weights once with prefetch; prefill
// reuses each unpacked block C times. Layouts: quant_internal.h. Results equal
// matmul_rows_reference up to float summation order.
//
// Batching invariance: y[t, r] goes through the same operations in the same order whatever the
// tile shape, so it is bit-identical however many tokens share the call (tests/test_quant.py).
//
// Napkin math per 32 weights x 1 token (Q4_1: 20 bytes, 64 flops): ~2 uops to unpack the nibbles,
// maddubs + madd (or one dpbusd), an int->float convert and one FMA with the broadcast scale.
// Decode needs 20 B per ~6 uops to keep up with DRAM (~10 GB/s per core here); prefill is bound
// by the 4 uops per (row, token, block) once unpacking is amortised.
#include "lmengine/quant_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace lme {
namespace quant_detail {
namespace {

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// Sum of u8 x s8 products in groups of 4 -> 8 x int32. Pair sums stay below 2^15 because the
// activations never reach -128 and unsigned weights are at most 63 (or |w| <= 128 for Q8_0), so
// the VNNI instruction (no intermediate saturation) gives the same integers.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// 16 bytes of packed nibbles -> 32 bytes: the low nibbles, then the high nibbles.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m256i both = _mm256_broadcastsi128_si256(load128(p));
  const __m256i shifted = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(15));
}

// 32 bits -> 32 bytes, byte j = 0x10 if bit j is set, else 0 (Q5_0's fifth bit).
inline __m256i expand_bits_to_0x10(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// 16 bytes of packed nibbles -> 16-bit lanes: lo = the low nibbles (elements 0..15), hi = the
// high nibbles (16..31).
inline void nibbles16(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i v = _mm256_cvtepu8_epi16(load128(p));
  lo = _mm256_and_si256(v, _mm256_set1_epi16(15));
  hi = _mm256_srli_epi16(v, 4);
}

// 16 bits -> 16 lanes of 16 bits, lane j = 0x10 if bit j is set, else 0.
inline __m256i expand_bits16_to_0x10(uint32_t bits) {
  const __m256i select = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                           4096, 8192, 16384, -32768);
  const __m256i set = _mm256_cmpeq_epi16(
      _mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(bits)), select), select);
  return _mm256_and_si256(set, _mm256_set1_epi16(0x10));
}

// Decode streams each weight byte once: while computing R rows, fetch the same offsets of the R
// rows `ahead` rows further down (ahead >= R; the tiles in between were fetched earlier).
template <int R>
inline void prefetch_rows_ahead(const uint8_t* w, int64_t w_stride, int64_t ahead, int64_t offset,
                                int64_t bytes) {
  for (int r = 0; r < R; ++r) {
    const char* p = reinterpret_cast<const char*>(w + (r + ahead) * w_stride + offset);
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  }
}

// GCC keeps the R x C accumulator arrays in registers only if these loops are unrolled before
// its scalar replacement pass; without the hint it stores them to the stack every block.
#define LME_UNROLL_TILE _Pragma("GCC unroll 4")

struct TileArgs {
  const uint8_t* w;  // first weight row of the tile
  int64_t w_stride;
  const uint8_t* x;  // first activation row of the tile
  int64_t x_stride;
  int64_t k;
  float* y;  // y[c * ldy + r]
  int64_t ldy;
  int64_t prefetch_ahead;  // streaming: rows ahead to prefetch (0: none; prefill revisits rows)
};

// ---------------------------------------------------------------------------------------------
// Q4_0, Q4_1, Q5_0, Q8_0 x Q8_32.
// Each block contributes (dw*dx) * dot(qw, qx) + c * s, c the block's constant term. Scales are
// handled 8 blocks at a time: the fp16 words are gathered and converted together, the products
// dw*dx go to a small buffer read back by broadcast loads, and c * s is one FMA per 8 blocks.

// The first two fp16 values of n <= 8 blocks, stride bytes apart, as fp32 vectors (lanes past n
// are 0 and their blocks are not read): first[j] = half at bytes 0-1 of block j, second[j] = 2-3.
// Always inlined: as an out-of-line call (GCC's choice at -O3) it took ~40% of a decode product.
template <bool kFull>
__attribute__((always_inline)) inline void load_block_halves(const uint8_t* p, int64_t stride,
                                                             int n, __m256& first,
                                                             __m256& second) {
  auto word = [&](int j) __attribute__((always_inline)) {
    int v = 0;
    if (kFull || j < n) std::memcpy(&v, p + j * stride, 4);
    return v;
  };
  const __m256 a =
      _mm256_cvtph_ps(_mm_setr_epi32(word(0), word(1), word(2), word(3)));  // f0 s0 f1 s1 ..
  const __m256 b = _mm256_cvtph_ps(_mm_setr_epi32(word(4), word(5), word(6), word(7)));
  // Even/odd lanes come out as blocks 0 1 4 5 | 2 3 6 7; swapping the middle qwords restores order.
  first = _mm256_castpd_ps(
      _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xd8));
  second = _mm256_castpd_ps(
      _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd)), 0xd8));
}

inline __m256 load_floats(const float* p, int n) {
  if (n == 8) return _mm256_loadu_ps(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}

struct FmtQ4_0 {
  static constexpr int64_t kBytes = kBytesQ4_0;
  static constexpr bool kHasConstant = true;
  static __m256i unpack(const uint8_t* b) { return unpack_nibbles(b + 2); }
  static void unpack16(const uint8_t* b, __m256i& lo, __m256i& hi) { nibbles16(b + 2, lo, hi); }
  static __m256 constant(__m256 d, __m256) { return _mm256_mul_ps(d, _mm256_set1_ps(-8.f)); }
  static __m256i dot(__m256i w, __m256i x) { return dot_u8s8(w, x); }
};

struct FmtQ4_1 {
  static constexpr int64_t kBytes = kBytesQ4_1;
  static constexpr bool kHasConstant = true;
  static __m256i unpack(const uint8_t* b) { return unpack_nibbles(b + 4); }
  static void unpack16(const uint8_t* b, __m256i& lo, __m256i& hi) { nibbles16(b + 4, lo, hi); }
  static __m256 constant(__m256, __m256 m) { return m; }
  static __m256i dot(__m256i w, __m256i x) { return dot_u8s8(w, x); }
};

struct FmtQ5_0 {
  static constexpr int64_t kBytes = kBytesQ5_0;
  static constexpr bool kHasConstant = true;
  static __m256i unpack(const uint8_t* b) {
    return _mm256_or_si256(unpack_nibbles(b + 6), expand_bits_to_0x10(b + 2));
  }
  static void unpack16(const uint8_t* b, __m256i& lo, __m256i& hi) {
    nibbles16(b + 6, lo, hi);
    uint32_t bits;
    std::memcpy(&bits, b + 2, 4);
    lo = _mm256_or_si256(lo, expand_bits16_to_0x10(bits & 0xffff));
    hi = _mm256_or_si256(hi, expand_bits16_to_0x10(bits >> 16));
  }
  static __m256 constant(__m256 d, __m256) { return _mm256_mul_ps(d, _mm256_set1_ps(-16.f)); }
  static __m256i dot(__m256i w, __m256i x) { return dot_u8s8(w, x); }
};

struct FmtQ8_0 {
  static constexpr int64_t kBytes = kBytesQ8_0;
  static constexpr bool kHasConstant = false;
  static __m256i unpack(const uint8_t* b) { return load256(b + 2); }
  static void unpack16(const uint8_t* b, __m256i& lo, __m256i& hi) {
    lo = _mm256_cvtepi8_epi16(load128(b + 2));
    hi = _mm256_cvtepi8_epi16(load128(b + 18));
  }
  static __m256 constant(__m256, __m256) { return _mm256_setzero_ps(); }
  // Signed x signed via |w| * (x with w's sign); |w| is hoisted out of the token loop.
  static __m256i dot(__m256i w, __m256i x) {
    return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  }
};

// kWide: Q16_32 activation rows (16-bit values; weights widened to 16-bit lanes, two madds per
// block); otherwise Q8_32 rows (u8 x s8 products). Scales and constant terms are handled alike.
template <class F, bool kWide = false>
struct TileQ32 {
  template <int R, int C>
  static void run(const TileArgs& a) {
    const int64_t nb = a.k / kQ32;
    constexpr int64_t kValueBytes = kWide ? 2 : 1;
    const uint8_t* xq[C];
    const float* xd[C];
    const float* xs[C];
    LME_UNROLL_TILE
    for (int c = 0; c < C; ++c) {
      xq[c] = a.x + c * a.x_stride;
      xd[c] = reinterpret_cast<const float*>(a.x + c * a.x_stride + kValueBytes * a.k);
      xs[c] = xd[c] + nb;
    }
    __m256 acc[R][C];
    LME_UNROLL_TILE
    for (int r = 0; r < R; ++r) {
      LME_UNROLL_TILE
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    alignas(32) float scale[R][C][8];
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, nb - b0));
      __m256 dw[R], cw[R];
      LME_UNROLL_TILE
      for (int r = 0; r < R; ++r) {
        const uint8_t* blocks = a.w + r * a.w_stride + b0 * F::kBytes;
        __m256 second;
        if (n == 8) {
          load_block_halves<true>(blocks, F::kBytes, 8, dw[r], second);
        } else {
          load_block_halves<false>(blocks, F::kBytes, n, dw[r], second);
        }
        cw[r] = F::constant(dw[r], second);
      }
      LME_UNROLL_TILE
      for (int c = 0; c < C; ++c) {
        const __m256 dx = load_floats(xd[c] + b0, n);
        const __m256 sx = F::kHasConstant ? load_floats(xs[c] + b0, n) : _mm256_setzero_ps();
        LME_UNROLL_TILE
        for (int r = 0; r < R; ++r) {
          _mm256_store_ps(scale[r][c], _mm256_mul_ps(dw[r], dx));
          if (F::kHasConstant) acc[r][c] = _mm256_fmadd_ps(cw[r], sx, acc[r][c]);
        }
      }
      if (a.prefetch_ahead) {
        prefetch_rows_ahead<R>(a.w, a.w_stride, a.prefetch_ahead, b0 * F::kBytes, 8 * F::kBytes);
      }
      for (int j = 0; j < n; ++j) {
        const int64_t b = b0 + j;
        if constexpr (kWide) {
          __m256i lo[R], hi[R];
          LME_UNROLL_TILE
          for (int r = 0; r < R; ++r) F::unpack16(a.w + r * a.w_stride + b * F::kBytes, lo[r], hi[r]);
          LME_UNROLL_TILE
          for (int c = 0; c < C; ++c) {
            const __m256i xlo = load256(xq[c] + 2 * b * kQ32);
            const __m256i xhi = load256(xq[c] + 2 * b * kQ32 + 32);
            LME_UNROLL_TILE
            for (int r = 0; r < R; ++r) {
              const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(lo[r], xlo),
                                                   _mm256_madd_epi16(hi[r], xhi));
              acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                          _mm256_broadcast_ss(&scale[r][c][j]), acc[r][c]);
            }
          }
        } else {
          __m256i wq[R];
          LME_UNROLL_TILE
          for (int r = 0; r < R; ++r) wq[r] = F::unpack(a.w + r * a.w_stride + b * F::kBytes);
          LME_UNROLL_TILE
          for (int c = 0; c < C; ++c) {
            const __m256i xv = load256(xq[c] + b * kQ32);
            LME_UNROLL_TILE
            for (int r = 0; r < R; ++r) {
              const __m256 p = _mm256_cvtepi32_ps(F::dot(wq[r], xv));
              acc[r][c] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&scale[r][c][j]), acc[r][c]);
            }
          }
        }
      }
    }
    LME_UNROLL_TILE
    for (int r = 0; r < R; ++r) {
      LME_UNROLL_TILE
      for (int c = 0; c < C; ++c) a.y[c * a.ldy + r] = hsum(acc[r][c]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Q4_K x Q8_256. Per super-block and (row, token): integer sums weighted by the 6-bit sub-block
// scales (maddubs, then madd against the scale), the mins against the activation's 16-element
// sums, then two FMAs.

// Q4_K's 12 scale bytes -> 8 scales (bytes 0..7) and 8 mins (bytes 8..15), 6 bits each.
inline __m128i q4k_unpack_scales_mins(const uint8_t* packed) {
  uint32_t u[3];
  std::memcpy(u, packed, 12);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  const uint32_t sc_lo = u[0] & low6, m_lo = u[1] & low6;
  const uint32_t sc_hi = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
  const uint32_t m_hi = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
  return _mm_set_epi32(static_cast<int>(m_hi), static_cast<int>(m_lo), static_cast<int>(sc_hi),
                       static_cast<int>(sc_lo));
}

// Shuffle mask: int16 lane j_low of the low 128-bit half to all 8 int16 lanes of that half,
// j_high likewise in the high half.
inline __m256i lane16_select(int j_low, int j_high) {
  return _mm256_set_m128i(
      _mm_set1_epi16(static_cast<int16_t>(((2 * j_high + 1) << 8) | (2 * j_high))),
      _mm_set1_epi16(static_cast<int16_t>(((2 * j_low + 1) << 8) | (2 * j_low))));
}

struct TileQ4K {
  template <int R, int C>
  static void run(const TileArgs& a) {
    const int64_t nb = a.k / kQK;
    const int8_t* xq[C];
    const float* xd[C];
    const int16_t* xbsum[C];
    for (int c = 0; c < C; ++c) {
      xq[c] = reinterpret_cast<const int8_t*>(a.x + c * a.x_stride);
      xd[c] = reinterpret_cast<const float*>(a.x + c * a.x_stride + a.k);
      xbsum[c] = reinterpret_cast<const int16_t*>(xd[c] + nb);
    }
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; ++b) {
      if (a.prefetch_ahead) {
        prefetch_rows_ahead<R>(a.w, a.w_stride, a.prefetch_ahead, b * kBytesQ4_K, kBytesQ4_K);
      }
      float d[R], dmin[R];
      __m256i scales[R], mins[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = a.w + r * a.w_stride + b * kBytesQ4_K;
        d[r] = load_half(blk);
        dmin[r] = load_half(blk + 2);
        const __m128i sm = q4k_unpack_scales_mins(blk + 4);
        scales[r] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        const __m128i m8 = _mm_unpackhi_epi64(sm, sm);
        mins[r] = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));  // m0 m0 m1 m1 .. m7 m7
      }
      __m256i isum[R][C];
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) isum[r][c] = _mm256_setzero_si256();
      }
      for (int chunk = 0; chunk < 4; ++chunk) {
        const __m256i select_lo = lane16_select(2 * chunk, 2 * chunk);
        const __m256i select_hi = lane16_select(2 * chunk + 1, 2 * chunk + 1);
        __m256i w_lo[R], w_hi[R], s_lo[R], s_hi[R];
        for (int r = 0; r < R; ++r) {
          const __m256i q = load256(a.w + r * a.w_stride + b * kBytesQ4_K + 16 + 32 * chunk);
          w_lo[r] = _mm256_and_si256(q, low4);
          w_hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
          s_lo[r] = _mm256_shuffle_epi8(scales[r], select_lo);
          s_hi[r] = _mm256_shuffle_epi8(scales[r], select_hi);
        }
        for (int c = 0; c < C; ++c) {
          const __m256i x_lo = load256(xq[c] + b * kQK + 64 * chunk);
          const __m256i x_hi = load256(xq[c] + b * kQK + 64 * chunk + 32);
          for (int r = 0; r < R; ++r) {
            const __m256i p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(w_lo[r], x_lo), s_lo[r]);
            const __m256i p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(w_hi[r], x_hi), s_hi[r]);
            isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_add_epi32(p_lo, p_hi));
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        const __m256i bsum = load256(xbsum[c] + 16 * b);
        const float dx = xd[c][b];
        for (int r = 0; r < R; ++r) {
          const __m256 m = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsum, mins[r]));
          acc[r][c] =
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), _mm256_set1_ps(d[r] * dx), acc[r][c]);
          acc[r][c] = _mm256_fnmadd_ps(m, _mm256_set1_ps(dmin[r] * dx), acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) a.y[c * a.ldy + r] = hsum(acc[r][c]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Q6_K x Q8_256. 6-bit unsigned q (0..63) against the activations, weighted by the int8 scale of
// each 16-element sub-block; the -32 offset is 32 * sum(scale * bsum), one madd per super-block.

struct TileQ6K {
  template <int R, int C>
  static void run(const TileArgs& a) {
    const int64_t nb = a.k / kQK;
    const int8_t* xq[C];
    const float* xd[C];
    const int16_t* xbsum[C];
    for (int c = 0; c < C; ++c) {
      xq[c] = reinterpret_cast<const int8_t*>(a.x + c * a.x_stride);
      xd[c] = reinterpret_cast<const float*>(a.x + c * a.x_stride + a.k);
      xbsum[c] = reinterpret_cast<const int16_t*>(xd[c] + nb);
    }
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; ++b) {
      if (a.prefetch_ahead) {
        prefetch_rows_ahead<R>(a.w, a.w_stride, a.prefetch_ahead, b * kBytesQ6_K, kBytesQ6_K);
      }
      float d[R];
      __m256i isum[R][C];
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = a.w + r * a.w_stride + b * kBytesQ6_K;
        d[r] = load_half(blk + 208);
        const __m256i scales = _mm256_cvtepi8_epi16(load128(blk + 192));
        for (int c = 0; c < C; ++c) {
          const __m256i offset = _mm256_madd_epi16(load256(xbsum[c] + 16 * b), scales);
          isum[r][c] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(offset, 5));
        }
      }
      for (int half = 0; half < 2; ++half) {
        __m256i scales_half[R];
        for (int r = 0; r < R; ++r) {
          const uint8_t* blk = a.w + r * a.w_stride + b * kBytesQ6_K;
          scales_half[r] = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 192 + 8 * half))));
        }
        for (int group = 0; group < 4; ++group) {
          // Group g of this half: 32 elements, scales 2g (first 16) and 2g + 1 (last 16).
          const __m256i select = lane16_select(2 * group, 2 * group + 1);
          __m256i wq[R], ws[R];
          for (int r = 0; r < R; ++r) {
            const uint8_t* blk = a.w + r * a.w_stride + b * kBytesQ6_K;
            const __m256i ql = load256(blk + 64 * half + 32 * (group & 1));
            const __m256i qh = load256(blk + 128 + 32 * half);
            const __m256i lo = group < 2 ? _mm256_and_si256(ql, low4)
                                         : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4);
            // Bits 2g, 2g + 1 of qh become bits 4, 5.
            __m256i hi;
            switch (group) {
              case 0:
                hi = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4);
                break;
              case 1:
                hi = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0c)), 2);
                break;
              case 2:
                hi = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
                break;
              default:
                hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30));
                break;
            }
            wq[r] = _mm256_or_si256(lo, hi);
            ws[r] = _mm256_shuffle_epi8(scales_half[r], select);
          }
          for (int c = 0; c < C; ++c) {
            const __m256i xv = load256(xq[c] + b * kQK + 128 * half + 32 * group);
            for (int r = 0; r < R; ++r) {
              const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[r], xv), ws[r]);
              isum[r][c] = _mm256_add_epi32(isum[r][c], p);
            }
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        const float dx = xd[c][b];
        for (int r = 0; r < R; ++r) {
          acc[r][c] =
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), _mm256_set1_ps(d[r] * dx), acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) a.y[c * a.ldy + r] = hsum(acc[r][c]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// F32, F16, BF16 x F32: 8 weights per step, converted in registers.

struct FmtF32 {
  static constexpr int64_t kBytes = 4;
  static __m256 load8(const uint8_t* p) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
  static float load1(const uint8_t* p) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
};

struct FmtF16 {
  static constexpr int64_t kBytes = 2;
  static __m256 load8(const uint8_t* p) { return _mm256_cvtph_ps(load128(p)); }
  static float load1(const uint8_t* p) { return load_half(p); }
};

struct FmtBF16 {
  static constexpr int64_t kBytes = 2;
  static __m256 load8(const uint8_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
  }
  static float load1(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <class F>
struct TileFloat {
  template <int R, int C>
  static void run(const TileArgs& a) {
    const float* x[C];
    LME_UNROLL_TILE
    for (int c = 0; c < C; ++c) x[c] = reinterpret_cast<const float*>(a.x + c * a.x_stride);
    __m256 acc[R][C];
    LME_UNROLL_TILE
    for (int r = 0; r < R; ++r) {
      LME_UNROLL_TILE
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    const int64_t k8 = a.k / 8 * 8;
    for (int64_t i = 0; i < k8; i += 8) {
      if (a.prefetch_ahead) {
        prefetch_rows_ahead<R>(a.w, a.w_stride, a.prefetch_ahead, i * F::kBytes, 8 * F::kBytes);
      }
      __m256 wv[R];
      LME_UNROLL_TILE
      for (int r = 0; r < R; ++r) wv[r] = F::load8(a.w + r * a.w_stride + i * F::kBytes);
      LME_UNROLL_TILE
      for (int c = 0; c < C; ++c) {
        const __m256 xv = _mm256_loadu_ps(x[c] + i);
        LME_UNROLL_TILE
        for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
      }
    }
    LME_UNROLL_TILE
    for (int r = 0; r < R; ++r) {
      LME_UNROLL_TILE
      for (int c = 0; c < C; ++c) {
        float s = hsum(acc[r][c]);
        for (int64_t i = k8; i < a.k; ++i)
          s += F::load1(a.w + r * a.w_stride + i * F::kBytes) * x[c][i];
        a.y[c * a.ldy + r] = s;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Tiling driver.

// Runs the r x c tile (1 <= r <= R, 1 <= c <= C); instantiates only shapes up to R x C.
template <class Tile, int R, int C>
void run_tile(int r, int c, const TileArgs& a) {
  if constexpr (R > 1) {
    if (r < R) return run_tile<Tile, R - 1, C>(r, c, a);
  }
  if constexpr (C > 1) {
    if (c < C) return run_tile<Tile, R, C - 1>(r, c, a);
  }
  Tile::template run<R, C>(a);
}

// Decode (n_tokens <= kTokensDecode, e.g. one token's two residual activation rows): tiles of
// kRowsDecode1 rows (one token) or kRowsDecodeN rows (2 .. kTokensDecode tokens) x all tokens walk
// down the rows, so each weight byte is read once, and rows further down are prefetched. Otherwise
// kRowsPrefill x kTokensPrefill tiles, tokens taken in chunks whose activation rows stay in L2
// while every row tile passes over them.
struct MatrixArgs {
  int64_t k;
  const uint8_t* W;
  int64_t w_stride, n_rows;
  const uint8_t* X;
  int64_t x_stride, n_tokens;
  float* Y;
  int64_t ldy;
};

// Tiles of R rows x n_tokens <= C tokens down the whole matrix, prefetching `ahead` rows down.
template <class Tile, int R, int C>
void stream_rows(const MatrixArgs& m, int64_t ahead) {
  for (int64_t r = 0; r < m.n_rows; r += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, m.n_rows - r));
    const TileArgs a{m.W + r * m.w_stride, m.w_stride, m.X, m.x_stride, m.k, m.Y + r, m.ldy, ahead};
    run_tile<Tile, R, C>(nr, static_cast<int>(m.n_tokens), a);
  }
}

// Decode tiles of the 32-element block types (kRowsByLength): the fewest rows (1, 2 or 4, at most
// kMaxRows) whose tile spans kDecodeTileBytes, prefetching kDecodePrefetchBytes (at least one
// tile) ahead. A tile of R long rows reads R streams a row apart, which this machine's hardware
// prefetcher follows poorly: on Zen 3, Q8_0 rows of 1-2 KiB streamed at 6-10 GB/s on two threads
// as 2-row tiles and at 14-18 GB/s as 1-row tiles at one token (a plain read: ~21), and 8-10
// against 13 at two tokens. Gemma-3's Q8_0 LM head (680-byte rows) took 10.1-11.4 ms per decode
// step as 1-row tiles against 12.5-13.2 as 2-row tiles; SmolLM2's 360-byte Q4_1 rows decode as
// fast in 2-row tiles as in 4-row ones. Short rows still need several per tile, for the per-tile
// work (scales, sums) one row cannot cover. Float rows keep fixed tiles: 1-row tiles did not
// stream them faster.
constexpr int64_t kDecodeTileBytes = 640;
constexpr int64_t kDecodePrefetchBytes = 2048;

template <class Tile, int kMaxRows, int C>
void stream_rows_by_length(const MatrixArgs& m) {
  int rows = 1;
  while (rows < kMaxRows && rows * m.w_stride < kDecodeTileBytes) rows *= 2;
  const int64_t ahead =
      std::max<int64_t>(rows, (kDecodePrefetchBytes + m.w_stride - 1) / m.w_stride);
  if constexpr (kMaxRows >= 4) {
    if (rows == 4) return stream_rows<Tile, 4, C>(m, ahead);
  }
  if constexpr (kMaxRows >= 2) {
    if (rows == 2) return stream_rows<Tile, 2, C>(m, ahead);
  }
  stream_rows<Tile, 1, C>(m, ahead);
}

// kRowsByLength: kRowsDecode1 and kRowsDecodeN are the most rows a decode tile takes, the count
// chosen by stream_rows_by_length.
template <class Tile, int kRowsDecode1, int kRowsDecodeN, int kTokensDecode, int kRowsPrefill,
          int kTokensPrefill, bool kRowsByLength = false>
bool run_matrix(const MatrixArgs& m) {
  const auto [k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy] = m;
  constexpr int64_t kTokenChunk = 64;
  // Narrower multi-token tiles prefetch further than one tile ahead (8 rows measured at least as
  // fast as 2 or 4 for 1- and 2-row tiles, within this machine's noise).
  constexpr int64_t kPrefetchRowsN = std::max(kRowsDecodeN, 8);
  if (n_tokens == 1) {
    if constexpr (kRowsByLength) {
      stream_rows_by_length<Tile, kRowsDecode1, 1>(m);
    } else {
      stream_rows<Tile, kRowsDecode1, 1>(m, kRowsDecode1);
    }
    return true;
  }
  if (n_tokens <= kTokensDecode) {
    if constexpr (kRowsByLength) {
      stream_rows_by_length<Tile, kRowsDecodeN, kTokensDecode>(m);
    } else {
      stream_rows<Tile, kRowsDecodeN, kTokensDecode>(m, kPrefetchRowsN);
    }
    return true;
  }
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t_end = std::min(n_tokens, t0 + kTokenChunk);
    for (int64_t r = 0; r < n_rows; r += kRowsPrefill) {
      const int nr = static_cast<int>(std::min<int64_t>(kRowsPrefill, n_rows - r));
      for (int64_t t = t0; t < t_end; t += kTokensPrefill) {
        const int nc = static_cast<int>(std::min<int64_t>(kTokensPrefill, t_end - t));
        const TileArgs a{W + r * w_stride, w_stride, X + t * x_stride, x_stride, k,
                         Y + t * ldy + r,  ldy,      0};
        run_tile<Tile, kRowsPrefill, kTokensPrefill>(nr, nc, a);
      }
    }
  }
  return true;
}

}  // namespace

}  // namespace quant_detail

const char* matmul_simd_name() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx2+avx512vnni";
#elif defined(__AVXVNNI__)
  return "avx2+avxvnni";
#else
  return "avx2";
#endif
}

namespace quant_detail {

bool matmul_rows_simd(DType wt, int64_t k, const uint8_t* W, int64_t w_stride, int64_t n_rows,
                      const uint8_t* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy) {
  // Tile shapes measured on Zen 3 (decode rows for 1 token; for 2-4 tokens; prefill rows x
  // tokens): 32-blocks up to 4; up to 2, by row length (stream_rows_by_length); 4x4. K-quants 2;
  // 1 (beat 2); 1x4 (their per-row scale vectors fill the registers). Float weights 4; 4; 2x4.
  const MatrixArgs m{k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy};
  switch (wt) {
    case DType::Q4_0:
      return run_matrix<TileQ32<FmtQ4_0>, 4, 2, 4, 4, 4, true>(m);
    case DType::Q4_1:
      return run_matrix<TileQ32<FmtQ4_1>, 4, 2, 4, 4, 4, true>(m);
    case DType::Q5_0:
      return run_matrix<TileQ32<FmtQ5_0>, 4, 2, 4, 4, 4, true>(m);
    case DType::Q8_0:
      return run_matrix<TileQ32<FmtQ8_0>, 4, 2, 4, 4, 4, true>(m);
    case DType::Q4_K:
      return run_matrix<TileQ4K, 2, 1, 4, 1, 4>(m);
    case DType::Q6_K:
      return run_matrix<TileQ6K, 2, 1, 4, 1, 4>(m);
    case DType::F32:
      return run_matrix<TileFloat<FmtF32>, 4, 4, 4, 2, 4>(m);
    case DType::F16:
      return run_matrix<TileFloat<FmtF16>, 4, 4, 4, 2, 4>(m);
    case DType::BF16:
      return run_matrix<TileFloat<FmtBF16>, 4, 4, 4, 2, 4>(m);
  }
  return false;
}

bool matmul_rows_q16_simd(DType wt, int64_t k, const uint8_t* W, int64_t w_stride, int64_t n_rows,
                          const uint8_t* X, int64_t x_stride, int64_t n_tokens, float* Y,
                          int64_t ldy) {
  // Two 16-bit weight vectors per row and block: decode tiles as the 8-bit rows' (up to 4 rows
  // for one token, 2 for 2-4 tokens, by row length), 2 rows x 4 tokens else.
  const MatrixArgs m{k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy};
  switch (wt) {
    case DType::Q4_0:
      return run_matrix<TileQ32<FmtQ4_0, true>, 4, 2, 4, 2, 4, true>(m);
    case DType::Q4_1:
      return run_matrix<TileQ32<FmtQ4_1, true>, 4, 2, 4, 2, 4, true>(m);
    case DType::Q5_0:
      return run_matrix<TileQ32<FmtQ5_0, true>, 4, 2, 4, 2, 4, true>(m);
    case DType::Q8_0:
      return run_matrix<TileQ32<FmtQ8_0, true>, 4, 2, 4, 2, 4, true>(m);
    default:
      return false;
  }
}

}  // namespace quant_detail
}  // namespace lme

#else  // no AVX2: matmul_rows uses the scalar reference

namespace lme {

const char* matmul_simd_name() { return "scalar"; }

namespace quant_detail {

bool matmul_rows_simd(DType, int64_t, const uint8_t*, int64_t, int64_t, const uint8_t*, int64_t,
                      int64_t, float*, int64_t) {
  return false;
}

bool matmul_rows_q16_simd(DType, int64_t, const uint8_t*, int64_t, int64_t, const uint8_t*,
                          int64_t, int64_t, float*, int64_t) {
  return false;
}

}  // namespace quant_detail
}  // namespace lme

#endif
