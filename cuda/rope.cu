// Rotary position embedding in place, fp32, both pair layouts.
//
// Grid: x = token, y = group of heads; block: (pairs of a head, heads). Each thread computes the
// angle of its pair once and rotates it in one head.
//
// Napkin math: reads and writes every rotated element once: 8 * n_tokens * n_heads * head_dim
// bytes; 64 tokens of 32 heads x 128 is 2 MB, well under a microsecond of bandwidth, so the
// kernel's cost is launch latency plus one sincosf per pair and head.
#include <algorithm>

#include "kernels.cuh"

namespace lme {
namespace {

using namespace cuda_detail;

constexpr int kRopeThreads = 256;

__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(float* x, int64_t token_stride, int32_t n_heads, int32_t head_dim,
                const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                bool interleaved) {
  const int32_t half = head_dim / 2;
  const int32_t head = blockIdx.y * blockDim.y + threadIdx.y;
  if (head >= n_heads) return;
  float* xh = x + blockIdx.x * token_stride + static_cast<int64_t>(head) * head_dim;
  // The angle is rounded to fp32 before sincosf, exactly as model.cpp builds its cos/sin tables.
  const float pos = static_cast<float>(positions[blockIdx.x]);
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);
    const int32_t i0 = interleaved ? 2 * i : i;
    const int32_t i1 = interleaved ? 2 * i + 1 : i + half;
    const float a = xh[i0], b = xh[i1];
    xh[i0] = a * c - b * s;
    xh[i1] = a * s + b * c;
  }
}

}  // namespace

int cuda_rope(float* x, int64_t token_stride, int64_t n_tokens, int32_t n_heads, int32_t head_dim,
              const int32_t* positions, const float* inv_freq, bool interleaved, void* stream) {
  LME_CUDA_REQUIRE(n_tokens >= 0 && n_heads >= 0, "cuda_rope: negative shape");
  LME_CUDA_REQUIRE(head_dim > 0 && head_dim % 2 == 0,
                   "cuda_rope: head_dim must be positive and even");
  LME_CUDA_REQUIRE(token_stride >= static_cast<int64_t>(n_heads) * head_dim,
                   "cuda_rope: token_stride < n_heads * head_dim");
  LME_CUDA_REQUIRE(n_tokens <= 0x7fffffff, "cuda_rope: too many tokens for one grid");
  if (n_tokens == 0 || n_heads == 0) return kCudaOk;
  LME_CUDA_REQUIRE(x != nullptr && positions != nullptr && inv_freq != nullptr,
                   "cuda_rope: null pointer");
  // Pairs across x (rounded up to whole warps, at most the block), heads across y.
  const int half = head_dim / 2;
  const int threads_x =
      static_cast<int>(std::min<int64_t>(ceil_div(half, kWarpSize) * kWarpSize, kRopeThreads));
  const int threads_y = kRopeThreads / threads_x;
  const dim3 block(threads_x, threads_y);
  const dim3 grid(static_cast<unsigned>(n_tokens),
                  static_cast<unsigned>(ceil_div(n_heads, threads_y)));
  LME_CUDA_REQUIRE(grid.y <= 65535, "cuda_rope: too many heads");
  rope_kernel<<<grid, block, 0, as_stream(stream)>>>(x, token_stride, n_heads, head_dim, positions,
                                                     inv_freq, interleaved);
  LME_CUDA_CHECK_LAUNCH();
  return kCudaOk;
}

}  // namespace lme
