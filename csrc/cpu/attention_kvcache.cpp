// Decoding attention over a KV cache on the CPU.
//
// One call appends the Tn new tokens' keys and values to the caches and attends each new query
// to everything cached up to its own position. The append is fused into the same pass over
// (batch, head) pairs: a thread copies its head's new k, v rows into the (Tmax, D) cache
// panels and then reads them straight back out of cache while scoring.
//
// Work is split over (batch, head) pairs. Per query: scores s_j = q . k_j / sqrt(D) for the
// visible keys (contiguous rows of the cache panel, a SIMD dot product each), an exact softmax
// (max, exp, sum) in a per-thread buffer, then out = sum_j p_j v_j / sum_j p_j. Decoding has
// Tn = 1, so there is nothing to tile: each key and value row is read exactly once per query.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

void attention_kvcache(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, int64_t pos,
                       const Tensor& pos_dev, int n_head, int window, Tensor& out) {
  const int64_t B = qkv.size(0), Tn = qkv.size(1), C3 = qkv.size(2), C = C3 / 3;
  // Row b's first new position: pos, or the position tensor's one element, or its element b
  // (per-row positions). Dispatch has checked 0 <= start and start + Tn <= Tmax for each.
  const int32_t* pd = pos_dev.defined() ? pos_dev.data<int32_t>() : nullptr;
  const int64_t pd_stride = pd && pos_dev.numel() > 1 ? 1 : 0;
  auto start_of = [&](int64_t b) -> int64_t { return pd ? pd[pd_stride * b] : pos; };
  int64_t last = 0;  // the most keys any query sees: sizes the per-thread score buffer and work
  for (int64_t b = 0; b < B; ++b) last = std::max(last, start_of(b) + Tn);
  const int64_t D = C / n_head, Tmax = k_cache.size(2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* src = qkv.data<float>();
  float* kc = k_cache.data<float>();
  float* vc = v_cache.data<float>();
  float* dst = out.data<float>();
  // Early decode steps are a few thousand flops: not worth waking the thread pool for (on a
  // busy machine a parallel region can cost a scheduler tick).
  const int64_t work = B * n_head * Tn * last * D;
#pragma omp parallel if (work >= (int64_t(1) << 16))
  {
    std::vector<float> p(static_cast<size_t>(last));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * n_head; ++bh) {
      const int64_t b = bh / n_head, h = bh % n_head, start = start_of(b);
      float* K = kc + bh * Tmax * D;  // this head's (Tmax, D) panels
      float* V = vc + bh * Tmax * D;
      const float* rows = src + b * Tn * C3 + h * D;  // row i of q is rows + i * C3
      for (int64_t i = 0; i < Tn; ++i) {  // append the new keys and values
        std::memcpy(K + (start + i) * D, rows + i * C3 + C, D * sizeof(float));
        std::memcpy(V + (start + i) * D, rows + i * C3 + 2 * C, D * sizeof(float));
      }
      for (int64_t i = 0; i < Tn; ++i) {
        const int64_t t = start + i;  // absolute position of this query
        const int64_t lo = window > 0 ? std::max<int64_t>(0, t - window + 1) : 0;
        const float* q = rows + i * C3;
        float mx = -INFINITY;
        for (int64_t j = lo; j <= t; ++j) {
          const float* k = K + j * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
          s *= scale;
          p[j] = s;
          mx = max_f(mx, s);
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = lo; j <= t; ++j) {
          const float e = fast_exp(p[j] - mx);
          p[j] = e;
          sum += e;
        }
        float* o = dst + (b * Tn + i) * C + h * D;
        std::fill(o, o + D, 0.f);
        for (int64_t j = lo; j <= t; ++j) {
          const float pj = p[j];
          const float* v = V + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += pj * v[d];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
