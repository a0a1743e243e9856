// Small helpers shared by the CPU kernels: index access, branch-free exp and GELU that
// `#pragma omp simd` loops vectorise, and the thread-range split used by the parallel regions.
//
// Note on min/max: std::fmin/std::fmax are IEEE functions that GCC does not inline without
// -ffast-math, so a loop calling them makes a libm call per element (10x slower). The helpers
// below use plain comparisons, which compile to vmaxps/vminps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/tensor.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gptcore {
namespace cpu {

// Token id or target i of an int32 or int64 tensor.
inline int64_t index_at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::int32 ? static_cast<int64_t>(t.data<int32_t>()[i])
                                   : t.data<int64_t>()[i];
}

inline float max_f(float a, float b) { return a > b ? a : b; }
inline float min_f(float a, float b) { return a < b ? a : b; }

// exp(x) for float, branch-free so `#pragma omp simd` loops vectorise it: 2^n * p(f) with
// n = round(x / ln2) and a degree-6 polynomial on |f| <= ln2/2 (relative error ~2e-7).
// Inputs below -87.3 (including -inf) give 0; up to log(FLT_MAX) they saturate at ~exp(88.7);
// above it (including +inf) they give +inf, and NaN gives NaN, as std::exp does (both once
// came out finite, which hid a NaN or inf logit in a softmax behind a finite loss).
inline float fast_exp(float x) {
  const float xc = min_f(max_f(x, -87.3f), 88.7f);  // NaN passes through both comparisons
  const float n = (xc * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float f = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
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
  const float r = x <= -87.3f ? 0.0f : p * scale;
  const float big = x > 88.72283935546875f ? INFINITY : r;  // log(FLT_MAX)
  return x != x ? x : big;  // NaN: the clamps above would have turned it into a number
}

// GPT-2's tanh approximation of GELU and its derivative, written with the logistic function:
// 0.5 * (1 + tanh(u)) = sigmoid(2u), so gelu(x) = x * s with s = 1 / (1 + exp(-2u)), and
// gelu'(x) = s + x * s * (1 - s) * 2 * du/dx. This form is accurate in both tails (no
// 1 - tanh cancellation) and vectorises through fast_exp (std::tanh would be a libm call).
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;
inline float gelu_sigmoid(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 1.0f / (1.0f + fast_exp(-2.0f * u));
}
inline float gelu(float x) { return x * gelu_sigmoid(x); }
inline float gelu_grad(float x) {
  const float s = gelu_sigmoid(x);
  const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  return s + 2.0f * x * s * (1.0f - s) * du;
}

// Thread count and id inside a parallel region (1 and 0 without OpenMP).
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The part [begin, end) of [0, n) that thread `tid` of `nthreads` owns: contiguous chunks whose
// boundaries are multiples of `align` (so SIMD loops and cache lines are not split).
inline void thread_range(int64_t n, int tid, int nthreads, int64_t align, int64_t* begin,
                         int64_t* end) {
  const int64_t units = (n + align - 1) / align;
  const int64_t per = units / nthreads, extra = units % nthreads;
  const int64_t u0 = tid * per + std::min<int64_t>(tid, extra);
  const int64_t u1 = u0 + per + (tid < extra ? 1 : 0);
  *begin = std::min(n, u0 * align);
  *end = std::min(n, u1 * align);
}

}  // namespace cpu
}  // namespace gptcore
