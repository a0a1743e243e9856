// Dropout on the CPU: out[i] = x[i] * scale where element i is kept, 0 where it is dropped, with
// the keep bit regenerated from a counter-based hash (core/hash.h) instead of a stored mask. The
// key is mixed once per call; each element costs one mix64 (two 64-bit multiplies, which
// AVX-512DQ vectorises) and a compare. The same kernel serves forward (x) and backward (dout).
#include "core/hash.h"
#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

void dropout_apply(const Tensor& x, double p, uint64_t seed, uint64_t stream, Tensor& out) {
  const hash::Dropout d = hash::dropout(p, seed, stream);
  const int64_t n = x.numel();
  const float* src = x.data<float>();
  float* dst = out.data<float>();  // may be src (in place): each element is read, then written
#pragma omp parallel if (n >= 32768)
  {
    int64_t begin, end;
    thread_range(n, thread_id(), thread_count(), 64, &begin, &end);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i)
      dst[i] = d.keep(static_cast<uint64_t>(i)) ? src[i] * d.scale : 0.0f;
  }
}

}  // namespace cpu
}  // namespace gptcore
