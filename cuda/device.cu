// Device discovery, error recording, memory and timing helpers behind kernels.h.
#include <cstdio>
#include <string>

#include "kernels.cuh"

namespace lme {
namespace cuda_detail {
namespace {

thread_local std::string g_last_error;

}  // namespace

int record_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s failed: %s (%s) at %s:%d", expr, cudaGetErrorString(err),
                cudaGetErrorName(err), file, line);
  g_last_error = buf;
  return kCudaRuntimeError;
}

int record_status(int status, const char* message) {
  g_last_error = message;
  return status;
}

}  // namespace cuda_detail

const char* cuda_last_error() { return cuda_detail::g_last_error.c_str(); }

int cuda_malloc(void** ptr, size_t bytes) {
  LME_CUDA_REQUIRE(ptr != nullptr, "cuda_malloc: null output pointer");
  *ptr = nullptr;
  if (bytes == 0) return kCudaOk;
  LME_CUDA_TRY(cudaMalloc(ptr, bytes));
  return kCudaOk;
}

int cuda_free(void* ptr) {
  if (ptr != nullptr) LME_CUDA_TRY(cudaFree(ptr));
  return kCudaOk;
}

int cuda_copy_to_device(void* dst, const void* host_src, size_t bytes) {
  if (bytes != 0) LME_CUDA_TRY(cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice));
  return kCudaOk;
}

int cuda_copy_to_host(void* host_dst, const void* src, size_t bytes) {
  if (bytes != 0) LME_CUDA_TRY(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost));
  return kCudaOk;
}

int cuda_copy_device_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes != 0) LME_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, nullptr));
  return kCudaOk;
}

int cuda_synchronize() {
  LME_CUDA_TRY(cudaDeviceSynchronize());
  return kCudaOk;
}

int cuda_sm_count(int* count) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not queried yet; a benign race if two threads fill it
  int device = 0;
  LME_CUDA_TRY(cudaGetDevice(&device));
  if (device < kMaxDevices && cached[device] > 0) {
    *count = cached[device];
    return kCudaOk;
  }
  int n = 0;
  LME_CUDA_TRY(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < kMaxDevices) cached[device] = n;
  *count = n;
  return kCudaOk;
}

int cuda_time_launches(int (*launch)(void* ctx), void* ctx, int iters, float* ms_per_call) {
  LME_CUDA_REQUIRE(iters > 0, "cuda_time_launches: iters must be positive");
  cudaEvent_t start = nullptr, stop = nullptr;
  LME_CUDA_TRY(cudaEventCreate(&start));
  const cudaError_t created = cudaEventCreate(&stop);
  if (created != cudaSuccess) {
    cudaEventDestroy(start);
    return cuda_detail::record_cuda_error(created, "cudaEventCreate(&stop)", __FILE__, __LINE__);
  }
  int status = kCudaOk;
  float ms = 0.f;
  cudaError_t err = cudaEventRecord(start, nullptr);
  for (int i = 0; err == cudaSuccess && status == kCudaOk && i < iters; ++i) status = launch(ctx);
  if (err == cudaSuccess && status == kCudaOk) err = cudaEventRecord(stop, nullptr);
  if (err == cudaSuccess && status == kCudaOk) err = cudaEventSynchronize(stop);
  if (err == cudaSuccess && status == kCudaOk) err = cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (status != kCudaOk) return status;
  if (err != cudaSuccess)
    return cuda_detail::record_cuda_error(err, "timing events", __FILE__, __LINE__);
  *ms_per_call = ms / static_cast<float>(iters);
  return kCudaOk;
}

}  // namespace lme

extern "C" int lmengine_cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last-error slot so later calls start clean
    return 0;
  }
  return n;
}
