// Group-limited routing (DeepSeek-V3 style), shared by the CPU dispatch (moe_dispatch.cpp) and its
// CUDA twin (cuda/moe_dispatch.cu) so both rank the groups by the same rule.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LME_HOST_DEVICE __host__ __device__
#else
#define LME_HOST_DEVICE
#endif

namespace lme {

// A group's score: the sum of its two best choice values (the one value of a group of one).
// choice: the group's n >= 1 values.
LME_HOST_DEVICE inline float moe_group_score(const float* choice, int32_t n) {
  float b1 = -INFINITY, b2 = -INFINITY;
  for (int32_t i = 0; i < n; ++i) {
    const float v = choice[i];
    if (v > b1) {
      b2 = b1;
      b1 = v;
    } else if (v > b2) {
      b2 = v;
    }
  }
  return n >= 2 ? b1 + b2 : b1;
}

}  // namespace lme
