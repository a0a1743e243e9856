// Linear layer on the CPU: y = x @ W^T + b, optionally followed by tanh-GELU.
//
// The matrix products are OpenBLAS sgemm calls (from the scipy-openblas32 wheel), but the
// threading is ours: one OpenMP region per op, in which each thread runs a single-threaded
// sgemm on its own block of the output and then applies the epilogue to that block while it is
// still in cache. This fuses bias + GELU (forward) and GELU' + bias-gradient (backward) into the
// GEMM's pass over memory, and it keeps one thread pool on the machine: OpenBLAS's own pthreads
// spinning next to OpenMP's workers made every linear op up to 2x slower on 2 cores.
//
// Blocks: forward splits y along its longer side (rows when there are more tokens than output
// features, else columns, so T = 1 decoding still uses every core). Backward splits dW's rows
// (and the matching columns of dout) for dW, db and the GELU derivative, then, after a barrier,
// dx's columns.
#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

namespace {

// OpenBLAS runs in the calling thread; the parallelism comes from the OpenMP regions below.
void blas_single_threaded() {
  static const bool once = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

constexpr int64_t kAlign = 16;  // block boundaries on whole 64-byte lines of floats

}  // namespace

// gptcore.set_num_threads sizes the OpenMP pool, which is the only pool the kernels use;
// OpenBLAS stays single-threaded inside it, but every OpenMP thread may be inside an sgemm at
// once, and OpenBLAS keeps buffers for only the MAX_THREADS callers it was built for (more
// abort inside OpenBLAS). Its build configuration names that number ("... MAX_THREADS=64");
// without it, the number of processors OpenBLAS sees.
int blas_max_threads() {
  const char* config = scipy_openblas_get_config();
  const char* key = config ? std::strstr(config, "MAX_THREADS=") : nullptr;
  if (key) {
    const long n = std::strtol(key + std::strlen("MAX_THREADS="), nullptr, 10);
    if (n >= 1 && n <= (1 << 20)) return static_cast<int>(n);
  }
  return std::max(1, scipy_openblas_get_num_procs());
}

void linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, bool gelu,
                    Tensor& out, Tensor& pre) {
  blas_single_threaded();
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  const float* xp = x.data<float>();
  const float* w = weight.data<float>();
  const float* b = bias.defined() ? bias.data<float>() : nullptr;
  float* y = gelu ? pre.data<float>() : out.data<float>();  // the GEMM result (pre-activation)
  float* o = out.data<float>();
#pragma omp parallel
  {
    // This thread's block of y: rows [n0, n1) x columns [m0, m1). Split the longer side, so
    // the operand every thread packs in full (x when splitting columns, W when splitting rows)
    // is the smaller one.
    int64_t n0 = 0, n1 = N, m0 = 0, m1 = M;
    if (N > M)
      thread_range(N, thread_id(), thread_count(), kAlign, &n0, &n1);
    else
      thread_range(M, thread_id(), thread_count(), kAlign, &m0, &m1);
    if (n1 > n0 && m1 > m0) {
      const int64_t nb = n1 - n0, mb = m1 - m0;
      float* yb = y + n0 * M + m0;
      if (b) {  // bias folded in as the GEMM's initial C (beta = 1)
        for (int64_t i = 0; i < nb; ++i) std::copy(b + m0, b + m1, yb + i * M);
      }
      if (N == 1)  // one token (decoding): a matrix-vector product, no GEMM packing
        scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, mb, K, 1.f, w + m0 * K, K, xp, 1,
                          b ? 1.f : 0.f, yb, 1);
      else
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, mb, K, 1.f, xp + n0 * K,
                          K, w + m0 * K, K, b ? 1.f : 0.f, yb, M);
      if (gelu) {  // epilogue on this thread's block, just written by the GEMM
        for (int64_t i = n0; i < n1; ++i) {
          const float* yr = y + i * M;
          float* orow = o + i * M;
#pragma omp simd
          for (int64_t j = m0; j < m1; ++j) orow[j] = cpu::gelu(yr[j]);
        }
      }
    }
  }
}

void linear_backward(const Tensor& dout, const Tensor& x, const Tensor& pre, const Tensor& weight,
                     Tensor& dweight, Tensor& dbias, Tensor& dx) {
  blas_single_threaded();
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  const float* xp = x.data<float>();
  const float* w = weight.data<float>();
  const float* p = pre.defined() ? pre.data<float>() : nullptr;
  float* dw = dweight.data<float>();
  float* db = dbias.defined() ? dbias.data<float>() : nullptr;
  // g = dout * gelu'(pre) needs its own buffer (dout belongs to the caller); without GELU g is
  // dout itself. The buffer is kept per calling thread and reused, so a training step does not
  // page-fault a fresh (N, M) allocation for every MLP layer.
  static thread_local std::vector<float> gbuf;
  if (p && gbuf.size() < static_cast<size_t>(N * M)) gbuf.resize(static_cast<size_t>(N * M));
  // Taken here: inside the parallel region `gbuf` would name each worker's own (empty) buffer.
  float* gelu_g = gbuf.data();
  const float* g = p ? gelu_g : dout.data<float>();
#pragma omp parallel
  {
    const int tid = thread_id(), nt = thread_count();
    int64_t m0, m1;
    thread_range(M, tid, nt, kAlign, &m0, &m1);
    if (m1 > m0) {
      if (p) {  // GELU derivative for this thread's columns
        const float* d = dout.data<float>();
        for (int64_t i = 0; i < N; ++i) {
#pragma omp simd
          for (int64_t j = m0; j < m1; ++j)
            gelu_g[i * M + j] = d[i * M + j] * cpu::gelu_grad(p[i * M + j]);
        }
      }
      if (db) {  // column sums, rows in order (deterministic)
        for (int64_t i = 0; i < N; ++i) {
          const float* gr = g + i * M;
#pragma omp simd
          for (int64_t j = m0; j < m1; ++j) db[j] += gr[j];
        }
      }
      // dW[m0:m1] += g[:, m0:m1]^T @ x
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m1 - m0, K, N, 1.f, g + m0, M,
                        xp, K, 1.f, dw + m0 * K, K);
    }
    if (dx.defined()) {
#pragma omp barrier
      // dx[:, k0:k1] = g @ W[:, k0:k1]  (needs every column of g: after the barrier)
      int64_t k0, k1;
      thread_range(K, tid, nt, kAlign, &k0, &k1);
      if (k1 > k0)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, k1 - k0, M, 1.f, g, M,
                          w + k0, K, 0.f, dx.data<float>() + k0, K);
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
