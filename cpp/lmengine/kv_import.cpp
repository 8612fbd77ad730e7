// Engine::seq_write_kv / seq_read_kv: K/V rows in and out of a sequence's pages, outside a step.
// The one place that writes K/V from outside the forward pass, so anything derived from the keys
// (block summaries) is refreshed here.
#include <string>

#include "lmengine/attention.h"
#include "lmengine/kv_summaries.h"
#include "lmengine/model.h"
#include "lmengine/ops.h"

namespace lme {

Status Engine::seq_write_kv(int32_t seq, int32_t layer0, int32_t n_layers, int64_t pos0, int64_t n, const float* k,
                            const float* v) {
  const ModelConfig& c = config_;
  if (!kv_.seq_valid(seq)) {
    return Status::Error(StatusCode::kInvalidArgument, "unknown sequence id " + std::to_string(seq));
  }
  if (layer0 < 0 || n_layers < 1 || layer0 + int64_t(n_layers) > c.n_layers) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "layers [" + std::to_string(layer0) + ", " + std::to_string(int64_t(layer0) + n_layers) +
                             ") out of range [0, " + std::to_string(c.n_layers) + ")");
  }
  if (n < 1 || k == nullptr || v == nullptr) {
    return Status::Error(StatusCode::kInvalidArgument, "K/V import needs at least one position");
  }
  const int64_t length = kv_.seq_length(seq);
  const int64_t end = pos0 + n;
  if (end > c.max_context) {
    return Status::Error(StatusCode::kContextOverflow, "K/V import would reach " + std::to_string(end) +
                                                           " positions, beyond the context of " +
                                                           std::to_string(c.max_context));
  }
  if (pos0 < 0 || pos0 > length) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "K/V import at position " + std::to_string(pos0) + " would leave a gap: sequence " +
                             std::to_string(seq) + " has length " + std::to_string(length));
  }
  if (end > length && !(layer0 == 0 && n_layers == c.n_layers)) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "K/V import past the sequence length must write every layer (a position exists "
                         "for all layers or none)");
  }
  Status st = kv_.seq_reserve(seq, end);
  if (!st.ok()) return st;

  const int64_t ps = kv_.config().page_size, hd = c.head_dim, row = int64_t(c.n_kv_heads) * hd;
  const std::vector<int32_t>& pages = kv_.seq_pages(seq);
  for (int32_t li = 0; li < n_layers; ++li) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = pos0 + i;
      const float* kr = k + (int64_t(li) * n + i) * row;
      const float* vr = v + (int64_t(li) * n + i) * row;
      for (int32_t h = 0; h < c.n_kv_heads; ++h) {
        kv_store_token(kv_, pages[pos / ps], layer0 + li, h, pos % ps, kr + h * hd, vr + h * hd);
      }
    }
  }
  if (end > length) kv_.seq_set_length(seq, end);
  // Keys changed: the block summaries of the written layers' blocks follow (no-op without them).
  for (int32_t li = 0; li < n_layers; ++li) {
    st = kv_summaries_update(kv_, seq, layer0 + li, pos0, end);
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

Status Engine::seq_read_kv(int32_t seq, int32_t layer, int64_t pos0, int64_t n, float* k, float* v) {
  const ModelConfig& c = config_;
  if (!kv_.seq_valid(seq)) {
    return Status::Error(StatusCode::kInvalidArgument, "unknown sequence id " + std::to_string(seq));
  }
  if (layer < 0 || layer >= c.n_layers) {
    return Status::Error(StatusCode::kInvalidArgument, "layer " + std::to_string(layer) + " out of range [0, " +
                                                           std::to_string(c.n_layers) + ")");
  }
  const int64_t length = kv_.seq_length(seq);
  if (n < 0 || pos0 < 0 || pos0 + n > length) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "positions [" + std::to_string(pos0) + ", " + std::to_string(pos0 + n) +
                             ") out of the sequence's range [0, " + std::to_string(length) + ")");
  }
  const KVCacheConfig& kc = kv_.config();
  const int64_t ps = kc.page_size, hd = c.head_dim, elem = kv_dtype_bytes(kc.dtype);
  const int32_t dt = static_cast<int32_t>(kc.dtype);
  const std::vector<int32_t>& pages = kv_.seq_pages(seq);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = pos0 + i, slot = pos % ps;
    for (int32_t h = 0; h < c.n_kv_heads; ++h) {
      float* kd = k + (i * c.n_kv_heads + h) * hd;
      const uint8_t* kb = kv_.k_block(pages[pos / ps], layer, h);
      for (int64_t d = 0; d < hd; ++d) kv_to_f32(dt, kb + (d * ps + slot) * elem, kd + d, 1);  // K is [hd][ps]
      kv_to_f32(dt, kv_.v_block(pages[pos / ps], layer, h) + slot * hd * elem, v + (i * c.n_kv_heads + h) * hd, hd);
    }
  }
  return Status::Ok();
}

}  // namespace lme
