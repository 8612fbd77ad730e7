// Wide activations (activation_bits = 16, see quant.h). For the 32-element block types a token's
// activations are one row of 16-bit integers per block scale (Q16_32), multiplied against the
// weights with 16-bit integer products: ~16 bits of precision for the work of an 8-bit row. The
// K-quants keep "two-level" rows: the 8-bit row, then the 8-bit quantization of what its rounding
// lost (the residual's scale is <= 1/254 of the first's), two products summed; the weights are
// still read once because matmul_rows treats the two rows as two tokens of one tile.
#include <cstring>

#include "lmengine/quant.h"
#include "lmengine/quant_internal.h"

namespace lme {

using quant_detail::kQ32;
using quant_detail::kQK;

namespace {

bool is_q16_type(DType t) {
  return t == DType::Q4_0 || t == DType::Q4_1 || t == DType::Q5_0 || t == DType::Q8_0;
}

// Symmetric 16-bit quantization of one 32-element block: returns the scale, writes q in
// [-32767, 32767] (rounded to nearest even; NaN maps to a finite value, as in the 8-bit rows).
float quantize_block_q16(const float* x, int16_t* q, int& qsum) {
  float lane_max[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int i0 = 0; i0 < kQ32; i0 += 8) {
    for (int l = 0; l < 8; ++l) {
      const float a = x[i0 + l] < 0.f ? -x[i0 + l] : x[i0 + l];
      lane_max[l] = a > lane_max[l] ? a : lane_max[l];
    }
  }
  float amax = 0.f;
  for (int l = 0; l < 8; ++l) amax = amax > lane_max[l] ? amax : lane_max[l];
  const float id = amax > 0.f ? 32767.f / amax : 0.f;
  int sum = 0;
  for (int i = 0; i < kQ32; ++i) {
    float v = (x[i] * id + 12582912.0f) - 12582912.0f;
    v = v > 32767.f ? 32767.f : v;
    v = !(v > -32767.f) ? -32767.f : v;
    q[i] = static_cast<int16_t>(static_cast<int32_t>(v));
    sum += q[i];
  }
  qsum = sum;
  return amax / 32767.f;
}

// One weight row against one Q16_32 row: per block the exact integer dot, then
// sum += (dw*dx) * dot + c * s, as the 8-bit reference.
float dot_q16_reference(DType t, const uint8_t* w, const uint8_t* x, int64_t k) {
  const int64_t nb = k / kQ32;
  const uint8_t* xd = x + 2 * k;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int qw[32];
    float dw, c;
    w += quant_detail::unpack_q32_block(t, w, qw, dw, c);
    int64_t dot = 0;
    for (int j = 0; j < 32; ++j) {
      int16_t q;
      std::memcpy(&q, x + 2 * (b * kQ32 + j), 2);
      dot += int64_t(qw[j]) * q;
    }
    float d, s;
    std::memcpy(&d, xd + 4 * b, 4);
    std::memcpy(&s, xd + 4 * (nb + b), 4);
    sum += dw * d * static_cast<float>(dot) + c * s;
  }
  return sum;
}

// Two-level K-quant rows: the value and residual rows of token t sit x_stride / 2 apart, so all
// of them are 2 * n_tokens rows at stride x_stride / 2; products go to scratch, then summed.
template <class Product>
void two_level_product(int64_t n_rows, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy,
                       float* scratch, Product&& product) {
  product(x_stride / 2, 2 * n_tokens, scratch, n_rows);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* hi = scratch + 2 * t * n_rows;
    const float* lo = hi + n_rows;
    float* y = Y + t * ldy;
    for (int64_t r = 0; r < n_rows; ++r) y[r] = hi[r] + lo[r];
  }
}

}  // namespace

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

int64_t activation_row_bytes_wide(DType weight_type, int64_t k) {
  if (is_q16_type(weight_type)) return 2 * k + 2 * static_cast<int64_t>(sizeof(float)) * (k / kQ32);
  if (activation_is_quantized(weight_type)) return 2 * activation_row_bytes(weight_type, k);
  return activation_row_bytes(weight_type, k);
}

void quantize_activation_row_wide(DType weight_type, const float* x, void* dst, int64_t x_stride,
                                  float* scratch, int64_t k) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  if (is_q16_type(weight_type)) {
    const int64_t nb = k / kQ32;
    int16_t q[kQ32];
    for (int64_t b = 0; b < nb; ++b) {
      int qsum = 0;
      const float d = quantize_block_q16(x + b * kQ32, q, qsum);
      const float s = d * static_cast<float>(qsum);
      std::memcpy(out + 2 * b * kQ32, q, sizeof(q));
      std::memcpy(out + 2 * k + 4 * b, &d, 4);
      std::memcpy(out + 2 * k + 4 * (nb + b), &s, 4);
    }
  } else if (activation_is_quantized(weight_type)) {
    quantize_activation_row_residual(weight_type, x, out, out + x_stride / 2, scratch, k);
  } else {
    quantize_activation_row(weight_type, x, out, k);
  }
}

namespace {

// The one dispatch of both entry points: Q16_32 rows (SIMD unless `reference`, scalar dots
// otherwise), two-level K-quant rows, or fp32 rows for float weights.
void wide_product(bool reference, DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                  const void* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy, float* scratch) {
  if (n_rows <= 0 || n_tokens <= 0) return;
  const auto rows = reference ? matmul_rows_reference : matmul_rows;
  if (!is_q16_type(wt)) {
    if (!activation_is_quantized(wt)) return rows(wt, k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy);
    return two_level_product(n_rows, x_stride, n_tokens, Y, ldy, scratch,
                             [&](int64_t xs, int64_t n, float* y, int64_t ld) {
                               rows(wt, k, W, w_stride, n_rows, X, xs, n, y, ld);
                             });
  }
  const uint8_t* w = static_cast<const uint8_t*>(W);
  const uint8_t* x = static_cast<const uint8_t*>(X);
  if (!reference && quant_detail::matmul_rows_q16_simd(wt, k, w, w_stride, n_rows, x, x_stride, n_tokens, Y, ldy)) {
    return;
  }
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t r = 0; r < n_rows; ++r) {
      Y[t * ldy + r] = dot_q16_reference(wt, w + r * w_stride, x + t * x_stride, k);
    }
  }
}

}  // namespace

void matmul_rows_wide(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                      const void* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy,
                      float* scratch) {
  wide_product(false, wt, k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy, scratch);
}

void matmul_rows_wide_reference(DType wt, int64_t k, const void* W, int64_t w_stride,
                                int64_t n_rows, const void* X, int64_t x_stride, int64_t n_tokens,
                                float* Y, int64_t ldy, float* scratch) {
  wide_product(true, wt, k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy, scratch);
}

}  // namespace lme
