// Device-side helpers shared by the .cu files: status recording, warp reductions, half-precision
// loads. Only .cu files include this; host callers use kernels.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace lme {
namespace cuda_detail {

// Record a failure for cuda_last_error() and return its status (defined in device.cu).
int record_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
int record_status(int status, const char* message);

}  // namespace cuda_detail
}  // namespace lme

// Evaluates a CUDA runtime call and returns kCudaRuntimeError from the enclosing function on
// failure. Never aborts: the binding turns the status into a Python exception.
#define LME_CUDA_TRY(expr)                                                                    \
  do {                                                                                        \
    const cudaError_t lme_cuda_err_ = (expr);                                                 \
    if (lme_cuda_err_ != cudaSuccess) {                                                       \
      return ::lme::cuda_detail::record_cuda_error(lme_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                         \
  } while (0)

// Returns kCudaInvalidArgument with a message when cond does not hold.
#define LME_CUDA_REQUIRE(cond, message)                                                          \
  do {                                                                                           \
    if (!(cond)) return ::lme::cuda_detail::record_status(::lme::kCudaInvalidArgument, message); \
  } while (0)

// Checks the launch that just happened (bad configuration, missing kernel image).
#define LME_CUDA_CHECK_LAUNCH() LME_CUDA_TRY(cudaGetLastError())

namespace lme {
namespace cuda_detail {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Sum over groups of `width` consecutive lanes (width a power of two <= 32); every lane of the
// group gets the total. Every lane in `mask` must call it, and mask must hold whole groups.
template <int width = kWarpSize>
__device__ __forceinline__ float warp_sum(float v, unsigned mask = 0xffffffffu) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  return v;
}

// The lanes of the calling thread's warp that exist: all 32 unless the block's thread count is
// not a multiple of 32 and this is its last warp.
__device__ __forceinline__ unsigned existing_lanes_mask() {
  const unsigned n_threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned in_warp = min(32u, n_threads - (linear & ~31u));
  return in_warp == 32u ? 0xffffffffu : (1u << in_warp) - 1u;
}

// Sum over the whole block; every thread gets the total. blockDim.x a multiple of 32, all threads
// call it; `scratch` holds 32 floats of shared memory, reusable after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ uint16_t load_u16(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}

__device__ __forceinline__ float load_half(const uint8_t* p) {
  return half_bits_to_float(load_u16(p));
}

// A 32-bit little-endian word at an address that is only 2-byte aligned.
__device__ __forceinline__ uint32_t load_u32_align2(const uint8_t* p) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
}

__device__ __forceinline__ uint32_t load_u32(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ float4 load_float4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// The 16 bytes at p (16-byte aligned) as 8 floats, for fp32 (two loads), fp16 and bf16 storage.
template <typename T>
__device__ __forceinline__ void load8_as_float(const T* p, float out[8]);

template <>
__device__ __forceinline__ void load8_as_float<float>(const float* p, float out[8]) {
  const float4 a = load_float4(p), b = load_float4(p + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

template <>
__device__ __forceinline__ void load8_as_float<__half>(const __half* p, float out[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = half_bits_to_float(static_cast<uint16_t>(words[i]));
    out[2 * i + 1] = half_bits_to_float(static_cast<uint16_t>(words[i] >> 16));
  }
}

template <>
__device__ __forceinline__ void load8_as_float<__nv_bfloat16>(const __nv_bfloat16* p,
                                                              float out[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// One element of fp32/fp16/bf16 storage as a float (scalar paths).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda_detail
}  // namespace lme
