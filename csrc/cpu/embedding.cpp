// Token + position embedding on the CPU: a gather and its scatter-add.
#include <cstring>

#include "core/hash.h"
#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

// With embedding dropout (dropout_p > 0) each row's sum goes through the dropout mask
// (core/hash.h, element bt*C + c) before it is stored: the same values as dropout_forward on the
// plain result, without a second pass over out.
void embedding_forward(const Tensor& idx, const Tensor& wte, const Tensor& wpe, int64_t pos,
                       const Tensor& pos_dev, double dropout_p, uint64_t seed, uint64_t stream,
                       Tensor& out) {
  const int64_t B = idx.size(0), T = idx.size(1), C = wte.size(1);
  const float* te = wte.data<float>();
  // Row b's positions start at p_b: pos, or the position tensor's one element, or its element b
  // (per-row positions). Dispatch has checked 0 <= p_b and p_b + T <= wpe rows.
  const int32_t* pd = pos_dev.defined() ? pos_dev.data<int32_t>() : nullptr;
  const int64_t pd_stride = pd && pos_dev.numel() > 1 ? 1 : 0;
  const float* wp = wpe.data<float>();
  auto pos_row = [&](int64_t bt) {  // wpe's row for flat position bt = b*T + t
    const int64_t p0 = pd ? pd[pd_stride * (bt / T)] : pos;
    return wp + (p0 + bt % T) * C;
  };
  float* o = out.data<float>();
  if (dropout_p == 0.0) {
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const float* a = te + index_at(idx, bt) * C;
      const float* p = pos_row(bt);
      float* y = o + bt * C;
      for (int64_t c = 0; c < C; ++c) y[c] = a[c] + p[c];
    }
    return;
  }
  const hash::Dropout d = hash::dropout(dropout_p, seed, stream);
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const float* a = te + index_at(idx, bt) * C;
    const float* p = pos_row(bt);
    float* y = o + bt * C;
    const uint64_t base = static_cast<uint64_t>(bt * C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float v = a[c] + p[c];
      y[c] = d.keep(base + static_cast<uint64_t>(c)) ? v * d.scale : 0.0f;
    }
  }
}

// Deterministic: each thread owns a slice of channels, so no two threads touch one element,
// and every element sums its contributions in (b, t) order.
void embedding_backward(const Tensor& dout, const Tensor& idx, Tensor& dwte, Tensor& dwpe) {
  const int64_t B = idx.size(0), T = idx.size(1), C = dwte.size(1);
  const float* d = dout.data<float>();
  float* dte = dwte.data<float>();
  float* dpe = dwpe.data<float>();
  constexpr int64_t kChunk = 64;
  const int64_t nchunks = (C + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t c0 = ch * kChunk, c1 = std::min(C, c0 + kChunk);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        const float* g = d + (b * T + t) * C;
        float* te = dte + index_at(idx, b * T + t) * C;
        float* pe = dpe + t * C;
        for (int64_t c = c0; c < c1; ++c) {
          te[c] += g[c];
          pe[c] += g[c];
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
