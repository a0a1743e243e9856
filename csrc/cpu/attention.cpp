// Causal (optionally banded) multi-head attention on the CPU, flash-style.
//
// Work is split over (batch, head) pairs. Inside one head the (T, T) score matrix is visited in
// 64 x 64 tiles (64 queries x 64 keys) and never stored whole:
//
// Forward, per query tile: for each key tile up to the diagonal, S = Q K^T (one small GEMM),
// then an online softmax per row (running max m, running sum l, the output accumulator
// rescaled when m grows), then O += P V (a second small GEMM). Only the per-row log-sum-exp
// m + log(l) is saved for backward.
//
// Backward, per query tile and key tile: P is recomputed from the saved log-sum-exp,
// dP = dO V^T, dS = P * (dP - rowsum(dO * O)) / sqrt(D), and the three gradient products
// dV += P^T dO, dK += dS^T Q, dQ += dS K, accumulated in per-head scratch, written once.
//
// Every product is the same register-blocked micro-kernel (gemm_acc): a 4-row x 64-column
// block of the result stays in vector registers while the shared dimension runs, so each
// loaded vector feeds 4 FMAs. K and V are transposed once per head into zero-padded (D, T+64)
// panels so the score products read keys contiguously.
//
// Attention dropout (dropout_p > 0) is fused: the keep bit of probability (b, h, t, s) is
// regenerated from the counter-based hash of core/hash.h (index ((b*H + h)*T + t)*T + s), never
// stored. Forward drops and rescales P after the row sums (so lse stays that of the un-dropped
// softmax) and before O += P V; backward applies the same mask to P for dV and to dP = dO V^T
// before dS = P * (M*scale*dP - delta). Both kernels are templates on dropout on/off, so with
// dropout_p == 0 the loops are exactly the dropout-free ones.
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "core/hash.h"
#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

namespace {

constexpr int64_t kTileQ = 64;  // query rows per tile
constexpr int64_t kTileK = 64;  // keys per tile

// ---- a small register-blocked GEMM ----------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kMaxVecs = 4;  // 4 rows x 4 vectors = 16 accumulators of the 32 zmm registers
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kMaxVecs = 2;  // 4 x 2 accumulators of the 16 ymm registers
#else
constexpr int kLanes = 4;
constexpr int kMaxVecs = 2;
#endif
constexpr int kRows = 4;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// C[r][n] += sum_k A[r * a_rs + k * a_cs] * B[k * ldb + n] for R rows and NV vectors of columns.
template <int R, int NV>
void micro_kernel(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                  int64_t ldb, float* C, int64_t ldc) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = load(C + r * ldc + v * kLanes);
  for (int64_t k = 0; k < K; ++k) {
    vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * a_rs + k * a_cs];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kLanes, acc[r][v]);
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t);

template <int R, int... NV>
constexpr std::array<MicroFn, sizeof...(NV)> micro_row(std::integer_sequence<int, NV...>) {
  return {&micro_kernel<R, NV + 1>...};
}

// C (M x N, leading dim ldc) += A (M x K, element (m, k) at A[m * a_rs + k * a_cs]) times
// B (K x N, leading dim ldb). A is read by broadcasts, so any layout of A (rows or a transpose)
// works; B and C rows are contiguous.
void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
              const float* B, int64_t ldb, float* C, int64_t ldc) {
  static const std::array<MicroFn, kMaxVecs> kernels[kRows] = {
      micro_row<1>(std::make_integer_sequence<int, kMaxVecs>{}),
      micro_row<2>(std::make_integer_sequence<int, kMaxVecs>{}),
      micro_row<3>(std::make_integer_sequence<int, kMaxVecs>{}),
      micro_row<4>(std::make_integer_sequence<int, kMaxVecs>{}),
  };
  const int64_t n_vec = N / kLanes * kLanes;
  for (int64_t n0 = 0; n0 < n_vec; n0 += kMaxVecs * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kMaxVecs, (n_vec - n0) / kLanes));
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m0));
      kernels[rows - 1][nv - 1](K, A + m0 * a_rs, a_rs, a_cs, B + n0, ldb, C + m0 * ldc + n0, ldc);
    }
  }
  if (n_vec < N) {  // leftover columns (head sizes that are not a multiple of the vector width)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const float a = A[m * a_rs + k * a_cs];
        for (int64_t n = n_vec; n < N; ++n) C[m * ldc + n] += a * B[k * ldb + n];
      }
  }
}

// ---- one head's view of the packed qkv ------------------------------------------------------

struct Head {
  const float *q, *k, *v;  // row t of q is q + t * stride
  int64_t stride, T, D;
};

Head head_of(const Tensor& qkv, int64_t b, int64_t h, int64_t D) {
  const int64_t T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3;
  const float* base = qkv.data<float>() + b * T * C3 + h * D;
  return Head{base, base + C, base + 2 * C, C3, T, D};
}

// panel[d * ld + t] = rows[t * stride + d] for t < T (columns T.. stay as they are: zero).
void transpose_into(float* panel, int64_t ld, const float* rows, int64_t stride, int64_t T,
                    int64_t D) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) panel[d * ld + t] = rows[t * stride + d];
}

// Keys that query i sees: [first_key(i), i].
inline int64_t first_key(int64_t i, int window) {
  return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
}

template <bool kDrop>
void attention_forward_impl(const Tensor& qkv, int n_head, int window, const hash::Dropout& drop,
                            Tensor& out, Tensor& lse) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, D = C / n_head;
  const int64_t ld = T + kTileK;  // panel width: a full key tile past any start stays inside
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float* out_p = out.data<float>();
  float* lse_p = lse.data<float>();
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<size_t>(D * ld), 0.f);
    std::vector<float> s(kTileQ * kTileK), o(static_cast<size_t>(kTileQ * D));
    float m[kTileQ], l[kTileQ];
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * n_head; ++bh) {
      const int64_t b = bh / n_head, h = bh % n_head;
      const Head hd = head_of(qkv, b, h, D);
      transpose_into(kt.data(), ld, hd.k, hd.stride, T, D);
      for (int64_t q0 = 0; q0 < T; q0 += kTileQ) {
        const int64_t nq = std::min(kTileQ, T - q0);
        std::fill(o.begin(), o.end(), 0.f);
        std::fill(m, m + kTileQ, -INFINITY);
        std::fill(l, l + kTileQ, 0.f);
        const int64_t k_end = q0 + nq;  // one past the last key any row of the tile sees
        for (int64_t k0 = first_key(q0, window); k0 < k_end; k0 += kTileK) {
          const int64_t nk = std::min(kTileK, k_end - k0);
          std::fill(s.begin(), s.end(), 0.f);
          gemm_acc(nq, kTileK, D, hd.q + q0 * hd.stride, hd.stride, 1, kt.data() + k0, ld,
                   s.data(), kTileK);
          // online softmax: row r's scores become probabilities relative to its running max
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = q0 + r;
            const int64_t j0 = std::max<int64_t>(first_key(i, window) - k0, 0);
            const int64_t j1 = std::min<int64_t>(i + 1 - k0, nk);
            float* sr = s.data() + r * kTileK;
            if (j1 <= j0) {  // no visible key in this tile
              std::fill(sr, sr + nk, 0.f);
              continue;
            }
            float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
            for (int64_t j = j0; j < j1; ++j) bm = max_f(bm, sr[j]);
            const float m_new = max_f(m[r], bm * scale);
            // While every visible score so far is -inf the tile adds nothing (-inf - -inf
            // would be NaN); a row that never sees more than -inf ends NaN below. A NaN or +inf
            // score makes the row NaN through fast_exp, as in the reference's softmax.
            const float m_sub = m_new == -INFINITY ? 0.f : m_new;
            const float corr = fast_exp(m[r] - m_sub);  // 0 on the first visible tile
            float bl = 0.f;
#pragma omp simd reduction(+ : bl)
            for (int64_t j = 0; j < nk; ++j) {
              const float p = (j >= j0 && j < j1) ? fast_exp(sr[j] * scale - m_sub) : 0.f;
              sr[j] = p;
              bl += p;
            }
            if constexpr (kDrop) {  // after the sum: lse is of the un-dropped probabilities
              const hash::Dropout d = drop;  // a local copy: the loop vectorises
              const uint64_t base = static_cast<uint64_t>((bh * T + i) * T + k0);
#pragma omp simd
              for (int64_t j = j0; j < j1; ++j) sr[j] = d.keep(base + j) ? sr[j] * d.scale : 0.f;
            }
            l[r] = l[r] * corr + bl;
            m[r] = m_new;
            float* orow = o.data() + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) orow[d] *= corr;
          }
          gemm_acc(nq, D, nk, s.data(), kTileK, 1, hd.v + k0 * hd.stride, hd.stride, o.data(), D);
        }
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = q0 + r;
          const bool none = m[r] == -INFINITY;  // every score -inf: softmax is 0/0
          const float inv_l = none ? NAN : 1.0f / l[r];
          float* dst = out_p + (b * T + i) * C + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv_l;
          lse_p[(b * n_head + h) * T + i] = none ? NAN : m[r] + std::log(l[r]);
        }
      }
    }
  }
}

template <bool kDrop>
void attention_backward_impl(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                             const Tensor& lse, int n_head, int window,
                             const hash::Dropout& drop, Tensor& dqkv) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, D = C / n_head;
  const int64_t ld = T + kTileK;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* lse_p = lse.data<float>();
  float* dqkv_p = dqkv.data<float>();
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<size_t>(D * ld), 0.f), vt(static_cast<size_t>(D * ld), 0.f);
    std::vector<float> dk(static_cast<size_t>(T * D)), dv(static_cast<size_t>(T * D));
    std::vector<float> p(kTileQ * kTileK), ds(kTileQ * kTileK), dq(static_cast<size_t>(kTileQ * D));
    float delta[kTileQ];
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * n_head; ++bh) {
      const int64_t b = bh / n_head, h = bh % n_head;
      const Head hd = head_of(qkv, b, h, D);
      const float* dO = dout.data<float>() + b * T * C + h * D;  // row stride C
      const float* O = out.data<float>() + b * T * C + h * D;
      const float* row_lse = lse_p + (b * n_head + h) * T;
      transpose_into(kt.data(), ld, hd.k, hd.stride, T, D);
      transpose_into(vt.data(), ld, hd.v, hd.stride, T, D);
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t q0 = 0; q0 < T; q0 += kTileQ) {
        const int64_t nq = std::min(kTileQ, T - q0);
        for (int64_t r = 0; r < nq; ++r) {  // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij
          const float* a = dO + (q0 + r) * C;
          const float* o = O + (q0 + r) * C;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < D; ++d) acc += a[d] * o[d];
          delta[r] = acc;
        }
        std::fill(dq.begin(), dq.end(), 0.f);
        const int64_t k_end = q0 + nq;
        for (int64_t k0 = first_key(q0, window); k0 < k_end; k0 += kTileK) {
          const int64_t nk = std::min(kTileK, k_end - k0);
          std::fill(p.begin(), p.end(), 0.f);
          std::fill(ds.begin(), ds.end(), 0.f);
          gemm_acc(nq, kTileK, D, hd.q + q0 * hd.stride, hd.stride, 1, kt.data() + k0, ld,
                   p.data(), kTileK);  // scores
          gemm_acc(nq, kTileK, D, dO + q0 * C, C, 1, vt.data() + k0, ld, ds.data(),
                   kTileK);  // dP
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = q0 + r;
            const int64_t j0 = std::max<int64_t>(first_key(i, window) - k0, 0);
            const int64_t j1 = std::min<int64_t>(i + 1 - k0, nk);
            float* pr = p.data() + r * kTileK;
            float* dsr = ds.data() + r * kTileK;
            const float lse_i = row_lse[i], delta_i = delta[r];
            if constexpr (kDrop) {  // p -> p * z for dV; dP (dropped) -> z * dP; z = M * scale
              const hash::Dropout d = drop;  // a local copy: the loop vectorises
              const uint64_t base = static_cast<uint64_t>((bh * T + i) * T + k0);
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) {
                const bool visible = j >= j0 && j < j1;
                const float pj = visible ? fast_exp(pr[j] * scale - lse_i) : 0.f;
                const float z = d.keep(base + j) ? d.scale : 0.f;
                pr[j] = pj * z;
                dsr[j] = pj * (dsr[j] * z - delta_i) * scale;
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) {
                const bool visible = j >= j0 && j < j1;
                const float pj = visible ? fast_exp(pr[j] * scale - lse_i) : 0.f;
                pr[j] = pj;
                dsr[j] = pj * (dsr[j] - delta_i) * scale;
              }
            }
          }
          // dV[k0:k0+nk] += P^T dO ;  dK[k0:k0+nk] += dS^T Q ;  dQ += dS K[k0:k0+nk]
          gemm_acc(nk, D, nq, p.data(), 1, kTileK, dO + q0 * C, C, dv.data() + k0 * D, D);
          gemm_acc(nk, D, nq, ds.data(), 1, kTileK, hd.q + q0 * hd.stride, hd.stride,
                   dk.data() + k0 * D, D);
          gemm_acc(nq, D, nk, ds.data(), kTileK, 1, hd.k + k0 * hd.stride, hd.stride, dq.data(), D);
        }
        for (int64_t r = 0; r < nq; ++r)
          std::memcpy(dqkv_p + (b * T + q0 + r) * C3 + h * D, dq.data() + r * D, D * sizeof(float));
      }
      for (int64_t t = 0; t < T; ++t) {
        float* row = dqkv_p + (b * T + t) * C3 + h * D;
        std::memcpy(row + C, dk.data() + t * D, D * sizeof(float));
        std::memcpy(row + 2 * C, dv.data() + t * D, D * sizeof(float));
      }
    }
  }
}

}  // namespace

void attention_forward(const Tensor& qkv, int n_head, int window, double dropout_p,
                       uint64_t seed, uint64_t stream, Tensor& out, Tensor& lse) {
  if (dropout_p > 0.0)
    attention_forward_impl<true>(qkv, n_head, window, hash::dropout(dropout_p, seed, stream), out,
                                 lse);
  else
    attention_forward_impl<false>(qkv, n_head, window, hash::Dropout{}, out, lse);
}

void attention_backward(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head, int window, double dropout_p,
                        uint64_t seed, uint64_t stream, Tensor& dqkv) {
  if (dropout_p > 0.0)
    attention_backward_impl<true>(dout, qkv, out, lse, n_head, window,
                                  hash::dropout(dropout_p, seed, stream), dqkv);
  else
    attention_backward_impl<false>(dout, qkv, out, lse, n_head, window, hash::Dropout{}, dqkv);
}

}  // namespace cpu
}  // namespace gptcore
