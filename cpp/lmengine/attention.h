// Dense causal attention of one query token over a sequence's KV pages.
//
// Page layout (see kv_cache.h): within one (page, layer, head) block, K is stored transposed,
// [head_dim][page_size], so the scores of a whole page are page_size-wide vector FMAs
// (s[0..ps) += q[d] * K[d][0..ps)); V is stored [page_size][head_dim], so the weighted sum is
// head_dim-wide FMAs. Napkin math per (token, KV head): reads 2 * ctx * head_dim * elem bytes,
// does 4 * group * ctx * head_dim FLOPs.
#pragma once

#include <cstdint>

#include "lmengine/kv_cache.h"

namespace lme {

struct AttentionScratch {
  float* scores;   // [group][scores_stride]
  int64_t scores_stride;  // >= context + page_size
  float* kv_buf;   // 2 * page_size * head_dim floats (conversion of fp16/bf16 pages)
};

// out[g][:] = softmax(scale * q[g] . K[lo..pos]) . V[lo..pos] for the `group` query heads that
// share KV head `head`. pages: the sequence's page table. q, out: [group][head_dim].
void attention_paged_one(const float* q, int32_t group, float scale, KVCache& kv, const int32_t* pages,
                         int32_t layer, int32_t head, int64_t lo, int64_t pos, const AttentionScratch& scratch,
                         float* out);

// Writes one token's K and V head vectors (fp32) at `slot` of a page block, in the cache's dtype
// and layout.
void kv_store_token(KVCache& kv, int32_t page, int32_t layer, int32_t head, int64_t slot, const float* k,
                    const float* v);

}  // namespace lme
