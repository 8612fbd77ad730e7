// Layouts shared by quant.cpp (formats, reference kernels) and the SIMD kernels; not public API.
//
// Activation rows (what quantize_activation_row writes), k elements, structure of arrays so the
// 8-bit values of a row are contiguous and the scales can be read as vectors:
//   Q8_32 (for Q4_0, Q4_1, Q5_0, Q8_0 weights): int8 q[k] | float d[k/32] | float s[k/32]
//       x ~= d[b] * q[i] for i in block b; s[b] = d[b] * sum(q in block b), so a weight block's
//       constant term (Q4_1's min, the -8/-16 offset of Q4_0/Q5_0) costs one multiply.
//   Q8_256 (for Q4_K, Q6_K weights): int8 q[k] | float d[k/256] | int16 bsum[k/16]
//       bsum[j] = sum of q[16j .. 16j+15], for the K-quants' per-sub-block mins and offsets.
//   F32 (for F32, F16, BF16 weights): float x[k]
//   Q16_32 (wide rows for Q4_0, Q4_1, Q5_0, Q8_0): int16 q[k] | float d[k/32] | float s[k/32]
//       as Q8_32 with q in [-32767, 32767] and d = amax / 32767 (see quant.h, "wide").
// All q are in [-127, 127] (never -128), which keeps the AVX2 u8*s8 pair sums below 2^15.
#pragma once

#include <cstdint>

#include "lmengine/quant.h"

namespace lme {
namespace quant_detail {

constexpr int64_t kQ32 = 32;   // elements per block of Q4_0, Q4_1, Q5_0, Q8_0
constexpr int64_t kQK = 256;   // elements per K-quant super-block
constexpr int64_t kBsum = 16;  // elements per Q8_256 partial sum

// Weight block layouts (GGML's, little-endian; "half" is IEEE fp16 bits), for j in [0, 16):
//   Q4_0 (18 B): half d | u8 qs[16]; x[j] = d*((qs[j]&15)-8), x[j+16] = d*((qs[j]>>4)-8)
//   Q4_1 (20 B): half d | half m | u8 qs[16]; x[j] = d*(qs[j]&15)+m, x[j+16] = d*(qs[j]>>4)+m
//   Q5_0 (22 B): half d | u32 qh | u8 qs[16]; as Q4_0 with bit i of qh as bit 4 of element i
//       and offset 16 instead of 8
//   Q8_0 (34 B): half d | i8 qs[32]; x[i] = d*qs[i]
//   Q4_K (144 B): half d | half dmin | u8 scales[12] | u8 qs[128]; 8 sub-blocks of 32 with 6-bit
//       scale sc and min m, x = d*sc*q - dmin*m, q in [0, 15]; 64-element chunk c holds sub-block
//       2c in the low nibbles of qs[32c .. 32c+31] and 2c+1 in the high nibbles
//   Q6_K (210 B): u8 ql[128] | u8 qh[64] | i8 scales[16] | half d; 16 sub-blocks of 16,
//       x = d*scales[i]*(q-32), q = 4 bits of ql | 2 bits of qh << 4 (see dequantize_row)
constexpr int64_t kBytesQ4_0 = 18, kBytesQ4_1 = 20, kBytesQ5_0 = 22, kBytesQ8_0 = 34;
constexpr int64_t kBytesQ4_K = 144, kBytesQ6_K = 210;

// Unpacks a Q4_K block's 12 scale bytes into 8 scales and 8 mins (6 bits each).
inline void q4k_scales_mins(const uint8_t* packed, uint8_t sc[8], uint8_t m[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = packed[j] & 63;
    m[j] = packed[j + 4] & 63;
    sc[j + 4] = (packed[j + 8] & 15) | ((packed[j] >> 6) << 4);
    m[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
  }
}

// Unpacks one block of a 32-element type (Q4_0, Q4_1, Q5_0, Q8_0) for the scalar references:
// integer values qw, scale dw and constant term c (x[i] = dw * qw[i] + c). Returns its bytes.
inline int64_t unpack_q32_block(DType t, const uint8_t* w, int qw[32], float& dw, float& c) {
  dw = fp16_to_fp32(static_cast<uint16_t>(w[0] | (w[1] << 8)));
  switch (t) {
    case DType::Q4_0:
      c = -8.f * dw;
      for (int j = 0; j < 16; ++j) qw[j] = w[2 + j] & 15, qw[j + 16] = w[2 + j] >> 4;
      return kBytesQ4_0;
    case DType::Q4_1:
      c = fp16_to_fp32(static_cast<uint16_t>(w[2] | (w[3] << 8)));
      for (int j = 0; j < 16; ++j) qw[j] = w[4 + j] & 15, qw[j + 16] = w[4 + j] >> 4;
      return kBytesQ4_1;
    case DType::Q5_0: {
      c = -16.f * dw;
      const uint32_t qh = static_cast<uint32_t>(w[2]) | (static_cast<uint32_t>(w[3]) << 8) |
                          (static_cast<uint32_t>(w[4]) << 16) | (static_cast<uint32_t>(w[5]) << 24);
      for (int j = 0; j < 16; ++j) {
        qw[j] = (w[6 + j] & 15) | (((qh >> j) & 1) << 4);
        qw[j + 16] = (w[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      return kBytesQ5_0;
    }
    default:  // Q8_0
      c = 0.f;
      for (int j = 0; j < 32; ++j) qw[j] = static_cast<int8_t>(w[2 + j]);
      return kBytesQ8_0;
  }
}

// SIMD matmul_rows for the compiled-in instruction set; false when none applies to wt.
bool matmul_rows_simd(DType wt, int64_t k, const uint8_t* W, int64_t w_stride, int64_t n_rows,
                      const uint8_t* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy);
// The same for Q16_32 rows (Q4_0, Q4_1, Q5_0, Q8_0 weights only).
bool matmul_rows_q16_simd(DType wt, int64_t k, const uint8_t* W, int64_t w_stride, int64_t n_rows,
                          const uint8_t* X, int64_t x_stride, int64_t n_tokens, float* Y,
                          int64_t ldy);

}  // namespace quant_detail
}  // namespace lme
