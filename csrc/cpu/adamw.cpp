// AdamW on the CPU: one pass that reads grad, m, v, param once and writes m, v, param once per
// element, with the clipping scale (grad_scale) and the bias corrections folded into the same
// loop. All tensors of the step share one parallel region: each thread updates its slice of
// every tensor, so a 12-tensor step costs one fork/join instead of twelve.
#include <algorithm>
#include <cmath>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

namespace {

struct AdamWHyper {
  float lr, beta1, beta2, eps, grad_scale, inv_bc1, inv_bc2;
};

// Elements [0, n) of one tensor. The loop vectorises only when sqrt need not set errno
// (compiled with -fno-math-errno); with errno semantics GCC keeps it scalar, several x slower.
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float wd,
                  const AdamWHyper& h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * h.grad_scale;
    const float mi = h.beta1 * m[i] + (1.f - h.beta1) * gi;
    const float vi = h.beta2 * v[i] + (1.f - h.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float mhat = mi * h.inv_bc1, vhat = vi * h.inv_bc2;
    p[i] -= h.lr * (mhat / (std::sqrt(vhat) + h.eps) + wd * p[i]);
  }
}

}  // namespace

void adamw_step(std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                std::vector<Tensor>& m, std::vector<Tensor>& v, std::vector<Tensor>& master,
                const std::vector<bool>& decay, float lr, float beta1, float beta2, float eps,
                float weight_decay, int64_t step, float grad_scale, uint64_t seed) {
  // CPU parameters are float32, so a master copy (if one is passed) holds the same values: the
  // update runs on it, as on CUDA, and the parameter receives an exact copy.
  (void)seed;
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  const AdamWHyper h{lr, beta1, beta2, eps, grad_scale, static_cast<float>(1.0 / bc1),
                     static_cast<float>(1.0 / bc2)};
  int64_t total = 0;
  for (const Tensor& p : params) total += p.numel();
#pragma omp parallel if (total > 16384)
  {
    const int tid = thread_id(), nt = thread_count();
    for (size_t t = 0; t < params.size(); ++t) {
      int64_t i0, i1;
      thread_range(params[t].numel(), tid, nt, 16, &i0, &i1);
      if (i1 <= i0) continue;
      float* target = (master.empty() ? params[t] : master[t]).data<float>() + i0;
      adamw_update(target, grads[t].data<float>() + i0, m[t].data<float>() + i0,
                   v[t].data<float>() + i0, i1 - i0, decay[t] ? weight_decay : 0.f, h);
      if (!master.empty())
        std::copy(target, target + (i1 - i0), params[t].data<float>() + i0);
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
