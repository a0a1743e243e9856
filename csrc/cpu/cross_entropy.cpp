// Fused softmax cross-entropy on the CPU. Per row: one pass for the running max and the sum
// of exponentials (online softmax), then, if a gradient is wanted, one pass writing
// grad_scale * (softmax - onehot) straight into dlogits (which may be the logits buffer).
// The probabilities are never stored.
#include <cmath>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

namespace {

// log(sum(exp(x[0:V]))) with a blocked online max: the max of each 256-wide block first, then
// the block's exponentials, so the inner loops vectorise.
// Non-finite logits give what the float64 reference (and PyTorch) give: a NaN anywhere, a +inf
// (inf - inf) or a row of only -inf makes the result NaN; a -inf among finite logits adds 0. A
// comparison-based max may skip a NaN, so NaNs are counted on the side.
float row_logsumexp(const float* x, int64_t V) {
  constexpr int64_t kBlock = 256;
  float m = -INFINITY, l = 0.f;
  int nans = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = std::min(V, j0 + kBlock);
    float bm = -INFINITY;
#pragma omp simd reduction(max : bm) reduction(+ : nans)
    for (int64_t j = j0; j < j1; ++j) {
      bm = max_f(bm, x[j]);
      nans += x[j] != x[j];
    }
    if (bm == -INFINITY) continue;  // a block of banned (-inf) logits adds nothing (and
                                    // -inf - -inf would be NaN while m is still -inf)
    if (bm > m) {
      l *= fast_exp(m - bm);
      m = bm;
    }
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) s += fast_exp(x[j] - m);
    l += s;
  }
  if (nans || m == -INFINITY) return NAN;  // (m is +inf when a +inf made l NaN already)
  return m + std::log(l);
}

}  // namespace

void cross_entropy(const Tensor& logits, const Tensor& targets, int64_t vocab_size,
                   int64_t ignore_index, float grad_scale, Tensor& losses, Tensor& dlogits) {
  const int64_t V = vocab_size;
  const int64_t N = logits.size(0), Vp = logits.size(1);
  const float* x = logits.data<float>();
  float* loss = losses.data<float>();
  float* dx = dlogits.defined() ? dlogits.data<float>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* row = x + i * Vp;
    const int64_t t = index_at(targets, i);
    if (t == ignore_index) {  // masked position: no loss, no gradient
      loss[i] = 0.f;
      if (dx) std::fill(dx + i * Vp, dx + (i + 1) * Vp, 0.f);
      continue;
    }
    const float lse = row_logsumexp(row, V);
    loss[i] = lse - row[t];
    if (!dx) continue;
    float* drow = dx + i * Vp;
    const float row_t = row[t];  // read before an in-place write overwrites it
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) drow[j] = grad_scale * fast_exp(row[j] - lse);
    drow[t] = grad_scale * (fast_exp(row_t - lse) - 1.f);
    for (int64_t j = V; j < Vp; ++j) drow[j] = 0.f;
  }
}

}  // namespace cpu
}  // namespace gptcore
