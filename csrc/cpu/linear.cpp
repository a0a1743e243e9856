// Linear layer on the CPU: the matrix product is OpenBLAS's sgemm (from the scipy-openblas32
// wheel); the bias is folded in by pre-filling the output and using beta = 1, and the GELU
// epilogue and its derivative run as one parallel pass over the (N, M) result.
#include <cblas.h>

#include <algorithm>
#include <vector>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

void set_blas_threads(int n) {
  if (n > 0) scipy_openblas_set_num_threads(n);
}

void linear_forward(Tensor& out, Tensor& pre, const Tensor& x, const Tensor& weight,
                    const Tensor& bias, bool gelu) {
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  float* y = gelu ? pre.data<float>() : out.data<float>();
  float beta = 0.f;
  if (bias.defined()) {
    const float* b = bias.data<float>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) std::copy(b, b + M, y + i * M);
    beta = 1.f;
  }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, M, K, 1.f, x.data<float>(), K,
                    weight.data<float>(), K, beta, y, M);
  if (gelu) {
    float* o = out.data<float>();
    const int64_t n = N * M;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) o[i] = cpu::gelu(y[i]);
  }
}

void linear_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dout,
                     const Tensor& x, const Tensor& weight, const Tensor& pre) {
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  const float* g = dout.data<float>();
  std::vector<float> gelu_grad_buf;
  if (pre.defined()) {  // g = dout * gelu'(pre), fused into one pass
    gelu_grad_buf.resize(static_cast<size_t>(N * M));
    const float* p = pre.data<float>();
    float* gg = gelu_grad_buf.data();
    const int64_t n = N * M;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) gg[i] = g[i] * cpu::gelu_grad(p[i]);
    g = gg;
  }
  if (dx.defined())
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, K, M, 1.f, g, M,
                      weight.data<float>(), K, 0.f, dx.data<float>(), K);
  scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, M, K, N, 1.f, g, M, x.data<float>(),
                    K, 1.f, dweight.data<float>(), K);
  if (dbias.defined()) {  // column sums, each thread a block of columns, rows in order
    float* db = dbias.data<float>();
    constexpr int64_t kCols = 64;
    const int64_t nblocks = (M + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t c0 = blk * kCols, c1 = std::min(M, c0 + kCols);
      float acc[kCols] = {0};
      for (int64_t i = 0; i < N; ++i) {
        const float* row = g + i * M;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row[c];
      }
      for (int64_t c = c0; c < c1; ++c) db[c] += acc[c - c0];
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
