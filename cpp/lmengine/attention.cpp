#include "lmengine/attention.h"

#include <algorithm>

#include "lmengine/attention_vec.h"
#include "lmengine/ops.h"
#include "lmengine/quant.h"

namespace lme {

void kv_store_token(KVCache& kv, int32_t page, int32_t layer, int32_t head, int64_t slot, const float* k,
                    const float* v) {
  const KVCacheConfig& c = kv.config();
  const int64_t hd = c.head_dim, ps = c.page_size;
  uint8_t* kb = kv.k_block(page, layer, head);
  uint8_t* vb = kv.v_block(page, layer, head);
  switch (c.dtype) {
    case KVDType::F32: {
      float* kt = reinterpret_cast<float*>(kb);
      for (int64_t d = 0; d < hd; ++d) kt[d * ps + slot] = k[d];
      break;
    }
    case KVDType::F16: {
      uint16_t* kt = reinterpret_cast<uint16_t*>(kb);
      for (int64_t d = 0; d < hd; ++d) kt[d * ps + slot] = fp32_to_fp16(k[d]);
      break;
    }
    case KVDType::BF16: {
      uint16_t* kt = reinterpret_cast<uint16_t*>(kb);
      for (int64_t d = 0; d < hd; ++d) kt[d * ps + slot] = fp32_to_bf16(k[d]);
      break;
    }
  }
  f32_to_kv(static_cast<int32_t>(c.dtype), v, vb + slot * hd * kv_dtype_bytes(c.dtype), hd);
}

namespace {

using attention_vec::kv_block_f32;
using attention_vec::load8;
using attention_vec::page_scores;
using attention_vec::v8f;
using attention_vec::weighted_rows;

}  // namespace

void attention_paged_one(const float* q, int32_t group, float scale, KVCache& kv, const int32_t* pages,
                         int32_t layer, int32_t head, int64_t lo, int64_t pos, const AttentionScratch& scratch,
                         float* out) {
  const KVCacheConfig& c = kv.config();
  const int64_t hd = c.head_dim, ps = c.page_size;
  const int32_t dt = static_cast<int32_t>(c.dtype);
  const int64_t base = lo - lo % ps;  // scores are indexed from the first page's start
  const int64_t first = lo - base, last = pos - base;  // valid score range, inclusive
  float* kbuf = scratch.kv_buf;
  float* vbuf = scratch.kv_buf + ps * hd;

  // Pass 1: scores of every position of every touched page (positions outside [lo, pos] are
  // computed on whatever the page holds and then ignored).
  const int64_t block_bytes = kv.block_bytes();
  for (int64_t p0 = base; p0 <= pos; p0 += ps) {
    const int32_t page = pages[p0 / ps];
    if (p0 + ps <= pos) attention_vec::prefetch_block(kv.k_block(pages[p0 / ps + 1], layer, head), block_bytes);
    const float* kt = kv_block_f32(kv.k_block(page, layer, head), dt, kbuf, ps * hd);
    page_scores(q, group, hd, kt, ps, scratch.scores + (p0 - base), scratch.scores_stride);
  }
  // Softmax over [first, last] per query head.
  for (int32_t g = 0; g < group; ++g) {
    float* sc = scratch.scores + g * scratch.scores_stride + first;
    const int64_t n = last - first + 1;
    float mx = -3.0e38f;
    for (int64_t j = 0; j < n; ++j) {
      sc[j] *= scale;
      mx = sc[j] > mx ? sc[j] : mx;
    }
    for (int64_t j = 0; j < n; ++j) sc[j] -= mx;
    exp_inplace(sc, n);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += sc[j];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
  }
  // Pass 2: out[g] = sum_j p[g][j] * V[j].
  std::fill(out, out + group * hd, 0.f);
  for (int64_t p0 = base; p0 <= pos; p0 += ps) {
    const int32_t page = pages[p0 / ps];
    const int64_t j0 = std::max(p0, lo), j1 = std::min(p0 + ps - 1, pos);
    if (p0 + ps <= pos) attention_vec::prefetch_block(kv.v_block(pages[p0 / ps + 1], layer, head), block_bytes);
    const float* vp = kv_block_f32(kv.v_block(page, layer, head), dt, vbuf, (j1 - p0 + 1) * hd);
    for (int32_t g = 0; g < group; ++g) {
      const float* pg = scratch.scores + g * scratch.scores_stride - base;
      float* og = out + g * hd;
      if (hd == 64) {
        weighted_rows<64>(pg + j0, vp + (j0 - p0) * hd, j1 - j0 + 1, og);
      } else if (hd == 128) {
        weighted_rows<128>(pg + j0, vp + (j0 - p0) * hd, j1 - j0 + 1, og);
      } else {
        for (int64_t j = j0; j <= j1; ++j) {
          const float p = pg[j];
          const float* vr = vp + (j - p0) * hd;
          for (int64_t d = 0; d < hd; ++d) og[d] += p * vr[d];
        }
      }
    }
  }
}

}  // namespace lme
