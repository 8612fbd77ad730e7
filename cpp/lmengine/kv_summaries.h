// Block summaries of the paged KV cache, for block-sparse attention (ReSA / Quest selection).
//
// A block is one KV page (page_size positions). For every (page, layer, KV head) the summary is the
// element-wise min and max over the block's valid positions of the keys as stored (post-RoPE,
// after the fp16/bf16 rounding of the cache), so q . k <= sum_j max(q_j min_j, q_j max_j) holds
// for every key of the block exactly as attention will read it.
//
// Maintenance is one rule: whenever keys are written (append, rectification overwrite, import) or
// dropped (truncation), the summaries of the blocks covering those positions are recomputed from
// the stored keys, masked to the sequence's valid length. Recomputing instead of updating a
// running min/max keeps overwrites and truncation correct: a stale larger key never lingers.
#pragma once

#include <cstdint>

#include "lmengine/kv_cache.h"
#include "lmengine/status.h"

namespace lme {

// Recomputes the summary of one (page, layer, head) block from its first n_valid slots
// (1 <= n_valid <= page_size). The cache must have block summaries.
void kv_summary_refresh(KVCache& kv, int32_t page, int32_t layer, int32_t head, int64_t n_valid);

// Recomputes the summaries of every block of `seq` covering positions [pos_begin, pos_end),
// clipped to the sequence's current length, for `layer` (or every layer when layer < 0) and every
// KV head. A no-op for a cache without summaries.
Status kv_summaries_update(KVCache& kv, int32_t seq, int32_t layer, int64_t pos_begin, int64_t pos_end);

}  // namespace lme
