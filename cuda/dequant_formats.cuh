// Device-side readers of the GGML weight formats, shared by the dequantizing GEMV
// (gemv_dequant.cu) and the MoE expert products (moe_dispatch.cu). Weights are turned into floats
// without the quarter-rate int-to-float instruction: byte b becomes the float 2^23 + b by a byte
// permute, and one subtraction removes 2^23 and the format's offset (see byte_as_float). Only .cu
// files include this.
#pragma once

#include "kernels.cuh"
#include "lmengine/quant_internal.h"

namespace lme {
namespace cuda_detail {

// Byte j of w, minus kOffset, as an exact float: 0x4B0000bb is the float 2^23 + bb.
template <int kOffset>
__device__ __forceinline__ float byte_as_float(uint32_t w, int j) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | j)) - (8388608.0f + kOffset);
}

// sum_j (byte j of w - kOffset) * x[j] over the 4 bytes of w.
template <int kOffset>
__device__ __forceinline__ float dot_bytes4(uint32_t w, float4 x) {
  float s = byte_as_float<kOffset>(w, 0) * x.x;
  s = fmaf(byte_as_float<kOffset>(w, 1), x.y, s);
  s = fmaf(byte_as_float<kOffset>(w, 2), x.z, s);
  return fmaf(byte_as_float<kOffset>(w, 3), x.w, s);
}

// The low 2 bytes of w against x.
template <int kOffset>
__device__ __forceinline__ float dot_bytes2(uint32_t w, float2 x) {
  return fmaf(byte_as_float<kOffset>(w, 1), x.y, byte_as_float<kOffset>(w, 0) * x.x);
}

__device__ __forceinline__ float sum4(float4 v) { return (v.x + v.y) + (v.z + v.w); }

__device__ __forceinline__ float2 load_float2(const float* p) {
  return *reinterpret_cast<const float2*>(p);
}

// Bit i of the low 4 bits of b moved to bit 4 of byte i: Q5_0's fifth bit, in place.
__device__ __forceinline__ uint32_t spread_bits_to_bit4(uint32_t b) {
  return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

// ---------------------------------------------------------------------------------------------
// Formats (layouts in quant_internal.h). dot_part(block, part, x) is the dot product of the part's
// 8 weights with x, where x points at the block's first element. kAlign: the alignment in bytes the
// loads need of the row start and stride.

// part p: qs bytes 4p..4p+3 = elements 4p..4p+3 (low nibbles) and 16+4p..19+4p (high nibbles).
struct FormatQ4_0 {
  static constexpr int kElems = 32, kBytes = 18, kParts = 4, kAlign = 2;
  __device__ static float dot_part(const uint8_t* b, int part, const float* x) {
    const uint32_t qs = load_u32_align2(b + 2 + 4 * part);
    const float4 x_lo = load_float4(x + 4 * part), x_hi = load_float4(x + 16 + 4 * part);
    return load_half(b) *
           (dot_bytes4<8>(qs & 0x0f0f0f0fu, x_lo) + dot_bytes4<8>((qs >> 4) & 0x0f0f0f0fu, x_hi));
  }
};

struct FormatQ4_1 {
  static constexpr int kElems = 32, kBytes = 20, kParts = 4, kAlign = 4;
  __device__ static float dot_part(const uint8_t* b, int part, const float* x) {
    const uint32_t qs = load_u32(b + 4 + 4 * part);
    const float4 x_lo = load_float4(x + 4 * part), x_hi = load_float4(x + 16 + 4 * part);
    const float q_dot =
        dot_bytes4<0>(qs & 0x0f0f0f0fu, x_lo) + dot_bytes4<0>((qs >> 4) & 0x0f0f0f0fu, x_hi);
    return fmaf(load_half(b), q_dot, load_half(b + 2) * (sum4(x_lo) + sum4(x_hi)));
  }
};

struct FormatQ5_0 {
  static constexpr int kElems = 32, kBytes = 22, kParts = 4, kAlign = 2;
  __device__ static float dot_part(const uint8_t* b, int part, const float* x) {
    const uint32_t qh = load_u32_align2(b + 2);
    const uint32_t qs = load_u32_align2(b + 6 + 4 * part);
    const uint32_t lo = (qs & 0x0f0f0f0fu) | spread_bits_to_bit4((qh >> (4 * part)) & 15u);
    const uint32_t hi =
        ((qs >> 4) & 0x0f0f0f0fu) | spread_bits_to_bit4((qh >> (16 + 4 * part)) & 15u);
    const float4 x_lo = load_float4(x + 4 * part), x_hi = load_float4(x + 16 + 4 * part);
    return load_half(b) * (dot_bytes4<16>(lo, x_lo) + dot_bytes4<16>(hi, x_hi));
  }
};

// part p: elements 8p..8p+7. Signed bytes are biased by 128 (xor 0x80) to use byte_as_float.
struct FormatQ8_0 {
  static constexpr int kElems = 32, kBytes = 34, kParts = 4, kAlign = 2;
  __device__ static float dot_part(const uint8_t* b, int part, const float* x) {
    const uint32_t q0 = load_u32_align2(b + 2 + 8 * part) ^ 0x80808080u;
    const uint32_t q1 = load_u32_align2(b + 6 + 8 * part) ^ 0x80808080u;
    const float4 x0 = load_float4(x + 8 * part), x1 = load_float4(x + 8 * part + 4);
    return load_half(b) * (dot_bytes4<128>(q0, x0) + dot_bytes4<128>(q1, x1));
  }
};

// Sub-block j's 6-bit scale and min from the 12 packed bytes (quant_internal.h q4k_scales_mins).
__device__ __forceinline__ void q4k_scale_min(const uint8_t* packed, int j, float* scale,
                                              float* min) {
  if (j < 4) {
    *scale = static_cast<float>(packed[j] & 63);
    *min = static_cast<float>(packed[j + 4] & 63);
  } else {
    *scale = static_cast<float>((packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4));
    *min = static_cast<float>((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4));
  }
}

// part p (32 per super-block): chunk c = p / 8 of 64 elements, l0 = 4 * (p % 8); qs bytes
// 32c+l0..+3 hold elements 64c+l0..+3 (low nibbles, sub-block 2c) and 64c+32+l0..+3 (high, 2c+1).
struct FormatQ4_K {
  static constexpr int kElems = 256, kBytes = 144, kParts = 32, kAlign = 4;
  __device__ static float dot_part(const uint8_t* b, int part, const float* x) {
    const int chunk = part / 8, l0 = 4 * (part % 8);
    float sc_lo, m_lo, sc_hi, m_hi;
    q4k_scale_min(b + 4, 2 * chunk, &sc_lo, &m_lo);
    q4k_scale_min(b + 4, 2 * chunk + 1, &sc_hi, &m_hi);
    const uint32_t qs = load_u32(b + 16 + 32 * chunk + l0);
    const float4 x_lo = load_float4(x + 64 * chunk + l0),
                 x_hi = load_float4(x + 64 * chunk + 32 + l0);
    const float q_dot = sc_lo * dot_bytes4<0>(qs & 0x0f0f0f0fu, x_lo) +
                        sc_hi * dot_bytes4<0>((qs >> 4) & 0x0f0f0f0fu, x_hi);
    const float m_dot = m_lo * sum4(x_lo) + m_hi * sum4(x_hi);
    return fmaf(load_half(b), q_dot, -load_half(b + 2) * m_dot);
  }
};

// part p (32 per super-block): half h = p / 16, l0 = 2 * (p % 16); positions l0 and l0+1 of the
// half give elements 128h + l + {0, 32, 64, 96}, each with its own 16-element sub-block scale.
struct FormatQ6_K {
  static constexpr int kElems = 256, kBytes = 210, kParts = 32, kAlign = 2;
  __device__ static float dot_part(const uint8_t* b, int part, const float* x) {
    const int half = part / 16, l0 = 2 * (part % 16);
    const uint32_t ql_a = load_u16(b + 64 * half + l0);
    const uint32_t ql_b = load_u16(b + 64 * half + 32 + l0);
    const uint32_t qh = load_u16(b + 128 + 32 * half + l0);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * half + l0 / 16);
    // 6-bit values, two per word (low bytes), for elements +0, +32, +64, +96.
    const uint32_t q0 = (ql_a & 0x0f0fu) | ((qh & 0x0303u) << 4);
    const uint32_t q1 = (ql_b & 0x0f0fu) | ((qh & 0x0c0cu) << 2);
    const uint32_t q2 = ((ql_a >> 4) & 0x0f0fu) | (qh & 0x3030u);
    const uint32_t q3 = ((ql_b >> 4) & 0x0f0fu) | ((qh & 0xc0c0u) >> 2);
    const float* xs = x + 128 * half + l0;
    float s = sc[0] * dot_bytes2<32>(q0, load_float2(xs));
    s = fmaf(sc[2], dot_bytes2<32>(q1, load_float2(xs + 32)), s);
    s = fmaf(sc[4], dot_bytes2<32>(q2, load_float2(xs + 64)), s);
    s = fmaf(sc[6], dot_bytes2<32>(q3, load_float2(xs + 96)), s);
    return load_half(b + 208) * s;
  }
};

// Float weights in parts of 16 bytes (8 bf16/fp16, or 8 fp32 in two loads); one part per "block".
template <typename T>
struct FormatFloat {
  static constexpr int kElems = 8, kBytes = 8 * sizeof(T), kParts = 1, kAlign = 16;
  __device__ static float dot_part(const uint8_t* b, int, const float* x) {
    float w[8];
    load8_as_float(reinterpret_cast<const T*>(b), w);
    const float4 x0 = load_float4(x), x1 = load_float4(x + 4);
    float s = w[0] * x0.x;
    s = fmaf(w[1], x0.y, s), s = fmaf(w[2], x0.z, s), s = fmaf(w[3], x0.w, s);
    s = fmaf(w[4], x1.x, s), s = fmaf(w[5], x1.y, s), s = fmaf(w[6], x1.z, s);
    return fmaf(w[7], x1.w, s);
  }
};

static_assert(FormatQ4_0::kBytes == quant_detail::kBytesQ4_0, "Q4_0 layout");
static_assert(FormatQ4_1::kBytes == quant_detail::kBytesQ4_1, "Q4_1 layout");
static_assert(FormatQ5_0::kBytes == quant_detail::kBytesQ5_0, "Q5_0 layout");
static_assert(FormatQ8_0::kBytes == quant_detail::kBytesQ8_0, "Q8_0 layout");
static_assert(FormatQ4_K::kBytes == quant_detail::kBytesQ4_K, "Q4_K layout");
static_assert(FormatQ6_K::kBytes == quant_detail::kBytesQ6_K, "Q6_K layout");

// Float weights of any length or alignment, one element per "block" (scalar loads).
template <typename T>
struct FormatFloatScalar {
  static constexpr int kElems = 1, kBytes = sizeof(T), kParts = 1, kAlign = sizeof(T);
  __device__ static float dot_part(const uint8_t* b, int, const float* x) {
    return to_float(*reinterpret_cast<const T*>(b)) * x[0];
  }
};

}  // namespace cuda_detail
}  // namespace lme
