// Weight formats and the matrix products that read them in place.
//
// Type ids are GGML's, so a GGUF tensor's type field maps directly. Every supported weight type is
// multiplied by activations that were first converted once per row into a "partner" format
// (fp32 for float weights, 8-bit blocks for quantized ones); the product then reads each weight
// byte once and never materialises a dequantized copy of the model.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lme {

enum class DType : int32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q8_0 = 8,
  Q4_K = 12,
  Q6_K = 14,
  BF16 = 30,
};

bool dtype_is_supported(int32_t ggml_type);
const char* dtype_name(DType t);
int64_t dtype_block_size(DType t);   // elements per block (1 for float types)
int64_t dtype_block_bytes(DType t);  // bytes per block
// Bytes of one row of n elements; n must be a multiple of dtype_block_size(t).
int64_t dtype_row_bytes(DType t, int64_t n);

// Plain, exact dequantization of one row (n a multiple of the block size).
void dequantize_row(DType t, const void* src, float* dst, int64_t n);

// The activation format that matmul_rows() expects for weight type t, k elements per row.
int64_t activation_row_bytes(DType weight_type, int64_t k);
void quantize_activation_row(DType weight_type, const float* x, void* dst, int64_t k);

// Y[t * ldy + r] = dot(W row r, X row t) for r in [0, n_rows), t in [0, n_tokens).
// W: n_rows rows of dtype_row_bytes(wt, k) bytes, w_stride bytes apart.
// X: n_tokens rows made by quantize_activation_row(wt, ...), x_stride bytes apart.
// Single-threaded; callers split rows across threads. Tiles over rows and tokens internally.
void matmul_rows(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                 const void* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy);
// The plain scalar version of matmul_rows, the reference its SIMD paths are tested against: same
// arguments, same result up to float summation order.
void matmul_rows_reference(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                           const void* X, int64_t x_stride, int64_t n_tokens, float* Y,
                           int64_t ldy);

// Prompt-chunk products with fp32 activations: Y[t * ldy + r] = dot(W row r, x_rows[t]) for
// r in [0, n_rows), t in [0, n_tokens), any supported weight type and k (W laid out as for
// matmul_rows). Weights are dequantized exactly, a panel of rows at a time, into a per-thread
// buffer that every token reuses: worth it from ~8 tokens on. y[t, r] is one fp32 chain over k in
// order, so it does not depend on which other tokens or rows share the call. Single-threaded.
void matmul_rows_f32(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                     const float* const* x_rows, int64_t n_tokens, float* Y, int64_t ldy);

// True when weight_type's activation format is 8-bit (false for float weights: fp32 activations).
bool activation_is_quantized(DType weight_type);
// Inverse of quantize_activation_row's rounding: the values the products actually see.
void dequantize_activation_row(DType weight_type, const void* src, float* dst, int64_t k);
// Writes x's 8-bit row to dst_hi and the 8-bit row of its rounding residual to dst_lo, so that
// dot(W, hi) + dot(W, lo) has ~15-bit activation precision. scratch holds k floats.
void quantize_activation_row_residual(DType weight_type, const float* x, void* dst_hi, void* dst_lo,
                                      float* scratch, int64_t k);

// Wide activations (the engine's activation_bits = 16): ~15-16 bits of activation precision.
//   Q4_0, Q4_1, Q5_0, Q8_0: one 16-bit row per token (Q16_32: int16 q[k] | float d[k/32] |
//       float s[k/32], d = amax/32767), multiplied with 16-bit integer products; at one token it
//       costs what the 8-bit row does.
//   Q4_K, Q6_K: the 8-bit row in the first half of the token's x_stride bytes and its rounding
//       residual's 8-bit row in the second half (two products, summed).
//   Float weights: fp32, as for matmul_rows.
// A token's wide row takes x_stride bytes; x_stride must be even and at least
// activation_row_bytes_wide(wt, k).
int64_t activation_row_bytes_wide(DType weight_type, int64_t k);
// scratch: k floats.
void quantize_activation_row_wide(DType weight_type, const float* x, void* dst, int64_t x_stride,
                                  float* scratch, int64_t k);
// As matmul_rows over wide rows; scratch: 2 * n_tokens * n_rows floats (used by K-quants only).
void matmul_rows_wide(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                      const void* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy,
                      float* scratch);
// Scalar reference of matmul_rows_wide (same result up to float summation order).
void matmul_rows_wide_reference(DType wt, int64_t k, const void* W, int64_t w_stride,
                                int64_t n_rows, const void* X, int64_t x_stride, int64_t n_tokens,
                                float* Y, int64_t ldy, float* scratch);

// The instruction set the matmul_rows kernels were compiled for: "avx2", "avx2+avx512vnni",
// "avx2+avxvnni" or "scalar". The core has its own compile flags, so ask it, not the binding.
const char* matmul_simd_name();

// Half-precision helpers shared by the kernels.
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
float bf16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);  // round to nearest even

}  // namespace lme
