// Row-level fp32 kernels shared by the model: dot products, RMSNorm, RoPE, SiLU, exp.
// Written so the compiler vectorises them (fixed lane counts, no reductions across lanes in the
// hot loop); the plain numpy references live in tests/.
#pragma once

#include <cstdint>

namespace lme {

float dot_f32(const float* a, const float* b, int64_t n);
// y = x / rms(x) * w, rms over n elements with eps inside the square root (fp32).
void rmsnorm_row(const float* x, const float* w, float* y, int64_t n, float eps);
// gate = silu(gate) * up
void silu_mul_row(float* gate, const float* up, int64_t n);
// gate = gelu_tanh(gate) * up, the tanh approximation of GELU (Gemma's gelu_pytorch_tanh):
// 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
void gelu_tanh_mul_row(float* gate, const float* up, int64_t n);
// x = exp(x). Relative error <= 2e-7 + |x| * 2^-24 (the fp32 rounding of x*log2e); inputs
// below -87.3 flush to 0, above 88.3 saturate at ~2.2e38. Softmax callers pass x <= 0.
void exp_inplace(float* x, int64_t n);
// peak = max(x) (NaN if any x is NaN), lse = peak + log(sum(exp(x - peak))) summed in double
// (lse = peak when peak is not finite). n >= 1. No allocation: exp runs over a stack tile.
void log_sum_exp(const float* x, int64_t n, float* peak, double* lse);
// Rotates one head vector in place. interleaved: pairs (2i, 2i+1); else pairs (i, i + dim/2).
void rope_row(float* x, const float* cos, const float* sin, int32_t dim, bool interleaved);

// Converts n KV-cache elements of the given storage to fp32.
void kv_to_f32(int32_t kv_dtype, const void* src, float* dst, int64_t n);
void f32_to_kv(int32_t kv_dtype, const float* src, void* dst, int64_t n);

}  // namespace lme
