// Reductions on the CPU: the global L2 norm used for gradient clipping.
#include <cmath>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

// Sum of squares in double, per tensor with a fixed static split, so the result is the same
// for the same thread count.
double global_norm(const std::vector<Tensor>& tensors) {
  double total = 0.0;
  for (const Tensor& t : tensors) {
    const float* x = t.data<float>();
    const int64_t n = t.numel();
    double s = 0.0;
#pragma omp parallel for simd reduction(+ : s) schedule(static) if (n > 16384)
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
    total += s;
  }
  return std::sqrt(total);
}

}  // namespace cpu
}  // namespace gptcore
