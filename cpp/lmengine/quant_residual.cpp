// Two-level ("residual") activations: a row quantized to 8 bits, then the 8-bit quantization of
// what that rounding lost. A product over both rows carries ~15 bits of activation precision
// (the residual's scale is <= 1/254 of the first's) for twice the integer work; the weights are
// still read once because matmul_rows treats the two rows as two tokens of one tile.
#include <cstring>

#include "lmengine/quant.h"
#include "lmengine/quant_internal.h"

namespace lme {

using quant_detail::kQ32;
using quant_detail::kQK;

bool activation_is_quantized(DType weight_type) {
  switch (weight_type) {
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q8_0:
    case DType::Q4_K:
    case DType::Q6_K:
      return true;
    default:
      return false;
  }
}

void dequantize_activation_row(DType weight_type, const void* src, float* dst, int64_t k) {
  const uint8_t* in = static_cast<const uint8_t*>(src);
  if (!activation_is_quantized(weight_type)) {
    std::memcpy(dst, in, static_cast<size_t>(k) * sizeof(float));
    return;
  }
  // Both 8-bit layouts start with int8 q[k] followed by the float block scales d[k/block].
  const int64_t block = (weight_type == DType::Q4_K || weight_type == DType::Q6_K) ? kQK : kQ32;
  const int8_t* q = reinterpret_cast<const int8_t*>(in);
  for (int64_t b = 0; b < k / block; ++b) {
    float d;
    std::memcpy(&d, in + k + 4 * b, 4);
    for (int64_t i = b * block; i < (b + 1) * block; ++i) dst[i] = d * static_cast<float>(q[i]);
  }
}

void quantize_activation_row_residual(DType weight_type, const float* x, void* dst_hi, void* dst_lo,
                                      float* scratch, int64_t k) {
  quantize_activation_row(weight_type, x, dst_hi, k);
  dequantize_activation_row(weight_type, dst_hi, scratch, k);
  for (int64_t i = 0; i < k; ++i) scratch[i] = x[i] - scratch[i];
  quantize_activation_row(weight_type, scratch, dst_lo, k);
}

}  // namespace lme
