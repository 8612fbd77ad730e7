// RMSNorm over rows, fp32: one block per row, warp-shuffle reductions.
//
// Napkin math: reads x and w, writes y: 4 * (2 * rows * n + n) bytes. A decode step with 64 rows of
// n = 8192 moves 4.2 MB, ~0.9 us at 4.8 TB/s, so launch latency dominates at that size; the kernel
// just has to stream. The second pass re-reads the row from L1/L2 (a 32 KB row fits), not DRAM.
#include "kernels.cuh"

namespace lme {
namespace {

using namespace cuda_detail;

constexpr int kRmsnormThreads = 256;

// kVec4: rows, strides and pointers allow float4 access and n % 4 == 0.
// x is not __restrict__: y may alias it (in place). Each thread writes only the elements it read.
template <bool kVec4>
__global__ void __launch_bounds__(kRmsnormThreads)
    rmsnorm_rows_kernel(const float* x, int64_t x_row_stride, const float* __restrict__ w, float* y,
                        int64_t y_row_stride, int64_t n, float eps) {
  __shared__ float scratch[kWarpSize];
  const float* xr = x + blockIdx.x * x_row_stride;
  float* yr = y + blockIdx.x * y_row_stride;

  float sum_sq = 0.f;
  if (kVec4) {
    for (int64_t i = 4 * threadIdx.x; i < n; i += 4 * blockDim.x) {
      const float4 v = load_float4(xr + i);
      sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum_sq += xr[i] * xr[i];
  }
  sum_sq = block_sum(sum_sq, scratch);
  // Same expression as ops.cpp rmsnorm_row, so CPU and GPU agree up to summation order.
  const float scale = 1.0f / sqrtf(sum_sq / static_cast<float>(n) + eps);

  if (kVec4) {
    for (int64_t i = 4 * threadIdx.x; i < n; i += 4 * blockDim.x) {
      const float4 v = load_float4(xr + i), g = load_float4(w + i);
      *reinterpret_cast<float4*>(yr + i) =
          make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int cuda_rmsnorm(const float* x, int64_t x_row_stride, const float* w, float* y,
                 int64_t y_row_stride, int64_t rows, int64_t n, float eps, void* stream) {
  LME_CUDA_REQUIRE(rows >= 0 && n > 0, "cuda_rmsnorm: need rows >= 0 and n > 0");
  LME_CUDA_REQUIRE(rows <= 0x7fffffff, "cuda_rmsnorm: too many rows for one grid");
  LME_CUDA_REQUIRE(x_row_stride >= n && y_row_stride >= n, "cuda_rmsnorm: row stride < n");
  if (rows == 0) return kCudaOk;
  LME_CUDA_REQUIRE(x != nullptr && w != nullptr && y != nullptr, "cuda_rmsnorm: null pointer");
  const bool vec4 = n % 4 == 0 && x_row_stride % 4 == 0 && y_row_stride % 4 == 0 && aligned16(x) &&
                    aligned16(w) && aligned16(y);
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec4) {
    rmsnorm_rows_kernel<true><<<grid, kRmsnormThreads, 0, as_stream(stream)>>>(
        x, x_row_stride, w, y, y_row_stride, n, eps);
  } else {
    rmsnorm_rows_kernel<false><<<grid, kRmsnormThreads, 0, as_stream(stream)>>>(
        x, x_row_stride, w, y, y_row_stride, n, eps);
  }
  LME_CUDA_CHECK_LAUNCH();
  return kCudaOk;
}

}  // namespace lme
