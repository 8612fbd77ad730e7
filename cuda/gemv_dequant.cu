// Dequantizing GEMV y = W x for the GGML weight formats of quant.h, fp32 activations and
// accumulation, one warp per output row.
//
// Each format splits its block into kParts parts of 8 elements; lane l of the warp takes parts
// l, l + 32, ... of the row, so consecutive lanes read consecutive bytes of W and a warp step
// covers 32 parts (8 blocks of 32, or one 256-element K-quant super-block). The formats' readers
// live in dequant_formats.cuh.
//
// Napkin math (W larger than L2): W is read once per token, x per row from L1/L2, so DRAM sees
//   n_tokens * (rows * row_bytes + 4 * k) + 4 * n_tokens * rows bytes.
// A 14336 x 4096 Q4_K matrix is 33 MB: ~7 us at 4.8 TB/s. At that rate each of the H200's 132
// SMs must retire ~18 bytes of W per clock, i.e. a Q4 block of 32 elements every clock, which is
// why the per-element work is one permute, one add and one FMA.
#include <algorithm>

#include "dequant_formats.cuh"
#include "kernels.cuh"
#include "lmengine/quant.h"

namespace lme {
namespace {

using namespace cuda_detail;

constexpr int kGemvWarps = 4;  // rows per block
constexpr int kGemvThreads = kGemvWarps * kWarpSize;

// ---------------------------------------------------------------------------------------------

// grid (row groups of kGemvWarps, tokens); warp w of block b computes row b * kGemvWarps + w.
template <class Format>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const uint8_t* __restrict__ w, int64_t w_row_stride, int64_t rows, int64_t n_blocks,
                const float* __restrict__ x, int64_t k, float* __restrict__ y) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps only: the reduction below stays warp-uniform
  const uint8_t* w_row = w + row * w_row_stride;
  const float* x_row = x + blockIdx.y * k;
  const int64_t n_parts = n_blocks * Format::kParts;
  float acc = 0.f;
#pragma unroll 4
  for (int64_t i = lane; i < n_parts; i += kWarpSize) {
    const int64_t block = i / Format::kParts;
    const int part = static_cast<int>(i % Format::kParts);
    acc += Format::dot_part(w_row + block * Format::kBytes, part, x_row + block * Format::kElems);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[blockIdx.y * rows + row] = acc;
}

// Float weights of any length or alignment: one element per lane step.
template <typename T>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_float_scalar_kernel(const uint8_t* __restrict__ w, int64_t w_row_stride, int64_t rows,
                             const float* __restrict__ x, int64_t k, float* __restrict__ y) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const T* w_row = reinterpret_cast<const T*>(w + row * w_row_stride);
  const float* x_row = x + blockIdx.y * k;
  float acc = 0.f;
  for (int64_t i = lane; i < k; i += kWarpSize) acc = fmaf(to_float(w_row[i]), x_row[i], acc);
  acc = warp_sum(acc);
  if (lane == 0) y[blockIdx.y * rows + row] = acc;
}

bool aligned(const void* p, int64_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

dim3 gemv_grid(int64_t rows, int64_t n_tokens) {
  return dim3(static_cast<unsigned>(ceil_div(rows, kGemvWarps)), static_cast<unsigned>(n_tokens));
}

template <class Format>
int launch_blocks(const void* w, int64_t w_row_stride, int64_t rows, int64_t k, const float* x,
                  int64_t n_tokens, float* y, cudaStream_t stream) {
  LME_CUDA_REQUIRE(k % Format::kElems == 0,
                   "cuda_gemv: k is not a multiple of the format's block size");
  const int64_t n_blocks = k / Format::kElems;
  LME_CUDA_REQUIRE(w_row_stride >= n_blocks * Format::kBytes,
                   "cuda_gemv: w_row_stride < row bytes");
  LME_CUDA_REQUIRE(aligned(w, Format::kAlign) && w_row_stride % Format::kAlign == 0,
                   "cuda_gemv: weight rows are not aligned for this format");
  gemv_kernel<Format><<<gemv_grid(rows, n_tokens), kGemvThreads, 0, stream>>>(
      static_cast<const uint8_t*>(w), w_row_stride, rows, n_blocks, x, k, y);
  LME_CUDA_CHECK_LAUNCH();
  return kCudaOk;
}

template <typename T>
int launch_float(const void* w, int64_t w_row_stride, int64_t rows, int64_t k, const float* x,
                 int64_t n_tokens, float* y, cudaStream_t stream) {
  LME_CUDA_REQUIRE(w_row_stride >= k * int64_t(sizeof(T)) && w_row_stride % sizeof(T) == 0 &&
                       aligned(w, sizeof(T)),
                   "cuda_gemv: float weight rows must be element-aligned and hold k elements");
  if (k % 8 == 0 && aligned(w, 16) && w_row_stride % 16 == 0) {
    return launch_blocks<FormatFloat<T>>(w, w_row_stride, rows, k, x, n_tokens, y, stream);
  }
  gemv_float_scalar_kernel<T><<<gemv_grid(rows, n_tokens), kGemvThreads, 0, stream>>>(
      static_cast<const uint8_t*>(w), w_row_stride, rows, x, k, y);
  LME_CUDA_CHECK_LAUNCH();
  return kCudaOk;
}

}  // namespace

bool cuda_gemv_supports(int32_t ggml_type) {
  switch (static_cast<DType>(ggml_type)) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q8_0:
    case DType::Q4_K:
    case DType::Q6_K: return true;
  }
  return false;
}

int cuda_gemv(int32_t ggml_type, const void* w, int64_t w_row_stride, int64_t rows, int64_t k,
              const float* x, int64_t n_tokens, float* y, void* stream) {
  LME_CUDA_REQUIRE(rows >= 0 && k > 0 && n_tokens >= 0,
                   "cuda_gemv: need rows >= 0, k > 0, n_tokens >= 0");
  LME_CUDA_REQUIRE(n_tokens <= 65535 && ceil_div(rows, kGemvWarps) <= 0x7fffffff,
                   "cuda_gemv: grid too large");
  if (rows == 0 || n_tokens == 0) return kCudaOk;
  LME_CUDA_REQUIRE(w != nullptr && x != nullptr && y != nullptr, "cuda_gemv: null pointer");
  LME_CUDA_REQUIRE(aligned(x, 16), "cuda_gemv: x must be 16-byte aligned");
  const cudaStream_t s = as_stream(stream);
  switch (static_cast<DType>(ggml_type)) {
    case DType::F32: return launch_float<float>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::F16: return launch_float<__half>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::BF16:
      return launch_float<__nv_bfloat16>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::Q4_0: return launch_blocks<FormatQ4_0>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::Q4_1: return launch_blocks<FormatQ4_1>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::Q5_0: return launch_blocks<FormatQ5_0>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::Q8_0: return launch_blocks<FormatQ8_0>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::Q4_K: return launch_blocks<FormatQ4_K>(w, w_row_stride, rows, k, x, n_tokens, y, s);
    case DType::Q6_K: return launch_blocks<FormatQ6_K>(w, w_row_stride, rows, k, x, n_tokens, y, s);
  }
  return record_status(kCudaUnsupported, "cuda_gemv: unsupported weight type");
}

}  // namespace lme
