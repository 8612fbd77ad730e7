// Vector helpers shared by the CPU attention kernels (attention.cpp, attention_sparse.cpp,
// attention_chunk.cpp): eight floats as one value, which GCC/Clang lower to one AVX register (or
// two SSE ones) so the page-wide accumulations are explicit instead of left to the vectoriser.
#pragma once

#include <cstdint>

#include "lmengine/kv_cache.h"
#include "lmengine/ops.h"

namespace lme {
namespace attention_vec {

typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }

// s[r][0 .. 8*NV) = sum_d q[r][d] * kt[d][0 .. 8*NV) for MR rows; kt is a transposed K page
// (row stride 8*NV = page_size). MR x NV accumulators stay in registers over head_dim; each d
// costs NV loads and MR broadcasts for MR * NV FMAs. 6 x 2 (12 of AVX2's 16 registers) measured
// 1.4x faster than 4 x 2 at page_size 16. A single row splits d into even/odd halves so that
// 2 * NV independent chains hide the FMA latency.
template <int MR, int NV>
inline void scores_rows(const float* q, int64_t hd, const float* kt, float* s, int64_t lds) {
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
template <int MR, int NV>
inline void scores_tail(int32_t rem, const float* q, int64_t hd, const float* kt, float* s, int64_t lds) {
  if constexpr (MR > 1) {
    if (rem == MR - 1) return scores_rows<MR - 1, NV>(q, hd, kt, s, lds);
    return scores_tail<MR - 1, NV>(rem, q, hd, kt, s, lds);
  }
}

template <int MR, int NV>
inline void scores_all(const float* q, int32_t rows, int64_t hd, const float* kt, float* s, int64_t lds) {
  int32_t r = 0;
  for (; r + MR <= rows; r += MR) scores_rows<MR, NV>(q + r * hd, hd, kt, s + r * lds, lds);
  if (r < rows) scores_tail<MR, NV>(rows - r, q + r * hd, hd, kt, s + r * lds, lds);
}

inline void scores_generic(const float* q, int32_t rows, int64_t hd, const float* kt, int64_t ps, float* s,
                           int64_t lds) {
  for (int32_t r = 0; r < rows; ++r) {
    float* sr = s + r * lds;
    for (int64_t j = 0; j < ps; ++j) sr[j] = 0.f;
    for (int64_t d = 0; d < hd; ++d) {
      const float qv = q[r * hd + d];
      for (int64_t j = 0; j < ps; ++j) sr[j] += qv * kt[d * ps + j];
    }
  }
}

// s[r][0 .. ps) (row stride lds) = q[r][0 .. hd) · kt for `rows` query rows hd apart (a GQA
// group's heads), kt: a transposed K page [hd][ps]. All rows of a group in one pass over the
// page: the rows' accumulators are independent chains, so the FMA latency is hidden.
inline void page_scores(const float* q, int32_t rows, int64_t hd, const float* kt, int64_t ps, float* s,
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

// out[0..HD) += sum_j p[j] * v[j][0..HD), the accumulator held in registers across the rows.
template <int HD>
inline void weighted_rows(const float* p, const float* v, int64_t n, float* out) {
  constexpr int kVecs = HD / 8;
  v8f acc[kVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kVecs; ++i) acc[i] = load8(out + 8 * i);
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
#pragma GCC unroll 16
    for (int i = 0; i < kVecs; ++i) acc[i] += pj * load8(v + j * HD + 8 * i);
  }
  for (int i = 0; i < kVecs; ++i) __builtin_memcpy(out + 8 * i, &acc[i], sizeof(v8f));
}

// Asks the cache hierarchy for the next block a loop will read (KV blocks are scattered over the
// pool, one per page, layer and head, so the hardware prefetchers cannot run ahead across them).
inline void prefetch_block(const void* block, int64_t bytes) {
  const char* p = static_cast<const char*>(block);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);  // into L2
}

// A K or V block as fp32: the block itself in an fp32 cache, else its first n elements converted
// into buf.
inline const float* kv_block_f32(const void* block, int32_t kv_dtype, float* buf, int64_t n) {
  if (kv_dtype == static_cast<int32_t>(KVDType::F32)) return static_cast<const float*>(block);
  kv_to_f32(kv_dtype, block, buf, n);
  return buf;
}

}  // namespace attention_vec
}  // namespace lme
