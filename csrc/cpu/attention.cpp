// Causal (optionally banded) multi-head attention on the CPU, flash-style.
//
// Forward, per (batch, head): K is transposed once into a (D, T) panel so a query row's scores
// against a block of 64 keys are a broadcast-FMA loop over contiguous keys. Keys are visited
// block by block with an online softmax (running max m, running sum l, rescaled output
// accumulator), so no row of probabilities and no (T, T) matrix exists; only the per-row
// log-sum-exp is saved for backward.
//
// Backward, per (batch, head), query row by query row: the probabilities are recomputed from
// the saved log-sum-exp, then dV += p dO, dP = dO V^T, dS = p (dP - rowsum(dO * O)),
// dQ = dS K, dK += dS Q, all in the same sweep over the row's keys.
#include <vector>

#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {

namespace {

constexpr int64_t kKeyBlock = 64;

struct HeadView {
  const float* qkv;
  int64_t T, C3, D, q_off, k_off, v_off;
  const float* q(int64_t t) const { return qkv + t * C3 + q_off; }
  const float* k(int64_t t) const { return qkv + t * C3 + k_off; }
  const float* v(int64_t t) const { return qkv + t * C3 + v_off; }
};

HeadView head_view(const Tensor& qkv, int64_t b, int64_t h, int64_t D) {
  const int64_t T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3;
  return HeadView{qkv.data<float>() + b * T * C3, T, C3, D, h * D, C + h * D, 2 * C + h * D};
}

// panel[d * T + t] = rows(t)[d]: K or V of one head, transposed.
template <typename RowFn>
void transpose_head(float* panel, int64_t T, int64_t D, RowFn rows) {
  for (int64_t t = 0; t < T; ++t) {
    const float* r = rows(t);
    for (int64_t d = 0; d < D; ++d) panel[d * T + t] = r[d];
  }
}

inline int64_t first_key(int64_t i, int window) { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }

}  // namespace

void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int n_head, int window) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, D = C / n_head;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float* o = out.data<float>();
  float* lse_p = lse.data<float>();
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<size_t>(D * T)), q(D), acc(D), s(kKeyBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * n_head; ++bh) {
      const int64_t b = bh / n_head, h = bh % n_head;
      const HeadView hv = head_view(qkv, b, h, D);
      transpose_head(kt.data(), T, D, [&](int64_t t) { return hv.k(t); });
      for (int64_t i = 0; i < T; ++i) {
        const float* qi = hv.q(i);
        for (int64_t d = 0; d < D; ++d) q[d] = qi[d] * scale;
        std::fill(acc.begin(), acc.end(), 0.f);
        float m = -INFINITY, l = 0.f;
        for (int64_t j0 = first_key(i, window); j0 <= i; j0 += kKeyBlock) {
          const int64_t n = std::min<int64_t>(kKeyBlock, i + 1 - j0);
          float* sp = s.data();
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) sp[j] = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            const float qd = q[d];
            const float* kd = kt.data() + d * T + j0;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) sp[j] += qd * kd[j];
          }
          float bm = -INFINITY;
          for (int64_t j = 0; j < n; ++j) bm = std::fmax(bm, sp[j]);
          const float m_new = std::fmax(m, bm);
          const float corr = fast_exp(m - m_new);
          float bl = 0.f;
#pragma omp simd reduction(+ : bl)
          for (int64_t j = 0; j < n; ++j) {
            sp[j] = fast_exp(sp[j] - m_new);
            bl += sp[j];
          }
          l = l * corr + bl;
          m = m_new;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
          for (int64_t j = 0; j < n; ++j) {
            const float p = sp[j];
            const float* vj = hv.v(j0 + j);
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
          }
        }
        const float inv_l = 1.0f / l;
        float* oi = o + (b * T + i) * C + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] * inv_l;
        lse_p[(b * n_head + h) * T + i] = m + std::log(l);
      }
    }
  }
}

void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head, int window) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, D = C / n_head;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* dy = dout.data<float>();
  const float* y = out.data<float>();
  const float* lse_p = lse.data<float>();
  float* dq_all = dqkv.data<float>();
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<size_t>(D * T)), vt(static_cast<size_t>(D * T));
    std::vector<float> dk(static_cast<size_t>(T * D)), dv(static_cast<size_t>(T * D));
    std::vector<float> p(static_cast<size_t>(T)), ds(static_cast<size_t>(T)), dqi(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * n_head; ++bh) {
      const int64_t b = bh / n_head, h = bh % n_head;
      const HeadView hv = head_view(qkv, b, h, D);
      transpose_head(kt.data(), T, D, [&](int64_t t) { return hv.k(t); });
      transpose_head(vt.data(), T, D, [&](int64_t t) { return hv.v(t); });
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t i = 0; i < T; ++i) {
        const float* qi = hv.q(i);
        const float* doi = dy + (b * T + i) * C + h * D;
        const float* oi = y + (b * T + i) * C + h * D;
        const float row_lse = lse_p[(b * n_head + h) * T + i];
        float delta = 0.f;  // rowsum(dO * O) = sum_j p_j dP_j
#pragma omp simd reduction(+ : delta)
        for (int64_t d = 0; d < D; ++d) delta += doi[d] * oi[d];
        const int64_t j0 = first_key(i, window), n = i + 1 - j0;
        float* pp = p.data() + j0;
        float* dsp = ds.data() + j0;
        // scores and dP for all keys of the row, vectorised over keys
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          pp[j] = 0.f;
          dsp[j] = 0.f;
        }
        for (int64_t d = 0; d < D; ++d) {
          const float qd = qi[d] * scale, dod = doi[d];
          const float* kd = kt.data() + d * T + j0;
          const float* vd = vt.data() + d * T + j0;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            pp[j] += qd * kd[j];
            dsp[j] += dod * vd[j];
          }
        }
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          pp[j] = fast_exp(pp[j] - row_lse);
          dsp[j] = pp[j] * (dsp[j] - delta) * scale;
        }
        // dQ_i = dS K; dK_j += dS_j Q_i; dV_j += p_j dO_i
        std::fill(dqi.begin(), dqi.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const float dsj = dsp[j], pj = pp[j];
          const float* kj = hv.k(j0 + j);
          float* dkj = dk.data() + (j0 + j) * D;
          float* dvj = dv.data() + (j0 + j) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] += dsj * kj[d];
            dkj[d] += dsj * qi[d];
            dvj[d] += pj * doi[d];
          }
        }
        float* dq_row = dq_all + (b * T + i) * C3 + h * D;
        for (int64_t d = 0; d < D; ++d) dq_row[d] = dqi[d];
      }
      for (int64_t t = 0; t < T; ++t) {
        float* row = dq_all + (b * T + t) * C3;
        for (int64_t d = 0; d < D; ++d) {
          row[C + h * D + d] = dk[t * D + d];
          row[2 * C + h * D + d] = dv[t * D + d];
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace gptcore
