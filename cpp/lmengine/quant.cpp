// Weight formats: type table, exact dequantization, activation conversion, and the scalar
// reference products that the SIMD kernels (quant_x86.cpp) must reproduce.
#include "lmengine/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "lmengine/quant_internal.h"

// gguf/ggml dequantize Q4_1 and the K-quants as (d*q) + m with two roundings; keep the compiler
// from fusing them into one FMA so dequantize_row matches them bit for bit.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lme {

using namespace quant_detail;

namespace {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float load_half(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }

}  // namespace

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000 | (mantissa << 13));
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
  return bits_float(sign | float_bits(static_cast<float>(mantissa) * 0x1p-24f));
}

uint16_t fp32_to_fp16(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffff;
  if (ax > 0x7f800000) return sign | 0x7e00 | ((ax >> 13) & 0x3ff);  // NaN stays a quiet NaN
  const int exponent = static_cast<int>(ax >> 23) - 127;
  if (exponent > 15) return sign | 0x7c00;
  // Truncate to the half's mantissa, then round to nearest even; a carry may bump the exponent
  // (up to infinity), which the bit layout makes correct.
  uint32_t h, rem;
  int shift;
  if (exponent >= -14) {
    shift = 13;
    h = (uint32_t(exponent + 15) << 10) | ((ax & 0x7fffff) >> 13);
    rem = ax & 0x1fff;
  } else {
    shift = -1 - exponent;  // the implicit bit lands in the subnormal mantissa
    if (shift > 24) return sign;
    const uint32_t m = (ax & 0x7fffff) | 0x800000;
    h = m >> shift;
    rem = m & ((1u << shift) - 1);
  }
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float bf16_to_fp32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

uint16_t fp32_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 64);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

bool dtype_is_supported(int32_t ggml_type) {
  switch (static_cast<DType>(ggml_type)) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q8_0:
    case DType::Q4_K:
    case DType::Q6_K:
      return true;
  }
  return false;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::Q4_0:
      return "Q4_0";
    case DType::Q4_1:
      return "Q4_1";
    case DType::Q5_0:
      return "Q5_0";
    case DType::Q8_0:
      return "Q8_0";
    case DType::Q4_K:
      return "Q4_K";
    case DType::Q6_K:
      return "Q6_K";
  }
  return "unsupported";
}

int64_t dtype_block_size(DType t) {
  switch (t) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
      return 1;
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q8_0:
      return kQ32;
    case DType::Q4_K:
    case DType::Q6_K:
      return kQK;
  }
  return 0;
}

int64_t dtype_block_bytes(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::Q4_0:
      return kBytesQ4_0;
    case DType::Q4_1:
      return kBytesQ4_1;
    case DType::Q5_0:
      return kBytesQ5_0;
    case DType::Q8_0:
      return kBytesQ8_0;
    case DType::Q4_K:
      return kBytesQ4_K;
    case DType::Q6_K:
      return kBytesQ6_K;
  }
  return 0;
}

int64_t dtype_row_bytes(DType t, int64_t n) {
  const int64_t bs = dtype_block_size(t);
  return bs == 0 ? 0 : n / bs * dtype_block_bytes(t);
}

// ---------------------------------------------------------------------------------------------
// Dequantization, in the same arithmetic order as gguf.quants / ggml's reference C.

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  switch (t) {
    case DType::F32:
      std::memcpy(dst, p, n * sizeof(float));
      return;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(load_u16(p + 2 * i));
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(load_u16(p + 2 * i));
      return;
    case DType::Q4_0:
      for (int64_t b = 0; b < n / kQ32; ++b, p += kBytesQ4_0, dst += kQ32) {
        const float d = load_half(p);
        for (int j = 0; j < 16; ++j) {
          dst[j] = d * static_cast<float>((p[2 + j] & 15) - 8);
          dst[j + 16] = d * static_cast<float>((p[2 + j] >> 4) - 8);
        }
      }
      return;
    case DType::Q4_1:
      for (int64_t b = 0; b < n / kQ32; ++b, p += kBytesQ4_1, dst += kQ32) {
        const float d = load_half(p), m = load_half(p + 2);
        for (int j = 0; j < 16; ++j) {
          dst[j] = d * static_cast<float>(p[4 + j] & 15) + m;
          dst[j + 16] = d * static_cast<float>(p[4 + j] >> 4) + m;
        }
      }
      return;
    case DType::Q5_0:
      for (int64_t b = 0; b < n / kQ32; ++b, p += kBytesQ5_0, dst += kQ32) {
        const float d = load_half(p);
        uint32_t qh;
        std::memcpy(&qh, p + 2, 4);
        for (int j = 0; j < 16; ++j) {
          const int lo = (p[6 + j] & 15) | (((qh >> j) & 1) << 4);
          const int hi = (p[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          dst[j] = d * static_cast<float>(lo - 16);
          dst[j + 16] = d * static_cast<float>(hi - 16);
        }
      }
      return;
    case DType::Q8_0:
      for (int64_t b = 0; b < n / kQ32; ++b, p += kBytesQ8_0, dst += kQ32) {
        const float d = load_half(p);
        for (int j = 0; j < 32; ++j) dst[j] = static_cast<float>(static_cast<int8_t>(p[2 + j])) * d;
      }
      return;
    case DType::Q4_K:
      for (int64_t b = 0; b < n / kQK; ++b, p += kBytesQ4_K) {
        const float d = load_half(p), dmin = load_half(p + 2);
        uint8_t sc[8], m[8];
        q4k_scales_mins(p + 4, sc, m);
        const uint8_t* qs = p + 16;
        for (int c = 0; c < 4; ++c, qs += 32, dst += 64) {
          const float d_lo = d * sc[2 * c], m_lo = dmin * m[2 * c];
          const float d_hi = d * sc[2 * c + 1], m_hi = dmin * m[2 * c + 1];
          for (int l = 0; l < 32; ++l) {
            dst[l] = d_lo * static_cast<float>(qs[l] & 15) - m_lo;
            dst[l + 32] = d_hi * static_cast<float>(qs[l] >> 4) - m_hi;
          }
        }
      }
      return;
    case DType::Q6_K:
      for (int64_t b = 0; b < n / kQK; ++b, p += kBytesQ6_K) {
        const float d = load_half(p + 208);
        const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
        for (int half = 0; half < 2; ++half, dst += 128) {
          const uint8_t* ql = p + 64 * half;
          const uint8_t* qh = p + 128 + 32 * half;
          const int8_t* sc = scales + 8 * half;
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q0 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q1 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            dst[l] = (d * sc[is + 0]) * static_cast<float>(q0);
            dst[l + 32] = (d * sc[is + 2]) * static_cast<float>(q1);
            dst[l + 64] = (d * sc[is + 4]) * static_cast<float>(q2);
            dst[l + 96] = (d * sc[is + 6]) * static_cast<float>(q3);
          }
        }
      }
      return;
  }
}

// ---------------------------------------------------------------------------------------------
// Activation conversion (layouts in quant_internal.h).

namespace {

enum class ActFormat { F32, Q8_32, Q8_256 };

ActFormat activation_format(DType t) {
  switch (t) {
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q8_0:
      return ActFormat::Q8_32;
    case DType::Q4_K:
    case DType::Q6_K:
      return ActFormat::Q8_256;
    default:
      return ActFormat::F32;
  }
}

// Symmetric 8-bit quantization of n values: returns the scale d, writes q in [-127, 127].
float quantize_block_q8(const float* x, int64_t n, int8_t* q) {
  // Max |x| in 8 independent lanes (a single running max is a serial chain GCC won't vectorise).
  // n is a block size (32 or 256), a multiple of 8.
  float lane_max[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    for (int l = 0; l < 8; ++l) {
      const float a = std::fabs(x[i0 + l]);
      lane_max[l] = a > lane_max[l] ? a : lane_max[l];
    }
  }
  float amax = 0.f;
  for (int l = 0; l < 8; ++l) amax = std::max(amax, lane_max[l]);
  const float d = amax / 127.f;
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    // Round to nearest even by the 1.5 * 2^23 trick (= nearbyint for |v| < 2^22) and clamp with
    // plain compares, so the loop vectorises; `!(v > -127)` also maps a NaN to a finite value.
    float v = (x[i] * id + 12582912.0f) - 12582912.0f;
    v = v > 127.f ? 127.f : v;
    v = !(v > -127.f) ? -127.f : v;
    q[i] = static_cast<int8_t>(static_cast<int32_t>(v));
  }
  return d;
}

}  // namespace

int64_t activation_row_bytes(DType weight_type, int64_t k) {
  switch (activation_format(weight_type)) {
    case ActFormat::Q8_32:
      return k + 2 * sizeof(float) * (k / kQ32);
    case ActFormat::Q8_256:
      return k + sizeof(float) * (k / kQK) + sizeof(int16_t) * (k / kBsum);
    case ActFormat::F32:
      break;
  }
  return k * static_cast<int64_t>(sizeof(float));
}

void quantize_activation_row(DType weight_type, const float* x, void* dst, int64_t k) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  int8_t* q = reinterpret_cast<int8_t*>(out);
  switch (activation_format(weight_type)) {
    case ActFormat::F32:
      std::memcpy(out, x, k * sizeof(float));
      return;
    case ActFormat::Q8_32: {
      const int64_t nb = k / kQ32;
      for (int64_t b = 0; b < nb; ++b) {
        const float d = quantize_block_q8(x + b * kQ32, kQ32, q + b * kQ32);
        int sum = 0;
        for (int64_t i = 0; i < kQ32; ++i) sum += q[b * kQ32 + i];
        const float s = d * static_cast<float>(sum);
        std::memcpy(out + k + 4 * b, &d, 4);
        std::memcpy(out + k + 4 * (nb + b), &s, 4);
      }
      return;
    }
    case ActFormat::Q8_256: {
      const int64_t nb = k / kQK;
      for (int64_t b = 0; b < nb; ++b) {
        const float d = quantize_block_q8(x + b * kQK, kQK, q + b * kQK);
        std::memcpy(out + k + 4 * b, &d, 4);
      }
      uint8_t* bsums = out + k + 4 * nb;
      for (int64_t j = 0; j < k / kBsum; ++j) {
        int sum = 0;
        for (int64_t i = 0; i < kBsum; ++i) sum += q[j * kBsum + i];
        const int16_t s16 = static_cast<int16_t>(sum);
        std::memcpy(bsums + 2 * j, &s16, 2);
      }
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar reference products: one weight row against one activation row.

namespace {

// Q4_0, Q4_1, Q5_0, Q8_0 against Q8_32: per block, an exact integer dot of the 8-bit values, then
// sum += (dw*dx) * dot + c * s, where c is the weight block's constant term (Q4_1's min, -8*dw,
// -16*dw) and s = dx * sum(qx).
float dot_q32_reference(DType t, const uint8_t* w, const uint8_t* x, int64_t k) {
  const int64_t nb = k / kQ32;
  const int8_t* xq = reinterpret_cast<const int8_t*>(x);
  const float* xd = reinterpret_cast<const float*>(x + k);
  const float* xs = xd + nb;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, xq += kQ32) {
    int qw[32];
    float dw, c;
    w += unpack_q32_block(t, w, qw, dw, c);
    int dot = 0;
    for (int j = 0; j < 32; ++j) dot += qw[j] * xq[j];
    sum += dw * xd[b] * static_cast<float>(dot) + c * xs[b];
  }
  return sum;
}

// Q4_K and Q6_K against Q8_256: integer sums per super-block with the integer sub-block scales,
// then one float multiply-add per super-block.
float dot_qk_reference(DType t, const uint8_t* w, const uint8_t* x, int64_t k) {
  const int64_t nb = k / kQK;
  const int8_t* xq = reinterpret_cast<const int8_t*>(x);
  const float* xd = reinterpret_cast<const float*>(x + k);
  const uint8_t* bsum_bytes = x + k + 4 * nb;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, xq += kQK) {
    int16_t bsum[16];
    std::memcpy(bsum, bsum_bytes + 32 * b, sizeof(bsum));
    if (t == DType::Q4_K) {
      const float d = load_half(w), dmin = load_half(w + 2);
      uint8_t sc[8], m[8];
      q4k_scales_mins(w + 4, sc, m);
      const uint8_t* qs = w + 16;
      int isum = 0, imin = 0;
      for (int c = 0; c < 4; ++c) {
        int dot_lo = 0, dot_hi = 0;
        for (int l = 0; l < 32; ++l) {
          dot_lo += (qs[32 * c + l] & 15) * xq[64 * c + l];
          dot_hi += (qs[32 * c + l] >> 4) * xq[64 * c + 32 + l];
        }
        isum += sc[2 * c] * dot_lo + sc[2 * c + 1] * dot_hi;
      }
      for (int j = 0; j < 8; ++j) imin += m[j] * (bsum[2 * j] + bsum[2 * j + 1]);
      sum += d * xd[b] * static_cast<float>(isum) - dmin * xd[b] * static_cast<float>(imin);
      w += kBytesQ4_K;
    } else {  // Q6_K
      const float d = load_half(w + 208);
      const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
      int isum = 0;
      for (int half = 0; half < 2; ++half) {
        const uint8_t* ql = w + 64 * half;
        const uint8_t* qh = w + 128 + 32 * half;
        const int8_t* xh = xq + 128 * half;
        int dot[8] = {};  // per 16-element sub-block of this half
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          dot[is + 0] += ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) * xh[l];
          dot[is + 2] += ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) * xh[l + 32];
          dot[is + 4] += ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) * xh[l + 64];
          dot[is + 6] += ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) * xh[l + 96];
        }
        for (int i = 0; i < 8; ++i)
          isum += scales[8 * half + i] * (dot[i] - 32 * bsum[8 * half + i]);
      }
      sum += d * xd[b] * static_cast<float>(isum);
      w += kBytesQ6_K;
    }
  }
  return sum;
}

float dot_float_reference(DType t, const uint8_t* w, const float* x, int64_t k) {
  float sum = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    float wi;
    if (t == DType::F32) {
      std::memcpy(&wi, w + 4 * i, 4);
    } else if (t == DType::F16) {
      wi = fp16_to_fp32(load_u16(w + 2 * i));
    } else {
      wi = bf16_to_fp32(load_u16(w + 2 * i));
    }
    sum += wi * x[i];
  }
  return sum;
}

}  // namespace

void matmul_rows_reference(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                           const void* X, int64_t x_stride, int64_t n_tokens, float* Y,
                           int64_t ldy) {
  const uint8_t* w = static_cast<const uint8_t*>(W);
  const uint8_t* x = static_cast<const uint8_t*>(X);
  const ActFormat format = activation_format(wt);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t r = 0; r < n_rows; ++r) {
      const uint8_t* wr = w + r * w_stride;
      const uint8_t* xt = x + t * x_stride;
      float y;
      switch (format) {
        case ActFormat::Q8_32:
          y = dot_q32_reference(wt, wr, xt, k);
          break;
        case ActFormat::Q8_256:
          y = dot_qk_reference(wt, wr, xt, k);
          break;
        default:
          y = dot_float_reference(wt, wr, reinterpret_cast<const float*>(xt), k);
          break;
      }
      Y[t * ldy + r] = y;
    }
  }
}

void matmul_rows(DType wt, int64_t k, const void* W, int64_t w_stride, int64_t n_rows,
                 const void* X, int64_t x_stride, int64_t n_tokens, float* Y, int64_t ldy) {
  if (n_rows <= 0 || n_tokens <= 0) return;
  if (quant_detail::matmul_rows_simd(wt, k, static_cast<const uint8_t*>(W), w_stride, n_rows,
                                     static_cast<const uint8_t*>(X), x_stride, n_tokens, Y, ldy)) {
    return;
  }
  matmul_rows_reference(wt, k, W, w_stride, n_rows, X, x_stride, n_tokens, Y, ldy);
}

}  // namespace lme
