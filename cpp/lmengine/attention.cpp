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

}  // namespace lme
