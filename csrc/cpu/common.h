// Small helpers shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/tensor.h"

namespace gptcore {
namespace cpu {

// Token id or target i of an int32 or int64 tensor.
inline int64_t index_at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::int32 ? static_cast<int64_t>(t.data<int32_t>()[i])
                                   : t.data<int64_t>()[i];
}

// GPT-2's tanh approximation of GELU and its derivative.
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
inline float gelu(float x) {
  const float u = kGeluScale * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(u));
}
inline float gelu_grad(float x) {
  const float u = kGeluScale * (x + 0.044715f * x * x * x);
  const float th = std::tanh(u);
  const float sech2 = 1.0f - th * th;
  return 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
}

}  // namespace cpu
}  // namespace gptcore

namespace gptcore {
namespace cpu {

// exp(x) for float, branch-free so `#pragma omp simd` loops vectorise it: 2^n * p(f) with
// n = round(x / ln2) and a degree-6 polynomial on |f| <= ln2/2 (relative error ~2e-7).
// Inputs below -87.3 (including -inf) give 0; above 88.7 they saturate.
inline float fast_exp(float x) {
  x = std::fmin(std::fmax(x, -87.3f), 88.7f);
  const float n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float f = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return x <= -87.3f ? 0.0f : p * scale;
}

}  // namespace cpu
}  // namespace gptcore
