#include "lmengine/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lmengine/kv_cache.h"
#include "lmengine/quant.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace lme {

namespace {
constexpr int kLanes = 16;
}

float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rmsnorm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float ss = dot_f32(x, x, n);
  const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

void exp_inplace(float* x, int64_t n) {
  // exp(v) = 2^k * 2^f with k = round(v*log2e), f in [-0.5, 0.5]; 2^f by a degree-6 polynomial.
  // Branch-free so it vectorises; inputs below -87.3 flush to 0 (the callers pass v <= 0).
  for (int64_t i = 0; i < n; ++i) {
    const float in = x[i];
    const float v = std::min(std::max(in, -87.3f), 88.3f);
    const float t = v * 1.44269504088896341f;
    const float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest
    const float f = t - k;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, 4);
    bits += static_cast<int32_t>(k) * (1 << 23);
    float r;
    std::memcpy(&r, &bits, 4);
    x[i] = in >= -87.3f ? r : 0.f;
  }
}

void log_sum_exp(const float* x, int64_t n, float* peak, double* lse) {
  float lane_max[8];
  for (int l = 0; l < 8; ++l) lane_max[l] = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const float v = x[i + l];
      nan |= v != v;
      lane_max[l] = v > lane_max[l] ? v : lane_max[l];
    }
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) {
    nan |= x[i] != x[i];
    mx = x[i] > mx ? x[i] : mx;
  }
  for (int l = 0; l < 8; ++l) mx = lane_max[l] > mx ? lane_max[l] : mx;
  if (nan) mx = std::numeric_limits<float>::quiet_NaN();
  *peak = mx;
  if (!std::isfinite(mx)) {
    *lse = mx;
    return;
  }
  constexpr int64_t kTile = 512;
  float e[kTile];
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t m = n - i0 < kTile ? n - i0 : kTile;
    for (int64_t j = 0; j < m; ++j) e[j] = x[i0 + j] - mx;
    exp_inplace(e, m);
    float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // 8 short fp32 chains
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += e[j + l];
    }
    for (; j < m; ++j) total += e[j];
    for (int l = 0; l < 8; ++l) total += lanes[l];
  }
  *lse = static_cast<double>(mx) + std::log(total);
}

void silu_mul_row(float* gate, const float* up, int64_t n) {
  constexpr int64_t kTile = 256;
  float e[kTile];
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t m = n - i0 < kTile ? n - i0 : kTile;
    for (int64_t i = 0; i < m; ++i) e[i] = -gate[i0 + i];
    exp_inplace(e, m);
    for (int64_t i = 0; i < m; ++i) gate[i0 + i] = gate[i0 + i] / (1.0f + e[i]) * up[i0 + i];
  }
}

void gelu_tanh_mul_row(float* gate, const float* up, int64_t n) {
  constexpr int64_t kTile = 256;
  constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;  // 2 * sqrt(2 / pi)
  float e[kTile];
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t m = n - i0 < kTile ? n - i0 : kTile;
    for (int64_t i = 0; i < m; ++i) {
      const float x = gate[i0 + i];
      e[i] = -kTwoSqrt2OverPi * (x + 0.044715f * x * x * x);
    }
    exp_inplace(e, m);
    for (int64_t i = 0; i < m; ++i) gate[i0 + i] = gate[i0 + i] / (1.0f + e[i]) * up[i0 + i];
  }
}

void rope_row(float* x, const float* cos, const float* sin, int32_t dim, bool interleaved) {
  const int32_t half = dim / 2;
  if (interleaved) {
    for (int32_t i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * cos[i] - b * sin[i];
      x[2 * i + 1] = a * sin[i] + b * cos[i];
    }
  } else {
    for (int32_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

void kv_to_f32(int32_t kv_dtype, const void* src, float* dst, int64_t n) {
  switch (static_cast<KVDType>(kv_dtype)) {
    case KVDType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case KVDType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#if defined(__F16C__)
      // fp16 -> fp32 is exact either way; the hardware conversion is ~8x faster than the scalar
      // one, which matters when long-context attention converts every page it reads.
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      }
#endif
      for (; i < n; ++i) dst[i] = fp16_to_fp32(s[i]);
      return;
    }
    case KVDType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      return;
    }
  }
}

void f32_to_kv(int32_t kv_dtype, const float* src, void* dst, int64_t n) {
  switch (static_cast<KVDType>(kv_dtype)) {
    case KVDType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case KVDType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_fp16(src[i]);
      return;
    }
    case KVDType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_bf16(src[i]);
      return;
    }
  }
}

}  // namespace lme
