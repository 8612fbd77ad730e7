// Writing K/V into the paged cache. (The decode kernel, dense and block-sparse, is
// attention_sparse_partial in attention_sparse.h; multi-token chunks use attention_chunk.h.)
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

// Writes one token's K and V head vectors (fp32) at `slot` of a page block, in the cache's dtype
// and layout.
void kv_store_token(KVCache& kv, int32_t page, int32_t layer, int32_t head, int64_t slot, const float* k,
                    const float* v);

}  // namespace lme
