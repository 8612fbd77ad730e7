// Products with fp32 activations for prompt chunks (matmul_rows_f32, declared in quant.h).
//
// The int8 kernels (quant_x86.cpp) read each weight byte once, which is what decode needs, but
// at 16-bit activation precision every product runs twice over 8-bit rows. A prompt chunk of
// many tokens can instead afford to dequantize the weights: a panel of kPanelRows rows is
// dequantized exactly (dequantize_row) into a per-thread fp32 buffer that stays in L2, laid out
// k-major ([k][16] per 16 rows), and a register-blocked FMA micro-kernel runs all the chunk's
// tokens over it, 6 tokens x 16 rows per tile (12 ymm accumulators).
//
// Napkin math per tile step (one k): 2 panel loads + 6 broadcasts feed 12 FMAs = 192 flops,
// 6 cycles at Zen 3's 2 FMAs per cycle (~32 flops/cycle/core, ~100 GFLOP/s at 3 GHz). Dequantizing
// a panel costs a few cycles per weight, shared by every token of the chunk: for >= 8 tokens it is
// a small fraction of the FMA work (16 rows x k x 2 flops per token).
//
// Numerics: y[t, r] is one fp32 FMA chain over i = 0 .. k-1 in order, against the exact
// dequantized weight, whatever the tile shape; so it is bit-identical whichever other tokens or
// rows share the call (the engine's batching invariance relies on that).
#include <algorithm>
#include <cstring>
#include <vector>

#include "lmengine/quant.h"
#include "lmengine/quant_internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LME_GEMM_F32_AVX2 1
#include <immintrin.h>
#endif

// The panels must equal dequantize_row bit for bit (d*q + m with two roundings, as gguf does):
// keep GCC from fusing the vector multiply and add below into an FMA.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lme {

namespace {

constexpr int kMicroRows = 16;  // weight rows per micro-panel: two ymm of fp32
constexpr int kTileTokens = 6;  // tokens per micro-tile: 6 x 2 accumulators + 2 panel vectors
// Rows dequantized together: each token tile's activations, loaded once into L1, serve all of
// them. 32 rows x k = 1536 is 192 KB of fp32, within Zen 3's 512 KB L2 beside the activations.
constexpr int kPanelRows = 2 * kMicroRows;

// Per-thread working memory, grown on demand (steady-state calls allocate nothing).
struct PanelScratch {
  std::vector<float> rows;   // [8][k]: 8 dequantized weight rows before the transpose
  std::vector<float> panel;  // [kPanelRows / 16][k][16]
};

PanelScratch& panel_scratch(int64_t k) {
  thread_local PanelScratch s;
  const size_t rows_len = static_cast<size_t>(8 * k);
  const size_t panel_len = static_cast<size_t>(kPanelRows * k);
  if (s.rows.size() < rows_len) s.rows.assign(rows_len, 0.f);
  if (s.panel.size() < panel_len) s.panel.assign(panel_len, 0.f);
  return s;
}

#if LME_GEMM_F32_AVX2

using quant_detail::kQ32;

inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// 8 bytes -> 8 x int32 (zero-extended).
inline __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 16 bytes of packed nibbles -> 32 bytes: the low nibbles, then the high nibbles.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m256i both = _mm256_broadcastsi128_si256(load128(p));
  const __m256i shifted = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(15));
}

// 32 bytes -> 4 x 8 floats, as signed or unsigned bytes.
template <bool kSigned>
inline void bytes_to_floats(__m256i q, __m256 out[4]) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int j = 0; j < 4; ++j) {
    const __m256i wide = kSigned ? _mm256_cvtepi8_epi32(parts[j]) : _mm256_cvtepu8_epi32(parts[j]);
    out[j] = _mm256_cvtepi32_ps(wide);
  }
}

inline float load_half_scalar(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256 half_to_vec(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm256_set1_ps(_cvtsh_ss(h));
}

// dequantize_row with the same arithmetic (so the same bits), 8 lanes at a time; false for F32
// (dequantize_row is a copy there).
bool dequantize_row_simd(DType wt, const uint8_t* p, float* dst, int64_t k) {
  using namespace quant_detail;
  const int64_t nb = k / kQ32;  // blocks, for the 32-element types
  __m256 v[4];
  switch (wt) {
    case DType::Q4_0:
      for (int64_t b = 0; b < nb; ++b, p += kBytesQ4_0, dst += kQ32) {
        const __m256 d = half_to_vec(p);
        bytes_to_floats<true>(_mm256_sub_epi8(unpack_nibbles(p + 2), _mm256_set1_epi8(8)), v);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(d, v[j]));
      }
      return true;
    case DType::Q4_1:
      for (int64_t b = 0; b < nb; ++b, p += kBytesQ4_1, dst += kQ32) {
        const __m256 d = half_to_vec(p), m = half_to_vec(p + 2);
        bytes_to_floats<false>(unpack_nibbles(p + 4), v);
        for (int j = 0; j < 4; ++j) {
          _mm256_storeu_ps(dst + 8 * j, _mm256_add_ps(_mm256_mul_ps(d, v[j]), m));
        }
      }
      return true;
    case DType::Q5_0:
      for (int64_t b = 0; b < nb; ++b, p += kBytesQ5_0, dst += kQ32) {
        const __m256 d = half_to_vec(p);
        uint32_t bits;
        std::memcpy(&bits, p + 2, 4);
        // Byte j of the 32 gets 0x10 where bit j of qh is set.
        const __m256i spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(static_cast<int>(bits)),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
        const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        const __m256i high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
        const __m256i q5 = _mm256_or_si256(unpack_nibbles(p + 6), high);
        const __m256i q = _mm256_sub_epi8(q5, _mm256_set1_epi8(16));
        bytes_to_floats<true>(q, v);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(d, v[j]));
      }
      return true;
    case DType::Q8_0:
      for (int64_t b = 0; b < nb; ++b, p += kBytesQ8_0, dst += kQ32) {
        const __m256 d = half_to_vec(p);
        bytes_to_floats<true>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)), v);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(v[j], d));
      }
      return true;
    case DType::F16:
      for (int64_t i = 0; i + 8 <= k; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(load128(p + 2 * i)));
      }
      for (int64_t i = k / 8 * 8; i < k; ++i) dst[i] = load_half_scalar(p + 2 * i);
      return true;
    case DType::BF16:
      for (int64_t i = 0; i + 8 <= k; i += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(load128(p + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
      }
      if (k % 8 != 0) dequantize_row(wt, p + 2 * (k / 8 * 8), dst + k / 8 * 8, k % 8);
      return true;
    case DType::Q4_K:
      for (int64_t b = 0; b < k / kQK; ++b, p += kBytesQ4_K) {
        const float d = load_half_scalar(p), dmin = load_half_scalar(p + 2);
        uint8_t sc[8], m[8];
        q4k_scales_mins(p + 4, sc, m);
        const uint8_t* qs = p + 16;
        for (int c = 0; c < 4; ++c, qs += 32, dst += 64) {
          const __m256 d_lo = _mm256_set1_ps(d * sc[2 * c]);
          const __m256 m_lo = _mm256_set1_ps(dmin * m[2 * c]);
          const __m256 d_hi = _mm256_set1_ps(d * sc[2 * c + 1]);
          const __m256 m_hi = _mm256_set1_ps(dmin * m[2 * c + 1]);
          for (int l = 0; l < 32; l += 8) {
            const __m256i q = load8_u8(qs + l);
            const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
            const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
            _mm256_storeu_ps(dst + l, _mm256_sub_ps(_mm256_mul_ps(d_lo, lo), m_lo));
            _mm256_storeu_ps(dst + l + 32, _mm256_sub_ps(_mm256_mul_ps(d_hi, hi), m_hi));
          }
        }
      }
      return true;
    case DType::Q6_K:
      for (int64_t b = 0; b < k / kQK; ++b, p += kBytesQ6_K) {
        const float d = load_half_scalar(p + 208);
        const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
        for (int half = 0; half < 2; ++half, dst += 128) {
          const uint8_t* ql = p + 64 * half;
          const uint8_t* qh = p + 128 + 32 * half;
          const int8_t* sc = scales + 8 * half;
          const __m256i low4 = _mm256_set1_epi32(15), low2 = _mm256_set1_epi32(3);
          // Bits 2j, 2j+1 of qh, moved to bits 4, 5.
          auto high2 = [&](__m256i h, int j) {
            return _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * j), low2), 4);
          };
          for (int l = 0; l < 32; l += 8) {
            const int is = l / 16;
            const __m256i a = load8_u8(ql + l), c = load8_u8(ql + l + 32), h = load8_u8(qh + l);
            const __m256i q[4] = {_mm256_or_si256(_mm256_and_si256(a, low4), high2(h, 0)),
                                  _mm256_or_si256(_mm256_and_si256(c, low4), high2(h, 1)),
                                  _mm256_or_si256(_mm256_srli_epi32(a, 4), high2(h, 2)),
                                  _mm256_or_si256(_mm256_srli_epi32(c, 4), high2(h, 3))};
            for (int j = 0; j < 4; ++j) {
              const __m256 scale = _mm256_set1_ps(d * static_cast<float>(sc[is + 2 * j]));
              const __m256i centred = _mm256_sub_epi32(q[j], _mm256_set1_epi32(32));
              _mm256_storeu_ps(dst + l + 32 * j, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(centred)));
            }
          }
        }
      }
      return true;
    default:
      return false;
  }
}

// In-register transpose of an 8 x 8 block: r[i] holds row i on entry, column i on exit.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Writes rows [0, nr) (nr <= 16) of W as a k-major micro-panel: panel[i * 16 + r] = W[r, i];
// columns nr .. 15 are zero.
void dequantize_micro_panel(DType wt, const uint8_t* W, int64_t w_stride, int nr, int64_t k,
                            float* rows, float* panel) {
  const int64_t k8 = k / 8 * 8;
  for (int half = 0; half < 2; ++half) {
    for (int r = 0; r < 8; ++r) {
      const int row = 8 * half + r;
      if (row < nr) {
        if (!dequantize_row_simd(wt, W + row * w_stride, rows + r * k, k)) {
          dequantize_row(wt, W + row * w_stride, rows + r * k, k);
        }
      } else {
        std::memset(rows + r * k, 0, static_cast<size_t>(k) * sizeof(float));
      }
    }
    float* out = panel + 8 * half;
    for (int64_t i = 0; i < k8; i += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_ps(rows + r * k + i);
      transpose8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (i + j) * kMicroRows, v[j]);
    }
    for (int64_t i = k8; i < k; ++i) {
      for (int r = 0; r < 8; ++r) out[i * kMicroRows + r] = rows[r * k + i];
    }
  }
}

// y[m * ldy + c] = sum_i x[m][i] * panel[i * 16 + c] for m < M tokens, c < nc columns.
template <int M>
void micro_tile(const float* const* x, int64_t k, const float* panel, float* y, int64_t ldy,
                int nc) {
  __m256 acc0[M], acc1[M];
  const float* xm[M];
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) {
    acc0[m] = _mm256_setzero_ps();
    acc1[m] = _mm256_setzero_ps();
    xm[m] = x[m];
  }
  for (int64_t i = 0; i < k; ++i) {
    const __m256 b0 = _mm256_loadu_ps(panel + i * kMicroRows);
    const __m256 b1 = _mm256_loadu_ps(panel + i * kMicroRows + 8);
#pragma GCC unroll 6
    for (int m = 0; m < M; ++m) {
      const __m256 a = _mm256_broadcast_ss(xm[m] + i);
      acc0[m] = _mm256_fmadd_ps(a, b0, acc0[m]);
      acc1[m] = _mm256_fmadd_ps(a, b1, acc1[m]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) {
    float* ym = y + m * ldy;
    if (nc == kMicroRows) {
      _mm256_storeu_ps(ym, acc0[m]);
      _mm256_storeu_ps(ym + 8, acc1[m]);
    } else {
      alignas(32) float tmp[kMicroRows];
      _mm256_store_ps(tmp, acc0[m]);
      _mm256_store_ps(tmp + 8, acc1[m]);
      std::memcpy(ym, tmp, static_cast<size_t>(nc) * sizeof(float));
    }
  }
}

void run_micro_tile(int m, const float* const* x, int64_t k, const float* panel, float* y,
                    int64_t ldy, int nc) {
  switch (m) {
    case 1:
      return micro_tile<1>(x, k, panel, y, ldy, nc);
    case 2:
      return micro_tile<2>(x, k, panel, y, ldy, nc);
    case 3:
      return micro_tile<3>(x, k, panel, y, ldy, nc);
    case 4:
      return micro_tile<4>(x, k, panel, y, ldy, nc);
    case 5:
      return micro_tile<5>(x, k, panel, y, ldy, nc);
    default:
      return micro_tile<6>(x, k, panel, y, ldy, nc);
  }
}

#else  // no AVX2: the same layout and the same per-element order, in scalar code

void dequantize_micro_panel(DType wt, const uint8_t* W, int64_t w_stride, int nr, int64_t k,
                            float* rows, float* panel) {
  for (int r = 0; r < kMicroRows; ++r) {
    if (r < nr) dequantize_row(wt, W + r * w_stride, rows, k);
    for (int64_t i = 0; i < k; ++i) panel[i * kMicroRows + r] = r < nr ? rows[i] : 0.f;
  }
}

void run_micro_tile(int m, const float* const* x, int64_t k, const float* panel, float* y,
                    int64_t ldy, int nc) {
  for (int t = 0; t < m; ++t) {
    for (int c = 0; c < nc; ++c) {
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += x[t][i] * panel[i * kMicroRows + c];
      y[t * ldy + c] = s;
    }
  }
}

#endif

}  // namespace

void matmul_rows_f32(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                     const float* const* x_rows, int64_t n_tokens, float* Y, int64_t ldy) {
  if (n_rows <= 0 || n_tokens <= 0 || k <= 0) return;
  PanelScratch& s = panel_scratch(k);
  const uint8_t* w = static_cast<const uint8_t*>(W);
  for (int64_t r0 = 0; r0 < n_rows; r0 += kPanelRows) {
    const int rows_here = static_cast<int>(std::min<int64_t>(kPanelRows, n_rows - r0));
    const int n_micro = (rows_here + kMicroRows - 1) / kMicroRows;
    for (int p = 0; p < n_micro; ++p) {
      const int nr = std::min(kMicroRows, rows_here - p * kMicroRows);
      dequantize_micro_panel(wt, w + (r0 + p * kMicroRows) * w_stride, w_stride, nr, k,
                             s.rows.data(), s.panel.data() + p * k * kMicroRows);
    }
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTileTokens) {
      const int m = static_cast<int>(std::min<int64_t>(kTileTokens, n_tokens - t0));
      for (int p = 0; p < n_micro; ++p) {
        const int nc = std::min(kMicroRows, rows_here - p * kMicroRows);
        run_micro_tile(m, x_rows + t0, k, s.panel.data() + p * k * kMicroRows,
                       Y + t0 * ldy + r0 + p * kMicroRows, ldy, nc);
      }
    }
  }
}

}  // namespace lme
