// A view of one weight matrix in the memory the caller owns (a memory-mapped checkpoint).
#pragma once

#include <cstdint>

#include "lmengine/quant.h"

namespace lme {

// A 2-D weight stored row-major: `rows` rows of `cols` elements in dtype `type`. 1-D vectors
// (norm weights, biases) are always F32 with rows == 1.
struct WeightTensor {
  DType type = DType::F32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  const float* f32() const { return reinterpret_cast<const float*>(data); }
};

}  // namespace lme
