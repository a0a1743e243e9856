// LayerNorm on the CPU, one row per iteration: the statistics, the normalisation and (for the
// fused variant) the residual add happen while the row is in L1, so each row is read once.
#include <algorithm>
#include <vector>

#include "core/hash.h"
#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

namespace {

// Normalises one row x[0:C] into y; returns (mean, rstd). Two passes for a stable variance.
inline void normalize_row(const float* x, float* y, const float* w, const float* b, int64_t C,
                          float eps, float* mean_out, float* rstd_out) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += x[c];
  const float mean = s / C;
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t c = 0; c < C; ++c) {
    const float d = x[c] - mean;
    v += d * d;
  }
  const float rstd = 1.0f / std::sqrt(v / C + eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
  *mean_out = mean;
  *rstd_out = rstd;
}

}  // namespace

void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
                       Tensor& out, Tensor& mean, Tensor& rstd) {
  const int64_t C = x.size(-1), N = x.numel() / C;
  const float *xp = x.data<float>(), *w = weight.data<float>(), *b = bias.data<float>();
  float *y = out.data<float>(), *mu = mean.data<float>(), *rs = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) normalize_row(xp + i * C, y + i * C, w, b, C, eps, mu + i, rs + i);
}

// With residual dropout (dropout_p > 0) the add reads x through the dropout mask (core/hash.h,
// element i*C + c), in the same row pass: one mix64 per element instead of a separate
// read-modify-write of x. The kept value x * scale is formed first and then added (the select
// between them keeps the compiler from contracting the two into an FMA), so sum is bitwise
// dropout_forward's value plus residual. dropout_p == 0 takes the original loop.
void residual_layernorm_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                const Tensor& bias, float eps, double dropout_p, uint64_t seed,
                                uint64_t stream, Tensor& sum, Tensor& out, Tensor& mean,
                                Tensor& rstd) {
  const int64_t C = x.size(-1), N = x.numel() / C;
  const float *xp = x.data<float>(), *rp = residual.data<float>();
  const float *w = weight.data<float>(), *b = bias.data<float>();
  float *sp = sum.data<float>(), *y = out.data<float>();
  float *mu = mean.data<float>(), *rs = rstd.data<float>();
  if (dropout_p == 0.0) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      float* srow = sp + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) srow[c] = xp[i * C + c] + rp[i * C + c];
      normalize_row(srow, y + i * C, w, b, C, eps, mu + i, rs + i);
    }
    return;
  }
  const hash::Dropout d = hash::dropout(dropout_p, seed, stream);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    float* srow = sp + i * C;
    const float* xrow = xp + i * C;
    const float* rrow = rp + i * C;
    const uint64_t base = static_cast<uint64_t>(i * C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xd = d.keep(base + static_cast<uint64_t>(c)) ? xrow[c] * d.scale : 0.0f;
      srow[c] = xd + rrow[c];
    }
    normalize_row(srow, y + i * C, w, b, C, eps, mu + i, rs + i);
  }
}

// dx = dresidual + rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight.
// dweight/dbias are reduced over fixed blocks of kRowsPerPartial rows into one private partial
// each, then the partials are summed in block order: the blocks do not depend on the thread
// count or the schedule, so neither do the sums (a run resumed with another --threads continues
// bit for bit).
void layernorm_backward(const Tensor& dout, const Tensor& x, const Tensor& mean,
                        const Tensor& rstd, const Tensor& dresidual, const Tensor& weight,
                        Tensor& dweight, Tensor& dbias, Tensor& dx) {
  constexpr int64_t kRowsPerPartial = 32;
  const int64_t C = x.size(-1), N = x.numel() / C;
  const float *xp = x.data<float>(), *dy = dout.data<float>(), *w = weight.data<float>();
  const float *mu = mean.data<float>(), *rs = rstd.data<float>();
  const float* dres = dresidual.defined() ? dresidual.data<float>() : nullptr;
  float* dxp = dx.data<float>();
  const int64_t nblocks = (N + kRowsPerPartial - 1) / kRowsPerPartial;
  std::vector<float> partial(static_cast<size_t>(nblocks) * 2 * C, 0.f);
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    float* dw_t = partial.data() + static_cast<size_t>(blk) * 2 * C;
    float* db_t = dw_t + C;
    const int64_t i1 = std::min(N, (blk + 1) * kRowsPerPartial);
    for (int64_t i = blk * kRowsPerPartial; i < i1; ++i) {
      const float* xr = xp + i * C;
      const float* dyr = dy + i * C;
      const float m = mu[i], r = rs[i];
      float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (xr[c] - m) * r;
        const float g = dyr[c] * w[c];
        sum_g += g;
        sum_gx += g * xhat;
        dw_t[c] += dyr[c] * xhat;
        db_t[c] += dyr[c];
      }
      const float mg = sum_g / C, mgx = sum_gx / C;
      float* dxr = dxp + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (xr[c] - m) * r;
        dxr[c] = r * (dyr[c] * w[c] - mg - xhat * mgx) + (dres ? dres[i * C + c] : 0.f);
      }
    }
  }
  // Sum the partials in block order; each thread owns a slice of the channels.
  float *dw = dweight.data<float>(), *db = dbias.data<float>();
#pragma omp parallel for schedule(static) if (nblocks * C >= 65536)
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    const int64_t c1 = std::min(C, c0 + 64);
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const float* dw_t = partial.data() + static_cast<size_t>(blk) * 2 * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        dw[c] += dw_t[c];
        db[c] += dw_t[C + c];
      }
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
