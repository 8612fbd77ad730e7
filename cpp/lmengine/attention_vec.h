// Vector helpers shared by the CPU attention kernels (attention.cpp, attention_sparse.cpp,
// attention_chunk.cpp): eight floats as one value, which GCC/Clang lower to one AVX register (or
// two SSE ones) so the page-wide accumulations are explicit instead of left to the vectoriser.
#pragma once

#include <cstdint>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "lmengine/kv_cache.h"
#include "lmengine/ops.h"
#include "lmengine/quant.h"

namespace lme {
namespace attention_vec {

typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }

// 16-bit elements of a KV pool, read by the kernels straight from the pool (the decode kernel
// converts as it loads instead of through a buffer: the stores and reloads of a converted page
// cost about as much as its arithmetic).
struct Half {  // IEEE fp16
  uint16_t bits;
};
struct BHalf {  // bfloat16
  uint16_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(Half h) { return fp16_to_fp32(h.bits); }
inline float to_f32(BHalf h) { return bf16_to_fp32(h.bits); }

// A 256-bit intrinsic vector as v8f (same bits), and the portable element-wise load.
template <typename V>
inline v8f as_v8f(const V& v) {
  v8f r;
  __builtin_memcpy(&r, &v, sizeof(r));
  return r;
}
template <typename T>
inline v8f load8_each(const T* p) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = to_f32(p[i]);
  return load8(f);
}

inline v8f load8(const Half* p) {
#if defined(__F16C__)
  return as_v8f(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return load8_each(p);
#endif
}

inline v8f load8(const BHalf* p) {
#if defined(__AVX2__)
  return as_v8f(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
  return load8_each(p);
#endif
}

// s[r][0 .. 8*NV) = sum_d q[r][d] * kt[d][0 .. 8*NV) for MR rows; kt is a transposed K page
// (row stride 8*NV = page_size). MR x NV accumulators stay in registers over head_dim; each d
// costs NV loads and MR broadcasts for MR * NV FMAs. 6 x 2 (12 of AVX2's 16 registers) measured
// 1.4x faster than 4 x 2 at page_size 16. A single row splits d into even/odd halves so that
// 2 * NV independent chains hide the FMA latency.
template <int MR, int NV, typename T>
inline void scores_rows(const float* q, int64_t hd, const T* kt, float* s, int64_t lds) {
  constexpr int ps = 8 * NV;
  if constexpr (MR == 1) {
    v8f a[NV] = {}, b[NV] = {};
    int64_t d = 0;
    for (; d + 2 <= hd; d += 2) {
      const float q0 = q[d], q1 = q[d + 1];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        a[v] += q0 * load8(kt + d * ps + 8 * v);
        b[v] += q1 * load8(kt + (d + 1) * ps + 8 * v);
      }
    }
    for (; d < hd; ++d) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[v] += q[d] * load8(kt + d * ps + 8 * v);
    }
    for (int v = 0; v < NV; ++v) store8(s + 8 * v, a[v] + b[v]);
  } else {
    v8f acc[MR][NV] = {};
    for (int64_t d = 0; d < hd; ++d) {
      v8f k[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) k[v] = load8(kt + d * ps + 8 * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const float qv = q[r * hd + d];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += qv * k[v];
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) store8(s + r * lds + 8 * v, acc[r][v]);
    }
  }
}

// The last rem (< MR) rows in one block of rem rows.
template <int MR, int NV, typename T>
inline void scores_tail(int32_t rem, const float* q, int64_t hd, const T* kt, float* s,
                        int64_t lds) {
  if constexpr (MR > 1) {
    if (rem == MR - 1) return scores_rows<MR - 1, NV>(q, hd, kt, s, lds);
    return scores_tail<MR - 1, NV>(rem, q, hd, kt, s, lds);
  }
}

template <int MR, int NV, typename T>
inline void scores_all(const float* q, int32_t rows, int64_t hd, const T* kt, float* s,
                       int64_t lds) {
  int32_t r = 0;
  for (; r + MR <= rows; r += MR) scores_rows<MR, NV>(q + r * hd, hd, kt, s + r * lds, lds);
  if (r < rows) scores_tail<MR, NV>(rows - r, q + r * hd, hd, kt, s + r * lds, lds);
}

template <typename T>
inline void scores_generic(const float* q, int32_t rows, int64_t hd, const T* kt, int64_t ps,
                           float* s, int64_t lds) {
  for (int32_t r = 0; r < rows; ++r) {
    float* sr = s + r * lds;
    for (int64_t j = 0; j < ps; ++j) sr[j] = 0.f;
    for (int64_t d = 0; d < hd; ++d) {
      const float qv = q[r * hd + d];
      for (int64_t j = 0; j < ps; ++j) sr[j] += qv * to_f32(kt[d * ps + j]);
    }
  }
}

// s[r][0 .. ps) (row stride lds) = q[r][0 .. hd) · kt for `rows` query rows hd apart (a GQA
// group's heads), kt: a transposed K page [hd][ps]. All rows of a group in one pass over the
// page: the rows' accumulators are independent chains, so the FMA latency is hidden.
template <typename T>
inline void page_scores(const float* q, int32_t rows, int64_t hd, const T* kt, int64_t ps, float* s,
                        int64_t lds) {
  switch (ps) {
    case 8:
      scores_all<8, 1>(q, rows, hd, kt, s, lds);
      return;
    case 16:
      scores_all<6, 2>(q, rows, hd, kt, s, lds);
      return;
    case 32:
      scores_all<2, 4>(q, rows, hd, kt, s, lds);
      return;
    default:
      scores_generic(q, rows, hd, kt, ps, s, lds);
  }
}

// The V side of one softmax block: its pages, and per page the slot range [j0, j1] some row
// may use (empty when j0 > j1). Column j of page b is column b * ps + j of the score rows.
template <typename T>
struct PVBlockT {
  const T* v[8];
  int64_t j0[8], j1[8];
  int64_t n_pages;
  int64_t ps;
};
using PVBlock = PVBlockT<float>;

// o[r][c .. c+16) = alpha[r] * o[r][..] + sum over the block's columns of p[r][col] * v[col][..]
// for MR rows, one 16-column block of head_dim at a time (MR x 2 accumulators held in registers
// across all pages of the softmax block, so o is loaded and stored once per block).
template <int MR, typename T>
inline void pv_rows(const float* p, int64_t ldp, const float* alpha, const PVBlockT<T>& blk,
                    int64_t hd, float* o) {
  for (int64_t c = 0; c < hd; c += 16) {
    v8f acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = alpha[r] * load8(o + r * hd + c);
      acc[r][1] = alpha[r] * load8(o + r * hd + c + 8);
    }
    for (int64_t b = 0; b < blk.n_pages; ++b) {
      const T* v = blk.v[b];
      const float* pb = p + b * blk.ps;
      for (int64_t j = blk.j0[b]; j <= blk.j1[b]; ++j) {
        const v8f v0 = load8(v + j * hd + c), v1 = load8(v + j * hd + c + 8);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const float pj = pb[r * ldp + j];
          acc[r][0] += pj * v0;
          acc[r][1] += pj * v1;
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      store8(o + r * hd + c, acc[r][0]);
      store8(o + r * hd + c + 8, acc[r][1]);
    }
  }
}

template <typename T>
inline void block_pv(const float* p, int32_t rows, int64_t ldp, const float* alpha,
                     const PVBlockT<T>& blk, int64_t hd, float* o) {
  if (hd % 16 == 0) {
    int32_t r = 0;
    for (; r + 6 <= rows; r += 6) pv_rows<6>(p + r * ldp, ldp, alpha + r, blk, hd, o + r * hd);
    switch (rows - r) {  // the rest in one pass over V (a GQA group of 3 or 4 in decode)
      case 5:
        return pv_rows<5>(p + r * ldp, ldp, alpha + r, blk, hd, o + r * hd);
      case 4:
        return pv_rows<4>(p + r * ldp, ldp, alpha + r, blk, hd, o + r * hd);
      case 3:
        return pv_rows<3>(p + r * ldp, ldp, alpha + r, blk, hd, o + r * hd);
      case 2:
        return pv_rows<2>(p + r * ldp, ldp, alpha + r, blk, hd, o + r * hd);
      case 1:
        return pv_rows<1>(p + r * ldp, ldp, alpha + r, blk, hd, o + r * hd);
      default:
        return;
    }
  }
  for (int32_t r = 0; r < rows; ++r) {
    float* orow = o + r * hd;
    for (int64_t d = 0; d < hd; ++d) orow[d] *= alpha[r];
    for (int64_t b = 0; b < blk.n_pages; ++b) {
      for (int64_t j = blk.j0[b]; j <= blk.j1[b]; ++j) {
        const float pj = p[r * ldp + b * blk.ps + j];
        const T* vj = blk.v[b] + j * hd;
        for (int64_t d = 0; d < hd; ++d) orow[d] += pj * to_f32(vj[d]);
      }
    }
  }
}

// Row helpers of the softmax over one block (n = its width). Vector forms when n % 8 == 0:
// scalar max/sum reductions would be a serial dependency chain per row, as long as the FMA work.
inline float horizontal_max(v8f v) {
  float a[8];
  __builtin_memcpy(a, &v, sizeof(v));
  float m = a[0];
  for (int i = 1; i < 8; ++i) m = a[i] > m ? a[i] : m;
  return m;
}
inline float horizontal_sum(v8f v) {
  float a[8];
  __builtin_memcpy(a, &v, sizeof(v));
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

// row *= scale; returns max(row).
inline float row_scale_max(float* row, int64_t n, float scale) {
  if (n % 8 == 0) {
    v8f mv = load8(row) * scale;
    store8(row, mv);
    for (int64_t j = 8; j < n; j += 8) {
      const v8f r = load8(row + j) * scale;
      store8(row + j, r);
      mv = r > mv ? r : mv;
    }
    return horizontal_max(mv);
  }
  float mx = -__builtin_inff();
  for (int64_t j = 0; j < n; ++j) {
    row[j] *= scale;
    mx = row[j] > mx ? row[j] : mx;
  }
  return mx;
}

inline float row_sum(const float* row, int64_t n) {
  if (n % 8 == 0) {
    v8f acc = load8(row);
    for (int64_t j = 8; j < n; j += 8) acc += load8(row + j);
    return horizontal_sum(acc);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += row[j];
  return sum;
}

// One online-softmax step of `rows` score rows (row stride ldp) over their first `width`
// columns, masked beforehand with -inf: scales them (after the dot product, so a large scale adds
// no rounding), raises m[r] to the step's max, turns the row into p = exp(s - m[r]) and sets
// alpha[r] = exp(m_old - m_new), the factor the running output and sum take; l[r] = alpha * l +
// sum(p). A row with no key in the step keeps m and l (alpha 1, p 0).
inline void online_softmax_step(float* s, int32_t rows, int64_t ldp, int64_t width, float scale,
                                float* m, float* l, float* alpha) {
  for (int32_t r = 0; r < rows; ++r) {
    float* row = s + r * ldp;
    const float mx = row_scale_max(row, width, scale);
    if (mx == -__builtin_inff()) {
      alpha[r] = 0.f;  // exp(0) = 1; the row's -inf give p = 0
      continue;
    }
    const float m_new = m[r] > mx ? m[r] : mx;
    alpha[r] = m[r] - m_new;  // -inf on the row's first keys: exp gives 0
    for (int64_t j = 0; j < width; ++j) row[j] -= m_new;
    m[r] = m_new;
  }
  if (width == ldp) {
    exp_inplace(s, rows * ldp);
  } else {
    for (int32_t r = 0; r < rows; ++r) exp_inplace(s + r * ldp, width);
  }
  exp_inplace(alpha, rows);
  for (int32_t r = 0; r < rows; ++r) l[r] = l[r] * alpha[r] + row_sum(s + r * ldp, width);
}

// Asks the cache hierarchy for the next block a loop will read (KV blocks are scattered over the
// pool, one per page, layer and head, so the hardware prefetchers cannot run ahead across them).
inline void prefetch_block(const void* block, int64_t bytes) {
  const char* p = static_cast<const char*>(block);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);  // into L2
}

}  // namespace attention_vec
}  // namespace lme
