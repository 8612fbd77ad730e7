#include "lmengine/kv_summaries.h"

#include <algorithm>
#include <string>

#include "lmengine/ops.h"

namespace lme {

void kv_summary_refresh(KVCache& kv, int32_t page, int32_t layer, int32_t head, int64_t n_valid) {
  const KVCacheConfig& c = kv.config();
  const int64_t hd = c.head_dim, ps = c.page_size;
  float summary[2 * 4096];  // head_dim <= 4096; converted to the cache's dtype at the end (exact)
  float* mn = summary;
  float* mx = mn + hd;
  const uint8_t* kb = kv.k_block(page, layer, head);
  // K is [head_dim][page_size] within the block: dimension d of the valid slots is one short row.
  float row[4096];  // page_size <= 4096 (checked where the cache is configured)
  for (int64_t d = 0; d < hd; ++d) {
    const float* r;
    if (c.dtype == KVDType::F32) {
      r = reinterpret_cast<const float*>(kb) + d * ps;
    } else {
      kv_to_f32(static_cast<int32_t>(c.dtype), kb + d * ps * kv_dtype_bytes(c.dtype), row, n_valid);
      r = row;
    }
    float lo = r[0], hi = r[0];
    for (int64_t j = 1; j < n_valid; ++j) {
      lo = std::min(lo, r[j]);
      hi = std::max(hi, r[j]);
    }
    mn[d] = lo;
    mx[d] = hi;
  }
  f32_to_kv(static_cast<int32_t>(c.dtype), summary, kv.block_summary(page, layer, head), 2 * hd);
}

Status kv_summaries_update(KVCache& kv, int32_t seq, int32_t layer, int64_t pos_begin, int64_t pos_end) {
  const KVCacheConfig& c = kv.config();
  if (!c.block_summaries) return Status::Ok();
  if (!kv.seq_valid(seq)) {
    return Status::Error(StatusCode::kInvalidArgument, "unknown sequence id " + std::to_string(seq));
  }
  if (layer >= c.n_layers) {
    return Status::Error(StatusCode::kInvalidArgument, "layer " + std::to_string(layer) + " out of range");
  }
  const int64_t length = kv.seq_length(seq);
  pos_begin = std::max<int64_t>(pos_begin, 0);
  pos_end = std::min(pos_end, length);
  if (pos_begin >= pos_end) return Status::Ok();
  const int64_t ps = c.page_size;
  const std::vector<int32_t>& pages = kv.seq_pages(seq);
  const int32_t l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? c.n_layers : layer + 1;
  for (int64_t b = pos_begin / ps; b <= (pos_end - 1) / ps; ++b) {
    const int64_t n_valid = std::min(ps, length - b * ps);
    for (int32_t l = l0; l < l1; ++l) {
      for (int32_t h = 0; h < c.n_kv_heads; ++h) kv_summary_refresh(kv, pages[b], l, h, n_valid);
    }
  }
  return Status::Ok();
}

}  // namespace lme
