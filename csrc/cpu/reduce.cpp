// Reductions on the CPU: the global L2 norm used for gradient clipping.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

// Sum of squares in double over fixed blocks of kBlock elements, the block sums added in order:
// the blocks do not depend on the thread count, so neither does the norm (nor the clipping it
// decides), and a run resumed with another --threads continues bit for bit.
double global_norm(const std::vector<Tensor>& tensors) {
  constexpr int64_t kBlock = 16384;
  double total = 0.0;
  std::vector<double> part;
  for (const Tensor& t : tensors) {
    const float* x = t.data<float>();
    const int64_t n = t.numel();
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    part.assign(static_cast<size_t>(nblocks), 0.0);
#pragma omp parallel for schedule(static) if (nblocks > 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i1 = std::min(n, (blk + 1) * kBlock);
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = blk * kBlock; i < i1; ++i) s += static_cast<double>(x[i]) * x[i];
      part[static_cast<size_t>(blk)] = s;
    }
    for (double s : part) total += s;
  }
  return std::sqrt(total);
}

}  // namespace cpu
}  // namespace gptcore
