// AdamW on the CPU: one pass per tensor that reads grad, m, v, param once and writes m, v,
// param once, with the clipping scale and the bias corrections folded into the same loop.
#include <cmath>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

void adamw_step(std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                std::vector<Tensor>& m, std::vector<Tensor>& v, std::vector<Tensor>& master,
                const std::vector<bool>& decay, float lr, float beta1, float beta2, float eps,
                float weight_decay, int64_t step, float grad_scale, uint64_t seed) {
  (void)master;  // CPU parameters are float32: no master copy
  (void)seed;
  const float bc1 = 1.0f - static_cast<float>(std::pow(static_cast<double>(beta1), step));
  const float bc2 = 1.0f - static_cast<float>(std::pow(static_cast<double>(beta2), step));
  for (size_t t = 0; t < params.size(); ++t) {
    float* p = params[t].data<float>();
    const float* g = grads[t].data<float>();
    float* mt = m[t].data<float>();
    float* vt = v[t].data<float>();
    const float wd = decay[t] ? weight_decay : 0.f;
    const int64_t n = params[t].numel();
#pragma omp parallel for simd schedule(static) if (n > 4096)
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * grad_scale;
      const float mi = beta1 * mt[i] + (1.f - beta1) * gi;
      const float vi = beta2 * vt[i] + (1.f - beta2) * gi * gi;
      mt[i] = mi;
      vt[i] = vi;
      const float mhat = mi / bc1, vhat = vi / bc2;
      p[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p[i]);
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
