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

// s[j] = sum_d q[d] * kt[d * ps + j] for j < ps (kt: a transposed K page).
inline void page_scores(const float* q, const float* kt, int64_t hd, int64_t ps, float* s) {
  if (ps == 16) {
    v8f a0 = {}, a1 = {};
    for (int64_t d = 0; d < hd; ++d) {
      const float qd = q[d];
      a0 += qd * load8(kt + d * 16);
      a1 += qd * load8(kt + d * 16 + 8);
    }
    __builtin_memcpy(s, &a0, sizeof(a0));
    __builtin_memcpy(s + 8, &a1, sizeof(a1));
    return;
  }
  for (int64_t j = 0; j < ps; ++j) s[j] = 0.f;
  for (int64_t d = 0; d < hd; ++d) {
    const float qd = q[d];
    for (int64_t j = 0; j < ps; ++j) s[j] += qd * kt[d * ps + j];
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

// A K or V block as fp32: the block itself in an fp32 cache, else its first n elements converted
// into buf.
inline const float* kv_block_f32(const void* block, int32_t kv_dtype, float* buf, int64_t n) {
  if (kv_dtype == static_cast<int32_t>(KVDType::F32)) return static_cast<const float*>(block);
  kv_to_f32(kv_dtype, block, buf, n);
  return buf;
}

}  // namespace attention_vec
}  // namespace lme
