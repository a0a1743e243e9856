// Causal (optionally banded) multi-head attention on the GPU, flash-style: tiles of queries
// against tiles of keys with an online softmax, so no (T, T) matrix is ever stored; forward
// keeps only the per-row log-sum-exp, from which backward recomputes the probabilities.
//
// Two implementations of the same function:
//   * tensor cores (bf16, head dim 64 or 128, 16-byte aligned buffers): mma.sync m16n8k16.
//     Forward: a block of 4 warps owns 64 queries (16 per warp, Q held in registers); K and V
//     tiles of 64 keys stream through shared memory in a cp.async double buffer; S = Q K^T and
//     the online softmax stay in registers, and P is re-packed from the accumulator layout
//     straight into the A operand of O += P V (no trip through shared memory).
//     Backward is deterministic (no atomics): one kernel owns a block of 64 keys and walks the
//     queries that see them, accumulating dK and dV in registers (S^T = K Q^T, dP^T = V dO^T,
//     dV += P^T dO, dK += dS^T Q); a second kernel owns a block of queries and walks their keys
//     for dQ += dS K. Recomputing S twice costs more FLOPs than an atomic dQ but gives the same
//     bits on every run. delta = rowsum(dO * O) is one small kernel before them.
//   * SIMT fp32 arithmetic (float32 inputs -- fp32 accuracy is the point there -- and any other
//     head dim up to 256): the same tiling with warps, one query (or key) per lane.
// A window w > 0 restricts query t to keys s with t - w < s <= t (GPT-3's banded layers); the
// loops skip tiles entirely outside the band.
//
// Attention dropout (dropout_p > 0) is fused into every kernel, never stored: the keep bit of
// probability (b, h, t, s) is regenerated from core/hash.h at index ((b*H + h)*T + t)*T + s
// (bit-identical to the CPU and the reference). Forward drops and rescales P after the row sum
// (lse stays that of the un-dropped softmax) and before O += P V; backward uses z = M * scale on
// P for dV and on dP = dO V^T for dS = P * (z dP - delta), as FlashAttention-2 does. The
// kernels are templates on dropout on/off: dropout_p == 0 runs the dropout-free instantiations,
// the very code (and register allocation) of the kernels without dropout.
#include <cmath>
#include <initializer_list>
#include <string>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ bool visible(int q, int k, int T, int window) {
  return k <= q && q < T && (window == 0 || k > q - window);
}

// delta[b, h, t] = sum_d dout[b, t, h*D + d] * out[b, t, h*D + d]; one warp per (b, t, h).
template <typename T>
__global__ void attn_delta_kernel(float* delta, const T* dout, const T* out, int B, int T_, int H,
                                  int D) {
  const int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= int64_t(B) * T_ * H) return;
  const int h = static_cast<int>(w % H);
  const int64_t bt = w / H;
  const int64_t off = bt * int64_t(H) * D + int64_t(h) * D;
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s += to_f(dout[off + d]) * to_f(out[off + d]);
  s = warp_sum(s);
  if (lane == 0) {
    const int64_t b = bt / T_, t = bt % T_;
    delta[(b * H + h) * T_ + t] = s;
  }
}

// =============================================================================================
// SIMT path
// =============================================================================================
constexpr int kSimtQ = 16;   // queries (or keys) per block: 4 warps x 4
constexpr int kSimtK = 32;   // keys (or queries) per tile: one per lane

// Where one head's queries, keys and values live: row r of batch b, head h is at
// base + b * bstride + h * hstride + r * stride (all three in qkv for self-attention; the
// layout also describes a (B, H, Tmax, D) cache).
template <typename T>
struct HeadRows {
  const T* base;
  int64_t bstride, hstride, stride;
  __device__ __forceinline__ const T* row(int b, int h, int64_t r) const {
    return base + b * bstride + h * hstride + r * stride;
  }
};

// Forward for 16 queries per block (4 per warp, one key per lane). Queries are rows 0..Tq-1 of
// q at absolute positions q_pos..q_pos+Tq-1; query t sees keys j <= q_pos + t (and, with a
// window, j > q_pos + t - window).
template <typename T, int DPL, bool DROP>
__global__ void __launch_bounds__(128)
attn_fwd_simt(T* out, float* lse, HeadRows<T> qs, HeadRows<T> ks, HeadRows<T> vs, int Tq,
              int q_pos, int H, int D, int window, float scale, hash::Dropout drop) {
  extern __shared__ float sm[];
  const int DS = D + 1;  // padded rows: lanes reading different rows hit different banks
  float* Qs = sm;
  float* Ks = Qs + kSimtQ * DS;
  float* Vs = Ks + kSimtK * DS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int q0 = blockIdx.x * kSimtQ;
  const int64_t C = int64_t(H) * D;
  for (int e = threadIdx.x; e < kSimtQ * D; e += blockDim.x) {
    const int r = e / D, d = e % D, t = q0 + r;
    Qs[r * DS + d] = t < Tq ? to_f(qs.row(b, h, t)[d]) * scale : 0.f;
  }
  float m[4], l[4], acc[4][DPL];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[i][j] = 0.f;
  }
  const int kstart = window ? max(0, q_pos + q0 - window + 1) : 0;
  const int kend = q_pos + min(Tq - 1, q0 + kSimtQ - 1);
  for (int k0 = kstart; k0 <= kend; k0 += kSimtK) {
    __syncthreads();
    for (int e = threadIdx.x; e < kSimtK * D; e += blockDim.x) {
      const int r = e / D, d = e % D, j = k0 + r;
      Ks[r * DS + d] = j <= kend ? to_f(ks.row(b, h, j)[d]) : 0.f;
      Vs[r * DS + d] = j <= kend ? to_f(vs.row(b, h, j)[d]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int qi = 0; qi < 4; ++qi) {
      const int qr = warp * 4 + qi, t = q0 + qr;
      if (t >= Tq) continue;  // warp-uniform
      const int j = k0 + lane, qa = q_pos + t;
      const bool ok = j <= qa && (window == 0 || j > qa - window);
      float s = -INFINITY;
      if (ok) {
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot = fmaf(Qs[qr * DS + d], Ks[lane * DS + d], dot);
        s = dot;
      }
      const float mt = warp_max(s);
      if (mt == -INFINITY) continue;  // no visible key in this tile for this query
      const float m_new = fmaxf(m[qi], mt);
      const float corr = __expf(m[qi] - m_new);
      float p = ok ? __expf(s - m_new) : 0.f;
      l[qi] = l[qi] * corr + warp_sum(p);
      if constexpr (DROP)  // self-attention only (q_pos == 0, Tq keys): index ((bh*T + t)*T + j)
        p = drop.keep(uint64_t((int64_t(bh) * Tq + t) * Tq + j)) ? p * drop.scale : 0.f;
#pragma unroll
      for (int dd = 0; dd < DPL; ++dd) acc[qi][dd] *= corr;
      for (int jj = 0; jj < kSimtK; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
        for (int dd = 0; dd < DPL; ++dd) {
          const int d = lane + 32 * dd;
          if (d < D) acc[qi][dd] = fmaf(pj, Vs[jj * DS + d], acc[qi][dd]);
        }
      }
      m[qi] = m_new;
    }
  }
#pragma unroll
  for (int qi = 0; qi < 4; ++qi) {
    const int t = q0 + warp * 4 + qi;
    if (t >= Tq) continue;
    const float inv = 1.f / l[qi];
    T* o = out + (int64_t(b) * Tq + t) * C + int64_t(h) * D;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) {
      const int d = lane + 32 * dd;
      if (d < D) o[d] = from_f<T>(acc[qi][dd] * inv);
    }
    if (lse && lane == 0) lse[int64_t(bh) * Tq + t] = m[qi] + logf(l[qi]);
  }
}

// dK, dV for 16 keys per block, walking the queries that see them (one query per lane).
template <typename T, int DPL, bool DROP>
__global__ void __launch_bounds__(128)
attn_bwd_kv_simt(T* dqkv, const T* qkv, const T* dout, const float* lse, const float* delta,
                 int T_, int H, int D, int window, float scale, hash::Dropout drop) {
  extern __shared__ float sm[];
  const int DS = D + 1;
  float* Kb = sm;
  float* Vb = Kb + kSimtQ * DS;
  float* Qs = Vb + kSimtQ * DS;
  float* dOs = Qs + kSimtK * DS;
  float* Ls = dOs + kSimtK * DS;
  float* Dl = Ls + kSimtK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int k0 = blockIdx.x * kSimtQ;
  const int64_t C = int64_t(H) * D, C3 = 3 * C;
  const T* base = qkv + int64_t(b) * T_ * C3 + int64_t(h) * D;
  const T* dbase = dout + int64_t(b) * T_ * C + int64_t(h) * D;
  const float* lrow = lse + int64_t(bh) * T_;
  const float* drow = delta + int64_t(bh) * T_;
  for (int e = threadIdx.x; e < kSimtQ * D; e += blockDim.x) {
    const int r = e / D, d = e % D, j = k0 + r;
    Kb[r * DS + d] = j < T_ ? to_f(base[j * C3 + C + d]) : 0.f;
    Vb[r * DS + d] = j < T_ ? to_f(base[j * C3 + 2 * C + d]) : 0.f;
  }
  float dk[4][DPL], dv[4][DPL];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < DPL; ++j) dk[i][j] = dv[i][j] = 0.f;
  const int qend = window ? min(T_ - 1, k0 + kSimtQ - 1 + window - 1) : T_ - 1;
  for (int q0 = k0; q0 <= qend; q0 += kSimtK) {
    __syncthreads();
    for (int e = threadIdx.x; e < kSimtK * D; e += blockDim.x) {
      const int r = e / D, d = e % D, t = q0 + r;
      Qs[r * DS + d] = t < T_ ? to_f(base[t * C3 + d]) : 0.f;
      dOs[r * DS + d] = t < T_ ? to_f(dbase[t * C + d]) : 0.f;
    }
    if (threadIdx.x < kSimtK) {
      const int t = q0 + threadIdx.x;
      Ls[threadIdx.x] = t < T_ ? lrow[t] : 0.f;
      Dl[threadIdx.x] = t < T_ ? drow[t] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int ki = 0; ki < 4; ++ki) {
      const int kr = warp * 4 + ki, j = k0 + kr;
      if (j >= T_) continue;  // warp-uniform
      const int i = q0 + lane;
      float p = 0.f, ds = 0.f;
      if (visible(i, j, T_, window)) {
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          s = fmaf(Qs[lane * DS + d], Kb[kr * DS + d], s);
          dp = fmaf(dOs[lane * DS + d], Vb[kr * DS + d], dp);
        }
        p = __expf(s * scale - Ls[lane]);
        if constexpr (DROP) {  // z = M * scale on P (for dV) and on dP
          const float z = drop.keep(uint64_t((int64_t(bh) * T_ + i) * T_ + j)) ? drop.scale : 0.f;
          ds = p * (dp * z - Dl[lane]);
          p *= z;
        } else {
          ds = p * (dp - Dl[lane]);
        }
      }
      for (int ii = 0; ii < kSimtK; ++ii) {
        const float pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
        for (int dd = 0; dd < DPL; ++dd) {
          const int d = lane + 32 * dd;
          if (d < D) {
            dv[ki][dd] = fmaf(pi, dOs[ii * DS + d], dv[ki][dd]);
            dk[ki][dd] = fmaf(dsi, Qs[ii * DS + d], dk[ki][dd]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int ki = 0; ki < 4; ++ki) {
    const int j = k0 + warp * 4 + ki;
    if (j >= T_) continue;
    T* row = dqkv + (int64_t(b) * T_ + j) * C3 + int64_t(h) * D;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) {
      const int d = lane + 32 * dd;
      if (d < D) {
        row[C + d] = from_f<T>(dk[ki][dd] * scale);
        row[2 * C + d] = from_f<T>(dv[ki][dd]);
      }
    }
  }
}

// dQ for 16 queries per block, walking their keys (one key per lane).
template <typename T, int DPL, bool DROP>
__global__ void __launch_bounds__(128)
attn_bwd_q_simt(T* dqkv, const T* qkv, const T* dout, const float* lse, const float* delta,
                int T_, int H, int D, int window, float scale, hash::Dropout drop) {
  extern __shared__ float sm[];
  const int DS = D + 1;
  float* Qs = sm;
  float* dOs = Qs + kSimtQ * DS;
  float* Ks = dOs + kSimtQ * DS;
  float* Vs = Ks + kSimtK * DS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int q0 = blockIdx.x * kSimtQ;
  const int64_t C = int64_t(H) * D, C3 = 3 * C;
  const T* base = qkv + int64_t(b) * T_ * C3 + int64_t(h) * D;
  const T* dbase = dout + int64_t(b) * T_ * C + int64_t(h) * D;
  for (int e = threadIdx.x; e < kSimtQ * D; e += blockDim.x) {
    const int r = e / D, d = e % D, t = q0 + r;
    Qs[r * DS + d] = t < T_ ? to_f(base[t * C3 + d]) : 0.f;
    dOs[r * DS + d] = t < T_ ? to_f(dbase[t * C + d]) : 0.f;
  }
  float L[4], Dl[4], dq[4][DPL];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = q0 + warp * 4 + i;
    L[i] = t < T_ ? lse[int64_t(bh) * T_ + t] : 0.f;
    Dl[i] = t < T_ ? delta[int64_t(bh) * T_ + t] : 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) dq[i][j] = 0.f;
  }
  const int kstart = window ? max(0, q0 - window + 1) : 0;
  const int kend = min(T_ - 1, q0 + kSimtQ - 1);
  for (int k0 = kstart; k0 <= kend; k0 += kSimtK) {
    __syncthreads();
    for (int e = threadIdx.x; e < kSimtK * D; e += blockDim.x) {
      const int r = e / D, d = e % D, j = k0 + r;
      Ks[r * DS + d] = j < T_ ? to_f(base[j * C3 + C + d]) : 0.f;
      Vs[r * DS + d] = j < T_ ? to_f(base[j * C3 + 2 * C + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int qi = 0; qi < 4; ++qi) {
      const int qr = warp * 4 + qi, t = q0 + qr;
      if (t >= T_) continue;
      const int j = k0 + lane;
      float ds = 0.f;
      if (visible(t, j, T_, window)) {
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          s = fmaf(Qs[qr * DS + d], Ks[lane * DS + d], s);
          dp = fmaf(dOs[qr * DS + d], Vs[lane * DS + d], dp);
        }
        const float p = __expf(s * scale - L[qi]);
        if constexpr (DROP)
          dp *= drop.keep(uint64_t((int64_t(bh) * T_ + t) * T_ + j)) ? drop.scale : 0.f;
        ds = p * (dp - Dl[qi]);
      }
      for (int jj = 0; jj < kSimtK; ++jj) {
        const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int dd = 0; dd < DPL; ++dd) {
          const int d = lane + 32 * dd;
          if (d < D) dq[qi][dd] = fmaf(dsj, Ks[jj * DS + d], dq[qi][dd]);
        }
      }
    }
  }
#pragma unroll
  for (int qi = 0; qi < 4; ++qi) {
    const int t = q0 + warp * 4 + qi;
    if (t >= T_) continue;
    T* row = dqkv + (int64_t(b) * T_ + t) * C3 + int64_t(h) * D;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) {
      const int d = lane + 32 * dd;
      if (d < D) row[d] = from_f<T>(dq[qi][dd] * scale);
    }
  }
}

// =============================================================================================
// Tensor-core path (bf16, D = 64 or 128)
// =============================================================================================

// ROWS rows of one head (D bf16 each, rows `row_stride` apart) into shared memory rows of
// D + 8 elements; rows at or past T are zero-filled.
template <int D, int ROWS>
__device__ __forceinline__ void load_rows_async(bf16* s, const bf16* g, int64_t row_stride,
                                                int row0, int T) {
  constexpr int CPR = D / 8, SD = D + 8;
  for (int i = threadIdx.x; i < ROWS * CPR; i += 128) {
    const int r = i / CPR, ch = i % CPR, t = row0 + r;
    const bool ok = t < T;
    cp_async16(s + r * SD + ch * 8, ok ? g + int64_t(t) * row_stride + ch * 8 : g, ok);
  }
}

// A operand (16 rows x 16 cols at (row0, col0)) from a K-major shared tile with SD columns.
template <int SD>
__device__ __forceinline__ void lds_a(uint32_t (&a)[4], const bf16* s, int row0, int col0,
                                      int lane) {
  ldmatrix_x4(a, s + (row0 + (lane & 15)) * SD + col0 + (lane >> 4) * 8);
}
// B operands of two n8 tiles (n0..n0+15) at depth k0, tile stored [n][k] (K-major).
template <int SD>
__device__ __forceinline__ void lds_b_nk(uint32_t (&r)[4], const bf16* s, int n0, int k0,
                                         int lane) {
  ldmatrix_x4(r, s + (n0 + (lane & 7) + (lane >> 4) * 8) * SD + k0 + ((lane >> 3) & 1) * 8);
}
// B operands of two n8 tiles (n0..n0+15) at depth k0, tile stored [k][n] (MN-major).
template <int SD>
__device__ __forceinline__ void lds_b_kn(uint32_t (&r)[4], const bf16* s, int n0, int k0,
                                         int lane) {
  ldmatrix_x4_trans(r, s + (k0 + (lane & 15)) * SD + n0 + (lane >> 4) * 8);
}
// Accumulator tiles 2kb and 2kb+1 (16 columns) as the bf16 A operand of the next product.
template <int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[N][4], int kb) {
  a[0] = pack_bf16x2(c[2 * kb][0], c[2 * kb][1]);
  a[1] = pack_bf16x2(c[2 * kb][2], c[2 * kb][3]);
  a[2] = pack_bf16x2(c[2 * kb + 1][0], c[2 * kb + 1][1]);
  a[3] = pack_bf16x2(c[2 * kb + 1][2], c[2 * kb + 1][3]);
}

template <int D>
struct FwdTc {
  static constexpr int BQ = 64, BKV = 64, SD = D + 8;
  static constexpr int SMEM = (BQ + 4 * BKV) * SD * 2;
};

template <int D, bool DROP>
__global__ void __launch_bounds__(128)
attn_fwd_tc(bf16* out, float* lse, const bf16* qkv, int T, int H, int window, float scale_log2,
            hash::Dropout drop) {
  using Cfg = FwdTc<D>;
  constexpr int BQ = Cfg::BQ, BKV = Cfg::BKV, SD = Cfg::SD, KD = D / 16, ND = D / 8;
  constexpr int NS = BKV / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* Ks = Qs + BQ * SD;
  bf16* Vs = Ks + 2 * BKV * SD;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // heaviest (last) query tiles first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t C = int64_t(H) * D, C3 = 3 * C;
  const bf16* qb = qkv + int64_t(b) * T * C3 + int64_t(h) * D;
  const bf16* kb = qb + C;
  const bf16* vb = qb + 2 * C;
  const int kv_first = (window ? max(0, q0 - window + 1) : 0) / BKV;
  const int kv_last = min(q0 + BQ - 1, T - 1) / BKV;

  load_rows_async<D, BQ>(Qs, qb, C3, q0, T);
  load_rows_async<D, BKV>(Ks, kb, C3, kv_first * BKV, T);
  load_rows_async<D, BKV>(Vs, vb, C3, kv_first * BKV, T);
  cp_async_commit();

  const int r_lo = q0 + warp * 16 + (lane >> 2), r_hi = r_lo + 8;
  uint32_t qf[KD][4];
  float o[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int kt = kv_first; kt <= kv_last; ++kt) {
    const int buf = (kt - kv_first) & 1;
    if (kt < kv_last) {
      load_rows_async<D, BKV>(Ks + (buf ^ 1) * BKV * SD, kb, C3, (kt + 1) * BKV, T);
      load_rows_async<D, BKV>(Vs + (buf ^ 1) * BKV * SD, vb, C3, (kt + 1) * BKV, T);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (kt == kv_first) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) lds_a<SD>(qf[kk], Qs, warp * 16, kk * 16, lane);
    }
    const bf16* Kt = Ks + buf * BKV * SD;
    const bf16* Vt = Vs + buf * BKV * SD;

    // S = Q K^T (16 x 64 per warp)
    float s[NS][4];
#pragma unroll
    for (int i = 0; i < NS; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t r[4];
        lds_b_nk<SD>(r, Kt, np * 16, kk * 16, lane);
        mma_bf16_16816(s[2 * np], qf[kk], r[0], r[1]);
        mma_bf16_16816(s[2 * np + 1], qf[kk], r[2], r[3]);
      }
    }
    // scale into the log2 domain; mask the tiles that cross the diagonal or the band edge
    const int k0 = kt * BKV;
    const bool need_mask = (k0 + BKV - 1 > q0) || (window > 0 && k0 <= q0 + BQ - 1 - window);
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (need_mask) {
          const int q = e < 2 ? r_lo : r_hi, k = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          if (!visible(q, k, T, window)) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    // online softmax: rows r_lo (elements 0,1) and r_hi (2,3); a row lives in a lane quad
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float mu[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      mu[i] = mx[i] == -INFINITY ? 0.f : mx[i];  // a fully masked row stays at p = 0
      const float corr = exp2f(m[i] - mu[i]);
      l[i] *= corr;
#pragma unroll
      for (int dt = 0; dt < ND; ++dt) {
        o[dt][2 * i] *= corr;
        o[dt][2 * i + 1] *= corr;
      }
      m[i] = mx[i];
    }
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - mu[0]);
      s[nt][1] = exp2f(s[nt][1] - mu[0]);
      s[nt][2] = exp2f(s[nt][2] - mu[1]);
      s[nt][3] = exp2f(s[nt][3] - mu[1]);
      l[0] += s[nt][0] + s[nt][1];
      l[1] += s[nt][2] + s[nt][3];
    }
    if constexpr (DROP) {  // after the row sums: lse stays that of the un-dropped softmax
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int q = e < 2 ? r_lo : r_hi, k = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          const uint64_t idx = uint64_t((int64_t(bh) * T + q) * T + k);
          s[nt][e] = drop.keep(idx) ? s[nt][e] * drop.scale : 0.f;
        }
    }
    // O += P V
#pragma unroll
    for (int kb2 = 0; kb2 < BKV / 16; ++kb2) {
      uint32_t a[4];
      acc_to_a(a, s, kb2);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t r[4];
        lds_b_kn<SD>(r, Vt, np * 16, kb2 * 16, lane);
        mma_bf16_16816(o[2 * np], a, r[0], r[1]);
        mma_bf16_16816(o[2 * np + 1], a, r[2], r[3]);
      }
    }
    __syncthreads();  // every warp is done with `buf` before it is refilled
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = i == 0 ? r_lo : r_hi;
    if (r >= T) continue;
    bf16* orow = out + (int64_t(b) * T + r) * C + int64_t(h) * D;
#pragma unroll
    for (int dt = 0; dt < ND; ++dt) {
      const int d = dt * 8 + (lane & 3) * 2;
      *reinterpret_cast<__nv_bfloat162*>(orow + d) =
          __floats2bfloat162_rn(o[dt][2 * i] * inv[i], o[dt][2 * i + 1] * inv[i]);
    }
    if ((lane & 3) == 0) lse[int64_t(bh) * T + r] = (m[i] + log2f(l[i])) * kLn2;
  }
}

template <int D>
struct BwdKvTc {
  static constexpr int BKV = 64, BQ = D <= 64 ? 64 : 32, SD = D + 8;
  static constexpr int SMEM = (2 * BKV + 4 * BQ) * SD * 2 + 4 * BQ * 4;
};

// dK, dV of 64 keys per block (16 per warp), walking the query tiles that see them.
template <int D, bool DROP>
__global__ void __launch_bounds__(128)
attn_bwd_kv_tc(bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse,
               const float* delta, int T, int H, int window, float scale, float scale_log2,
               hash::Dropout drop) {
  using Cfg = BwdKvTc<D>;
  constexpr int BQ = Cfg::BQ, BKV = Cfg::BKV, SD = Cfg::SD, KD = D / 16, ND = D / 8;
  constexpr int NS = BQ / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* Vs = Ks + BKV * SD;
  bf16* Qs = Vs + BKV * SD;      // [2][BQ][SD]
  bf16* dOs = Qs + 2 * BQ * SD;  // [2][BQ][SD]
  float* Ls = reinterpret_cast<float*>(dOs + 2 * BQ * SD);  // [2][BQ], lse * log2(e)
  float* Dls = Ls + 2 * BQ;                                   // [2][BQ]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int k0 = blockIdx.x * BKV;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t C = int64_t(H) * D, C3 = 3 * C;
  const bf16* qb = qkv + int64_t(b) * T * C3 + int64_t(h) * D;
  const bf16* dob = dout + int64_t(b) * T * C + int64_t(h) * D;
  const float* lrow = lse + int64_t(bh) * T;
  const float* drow = delta + int64_t(bh) * T;
  const int q_first = k0;  // causal: no query before the first key sees it
  const int q_last = window ? min(T - 1, k0 + BKV - 1 + window - 1) : T - 1;
  const int nq = (q_last - q_first) / BQ + 1;

  auto load_q_tile = [&](int buf, int q0) {
    load_rows_async<D, BQ>(Qs + buf * BQ * SD, qb, C3, q0, T);
    load_rows_async<D, BQ>(dOs + buf * BQ * SD, dob, C, q0, T);
    if (threadIdx.x < BQ) {
      const int t = q0 + threadIdx.x;
      Ls[buf * BQ + threadIdx.x] = t < T ? lrow[t] * kLog2e : 0.f;
      Dls[buf * BQ + threadIdx.x] = t < T ? drow[t] : 0.f;
    }
  };
  load_rows_async<D, BKV>(Ks, qb + C, C3, k0, T);
  load_rows_async<D, BKV>(Vs, qb + 2 * C, C3, k0, T);
  load_q_tile(0, q_first);
  cp_async_commit();

  const int kr_lo = k0 + warp * 16 + (lane >> 2), kr_hi = kr_lo + 8;
  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int it = 0; it < nq; ++it) {
    const int q0 = q_first + it * BQ, buf = it & 1;
    if (it + 1 < nq) load_q_tile(buf ^ 1, q0 + BQ);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* Q = Qs + buf * BQ * SD;
    const bf16* dO = dOs + buf * BQ * SD;
    const float* L = Ls + buf * BQ;
    const float* Dl = Dls + buf * BQ;

    // S^T = K Q^T and dP^T = V dO^T (16 keys x BQ queries per warp)
    float st[NS][4], dpt[NS][4];
#pragma unroll
    for (int i = 0; i < NS; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t ka[4], va[4];
      lds_a<SD>(ka, Ks, warp * 16, kk * 16, lane);
      lds_a<SD>(va, Vs, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t r[4];
        lds_b_nk<SD>(r, Q, np * 16, kk * 16, lane);
        mma_bf16_16816(st[2 * np], ka, r[0], r[1]);
        mma_bf16_16816(st[2 * np + 1], ka, r[2], r[3]);
        lds_b_nk<SD>(r, dO, np * 16, kk * 16, lane);
        mma_bf16_16816(dpt[2 * np], va, r[0], r[1]);
        mma_bf16_16816(dpt[2 * np + 1], va, r[2], r[3]);
      }
    }
    // P^T = exp(S^T * scale - lse), dS^T = P^T * (dP^T - delta)
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + (lane & 3) * 2 + (e & 1);
        const int k = e < 2 ? kr_lo : kr_hi;
        const float p = visible(q0 + qi, k, T, window) ? exp2f(st[nt][e] * scale_log2 - L[qi]) : 0.f;
        if constexpr (DROP) {  // z = M * scale on P^T (for dV) and on dP^T
          const uint64_t idx = uint64_t((int64_t(bh) * T + q0 + qi) * T + k);
          const float z = drop.keep(idx) ? drop.scale : 0.f;
          st[nt][e] = p * z;
          dpt[nt][e] = p * (dpt[nt][e] * z - Dl[qi]);
        } else {
          st[nt][e] = p;
          dpt[nt][e] = p * (dpt[nt][e] - Dl[qi]);
        }
      }
    // dV += P^T dO, dK += dS^T Q
#pragma unroll
    for (int kb2 = 0; kb2 < BQ / 16; ++kb2) {
      uint32_t pa[4], sa[4];
      acc_to_a(pa, st, kb2);
      acc_to_a(sa, dpt, kb2);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t r[4];
        lds_b_kn<SD>(r, dO, np * 16, kb2 * 16, lane);
        mma_bf16_16816(dv[2 * np], pa, r[0], r[1]);
        mma_bf16_16816(dv[2 * np + 1], pa, r[2], r[3]);
        lds_b_kn<SD>(r, Q, np * 16, kb2 * 16, lane);
        mma_bf16_16816(dk[2 * np], sa, r[0], r[1]);
        mma_bf16_16816(dk[2 * np + 1], sa, r[2], r[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int k = i == 0 ? kr_lo : kr_hi;
    if (k >= T) continue;
    bf16* row = dqkv + (int64_t(b) * T + k) * C3 + int64_t(h) * D;
#pragma unroll
    for (int dt = 0; dt < ND; ++dt) {
      const int d = dt * 8 + (lane & 3) * 2;
      *reinterpret_cast<__nv_bfloat162*>(row + C + d) =
          __floats2bfloat162_rn(dk[dt][2 * i] * scale, dk[dt][2 * i + 1] * scale);
      *reinterpret_cast<__nv_bfloat162*>(row + 2 * C + d) =
          __floats2bfloat162_rn(dv[dt][2 * i], dv[dt][2 * i + 1]);
    }
  }
}

template <int D>
struct BwdQTc {
  static constexpr int BQ = 64, BKV = D <= 64 ? 64 : 32, SD = D + 8;
  static constexpr int SMEM = (2 * BQ + 4 * BKV) * SD * 2;
};

// dQ of 64 queries per block (16 per warp), walking their key tiles.
template <int D, bool DROP>
__global__ void __launch_bounds__(128)
attn_bwd_q_tc(bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse,
              const float* delta, int T, int H, int window, float scale, float scale_log2,
              hash::Dropout drop) {
  using Cfg = BwdQTc<D>;
  constexpr int BQ = Cfg::BQ, BKV = Cfg::BKV, SD = Cfg::SD, KD = D / 16, ND = D / 8;
  constexpr int NS = BKV / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dOs = Qs + BQ * SD;
  bf16* Ks = dOs + BQ * SD;       // [2][BKV][SD]
  bf16* Vs = Ks + 2 * BKV * SD;   // [2][BKV][SD]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t C = int64_t(H) * D, C3 = 3 * C;
  const bf16* qb = qkv + int64_t(b) * T * C3 + int64_t(h) * D;
  const bf16* kb = qb + C;
  const bf16* vb = qb + 2 * C;
  const bf16* dob = dout + int64_t(b) * T * C + int64_t(h) * D;
  const int kv_first = (window ? max(0, q0 - window + 1) : 0) / BKV;
  const int kv_last = min(q0 + BQ - 1, T - 1) / BKV;

  load_rows_async<D, BQ>(Qs, qb, C3, q0, T);
  load_rows_async<D, BQ>(dOs, dob, C, q0, T);
  load_rows_async<D, BKV>(Ks, kb, C3, kv_first * BKV, T);
  load_rows_async<D, BKV>(Vs, vb, C3, kv_first * BKV, T);
  cp_async_commit();

  const int r_lo = q0 + warp * 16 + (lane >> 2), r_hi = r_lo + 8;
  float L[2], Dl[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = i == 0 ? r_lo : r_hi;
    L[i] = r < T ? lse[int64_t(bh) * T + r] * kLog2e : 0.f;
    Dl[i] = r < T ? delta[int64_t(bh) * T + r] : 0.f;
  }
  float dq[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;

  for (int kt = kv_first; kt <= kv_last; ++kt) {
    const int buf = (kt - kv_first) & 1;
    if (kt < kv_last) {
      load_rows_async<D, BKV>(Ks + (buf ^ 1) * BKV * SD, kb, C3, (kt + 1) * BKV, T);
      load_rows_async<D, BKV>(Vs + (buf ^ 1) * BKV * SD, vb, C3, (kt + 1) * BKV, T);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* Kt = Ks + buf * BKV * SD;
    const bf16* Vt = Vs + buf * BKV * SD;
    float s[NS][4], dp[NS][4];
#pragma unroll
    for (int i = 0; i < NS; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t qa[4], da[4];
      lds_a<SD>(qa, Qs, warp * 16, kk * 16, lane);
      lds_a<SD>(da, dOs, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t r[4];
        lds_b_nk<SD>(r, Kt, np * 16, kk * 16, lane);
        mma_bf16_16816(s[2 * np], qa, r[0], r[1]);
        mma_bf16_16816(s[2 * np + 1], qa, r[2], r[3]);
        lds_b_nk<SD>(r, Vt, np * 16, kk * 16, lane);
        mma_bf16_16816(dp[2 * np], da, r[0], r[1]);
        mma_bf16_16816(dp[2 * np + 1], da, r[2], r[3]);
      }
    }
    const int k0 = kt * BKV;
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = e < 2 ? r_lo : r_hi, k = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
        const float p = visible(q, k, T, window) ? exp2f(s[nt][e] * scale_log2 - L[e >> 1]) : 0.f;
        float dpe = dp[nt][e];
        if constexpr (DROP)
          dpe *= drop.keep(uint64_t((int64_t(bh) * T + q) * T + k)) ? drop.scale : 0.f;
        s[nt][e] = p * (dpe - Dl[e >> 1]);
      }
#pragma unroll
    for (int kb2 = 0; kb2 < BKV / 16; ++kb2) {
      uint32_t sa[4];
      acc_to_a(sa, s, kb2);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t r[4];
        lds_b_kn<SD>(r, Kt, np * 16, kb2 * 16, lane);
        mma_bf16_16816(dq[2 * np], sa, r[0], r[1]);
        mma_bf16_16816(dq[2 * np + 1], sa, r[2], r[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = i == 0 ? r_lo : r_hi;
    if (r >= T) continue;
    bf16* row = dqkv + (int64_t(b) * T + r) * C3 + int64_t(h) * D;
#pragma unroll
    for (int dt = 0; dt < ND; ++dt) {
      const int d = dt * 8 + (lane & 3) * 2;
      *reinterpret_cast<__nv_bfloat162*>(row + d) =
          __floats2bfloat162_rn(dq[dt][2 * i] * scale, dq[dt][2 * i + 1] * scale);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------
template <typename K>
void set_smem(K kernel, size_t bytes, const char* name) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             name);
}

struct Shape {
  int B, T, H, D;
  int64_t C;
};

Shape shape_of(const Tensor& qkv, int n_head) {
  Shape s;
  s.B = static_cast<int>(qkv.size(0));
  s.T = static_cast<int>(qkv.size(1));
  s.C = qkv.size(2) / 3;
  s.H = n_head;
  s.D = static_cast<int>(s.C / n_head);
  return s;
}

bool use_tensor_cores(const Tensor& qkv, const Shape& s, std::initializer_list<const void*> ptrs) {
  if (qkv.dtype() != DType::bfloat16 || (s.D != 64 && s.D != 128)) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

int simt_dpl(int D) {
  if (D <= 32) return 1;
  if (D <= 64) return 2;
  if (D <= 128) return 4;
  if (D <= 256) return 8;
  throw ValueError("n_head: head dimension " + std::to_string(D) +
                   " is larger than the 256 the CUDA attention kernels support");
}

// Dropout settings of one call: `on` false runs the dropout-free paths.
struct Drop {
  bool on = false;
  hash::Dropout mask{};
};

template <typename T, int DPL>
void fwd_simt(T* out, float* lse, HeadRows<T> q, HeadRows<T> k, HeadRows<T> v, int B, int Tq,
              int q_pos, int H, int D, int window, const Drop& dr) {
  const size_t smem = size_t(kSimtQ + 2 * kSimtK) * (D + 1) * sizeof(float);
  auto kern = dr.on ? attn_fwd_simt<T, DPL, true> : attn_fwd_simt<T, DPL, false>;
  set_smem(kern, smem, "attn_fwd_simt (shared memory limit)");
  kern<<<dim3(ceil_div(Tq, kSimtQ), B * H), 128, smem, stream()>>>(
      out, lse, q, k, v, Tq, q_pos, H, D, window, 1.0f / std::sqrt(static_cast<float>(D)),
      dr.mask);
  GPTCORE_CHECK_LAUNCH("attn_fwd_simt");
}

template <typename T>
void fwd_simt_any(T* out, float* lse, HeadRows<T> q, HeadRows<T> k, HeadRows<T> v, int B,
                  int Tq, int q_pos, int H, int D, int window, const Drop& dr) {
  switch (simt_dpl(D)) {
    case 1: fwd_simt<T, 1>(out, lse, q, k, v, B, Tq, q_pos, H, D, window, dr); break;
    case 2: fwd_simt<T, 2>(out, lse, q, k, v, B, Tq, q_pos, H, D, window, dr); break;
    case 4: fwd_simt<T, 4>(out, lse, q, k, v, B, Tq, q_pos, H, D, window, dr); break;
    default: fwd_simt<T, 8>(out, lse, q, k, v, B, Tq, q_pos, H, D, window, dr); break;
  }
}

template <typename T, int DPL>
void bwd_simt(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const float* lse,
              const float* delta, const Shape& s, int window, const Drop& dr) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  const size_t smem_kv = (size_t(2 * kSimtQ + 2 * kSimtK) * (s.D + 1) + 2 * kSimtK) * sizeof(float);
  auto kv = dr.on ? attn_bwd_kv_simt<T, DPL, true> : attn_bwd_kv_simt<T, DPL, false>;
  set_smem(kv, smem_kv, "attn_bwd_kv_simt (shared memory limit)");
  kv<<<dim3(ceil_div(s.T, kSimtQ), s.B * s.H), 128, smem_kv, stream()>>>(
      dqkv.data<T>(), qkv.data<T>(), dout.data<T>(), lse, delta, s.T, s.H, s.D, window, scale,
      dr.mask);
  GPTCORE_CHECK_LAUNCH("attn_bwd_kv_simt");
  const size_t smem_q = size_t(2 * kSimtQ + 2 * kSimtK) * (s.D + 1) * sizeof(float);
  auto q = dr.on ? attn_bwd_q_simt<T, DPL, true> : attn_bwd_q_simt<T, DPL, false>;
  set_smem(q, smem_q, "attn_bwd_q_simt (shared memory limit)");
  q<<<dim3(ceil_div(s.T, kSimtQ), s.B * s.H), 128, smem_q, stream()>>>(
      dqkv.data<T>(), qkv.data<T>(), dout.data<T>(), lse, delta, s.T, s.H, s.D, window, scale,
      dr.mask);
  GPTCORE_CHECK_LAUNCH("attn_bwd_q_simt");
}

template <int D, bool DROP>
void fwd_tc(Tensor& out, Tensor& lse, const Tensor& qkv, const Shape& s, int window,
            const Drop& dr) {
  using Cfg = FwdTc<D>;
  auto k = attn_fwd_tc<D, DROP>;
  set_smem(k, Cfg::SMEM, "attn_fwd_tc (shared memory limit)");
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(D));
  k<<<dim3(ceil_div(s.T, Cfg::BQ), s.B * s.H), 128, Cfg::SMEM, stream()>>>(
      out.data<bf16>(), lse.data<float>(), qkv.data<bf16>(), s.T, s.H, window, scale_log2,
      dr.mask);
  GPTCORE_CHECK_LAUNCH("attn_fwd_tc");
}

template <int D, bool DROP>
void bwd_tc(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const float* lse,
            const float* delta, const Shape& s, int window, const Drop& dr) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float scale_log2 = kLog2e * scale;
  auto kv = attn_bwd_kv_tc<D, DROP>;
  set_smem(kv, BwdKvTc<D>::SMEM, "attn_bwd_kv_tc (shared memory limit)");
  kv<<<dim3(ceil_div(s.T, BwdKvTc<D>::BKV), s.B * s.H), 128, BwdKvTc<D>::SMEM, stream()>>>(
      dqkv.data<bf16>(), qkv.data<bf16>(), dout.data<bf16>(), lse, delta, s.T, s.H, window, scale,
      scale_log2, dr.mask);
  GPTCORE_CHECK_LAUNCH("attn_bwd_kv_tc");
  auto q = attn_bwd_q_tc<D, DROP>;
  set_smem(q, BwdQTc<D>::SMEM, "attn_bwd_q_tc (shared memory limit)");
  q<<<dim3(ceil_div(s.T, BwdQTc<D>::BQ), s.B * s.H), 128, BwdQTc<D>::SMEM, stream()>>>(
      dqkv.data<bf16>(), qkv.data<bf16>(), dout.data<bf16>(), lse, delta, s.T, s.H, window, scale,
      scale_log2, dr.mask);
  GPTCORE_CHECK_LAUNCH("attn_bwd_q_tc");
}

// The dropout settings of a call (dropout_p == 0: off).
Drop drop_of(double dropout_p, uint64_t seed, uint64_t drop_stream) {
  Drop d;
  d.on = dropout_p > 0.0;
  if (d.on) d.mask = hash::dropout(dropout_p, seed, drop_stream);
  return d;
}

}  // namespace

void attention_forward(const Tensor& qkv, int n_head, int window, double dropout_p,
                       uint64_t seed, uint64_t drop_stream, Tensor& out, Tensor& lse) {
  DeviceGuard guard(qkv.device().index);
  const Drop dr = drop_of(dropout_p, seed, drop_stream);
  const Shape s = shape_of(qkv, n_head);
  if (s.B * int64_t(s.H) > 65535)
    throw ValueError("qkv: batch * n_head = " + std::to_string(s.B * int64_t(s.H)) +
                     " exceeds the 65535 the CUDA attention grid allows");
  if (use_tensor_cores(qkv, s, {qkv.raw(), out.raw()})) {
    if (dr.on) {
      if (s.D == 64) fwd_tc<64, true>(out, lse, qkv, s, window, dr);
      else fwd_tc<128, true>(out, lse, qkv, s, window, dr);
    } else {
      if (s.D == 64) fwd_tc<64, false>(out, lse, qkv, s, window, dr);
      else fwd_tc<128, false>(out, lse, qkv, s, window, dr);
    }
    return;
  }
  GPTCORE_FLOAT_TYPES(qkv.dtype(), "qkv", {
    const scalar_t* base = qkv.data<scalar_t>();
    const int64_t C3 = 3 * s.C, bs = int64_t(s.T) * C3;
    const HeadRows<scalar_t> q{base, bs, s.D, C3}, k{base + s.C, bs, s.D, C3},
        v{base + 2 * s.C, bs, s.D, C3};
    fwd_simt_any<scalar_t>(out.data<scalar_t>(), lse.data<float>(), q, k, v, s.B, s.T, 0, s.H,
                           s.D, window, dr);
  });
}

void attention_backward(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head, int window, double dropout_p,
                        uint64_t seed, uint64_t drop_stream, Tensor& dqkv) {
  DeviceGuard guard(qkv.device().index);
  const Drop dr = drop_of(dropout_p, seed, drop_stream);
  const Shape s = shape_of(qkv, n_head);
  if (s.B * int64_t(s.H) > 65535)
    throw ValueError("qkv: batch * n_head = " + std::to_string(s.B * int64_t(s.H)) +
                     " exceeds the 65535 the CUDA attention grid allows");
  const bool tc = use_tensor_cores(qkv, s, {qkv.raw(), dout.raw(), dqkv.raw()});
  const int dpl = tc ? 0 : simt_dpl(s.D);
  const int64_t rows = int64_t(s.B) * s.T * s.H;
  Scratch delta(size_t(rows) * sizeof(float), qkv.device().index);
  GPTCORE_FLOAT_TYPES(qkv.dtype(), "qkv", {
    attn_delta_kernel<scalar_t><<<ceil_div(rows * 32, 256), 256, 0, stream()>>>(
        delta.as<float>(), dout.data<scalar_t>(), out.data<scalar_t>(), s.B, s.T, s.H, s.D);
    GPTCORE_CHECK_LAUNCH("attn_delta_kernel");
  });
  if (tc) {
    const float* L = lse.data<float>();
    const float* Dl = delta.as<float>();
    if (dr.on) {
      if (s.D == 64) bwd_tc<64, true>(dqkv, dout, qkv, L, Dl, s, window, dr);
      else bwd_tc<128, true>(dqkv, dout, qkv, L, Dl, s, window, dr);
    } else {
      if (s.D == 64) bwd_tc<64, false>(dqkv, dout, qkv, L, Dl, s, window, dr);
      else bwd_tc<128, false>(dqkv, dout, qkv, L, Dl, s, window, dr);
    }
    return;
  }
  GPTCORE_FLOAT_TYPES(qkv.dtype(), "qkv", {
    const float* L = lse.data<float>();
    const float* Dl = delta.as<float>();
    switch (dpl) {
      case 1: bwd_simt<scalar_t, 1>(dqkv, dout, qkv, L, Dl, s, window, dr); break;
      case 2: bwd_simt<scalar_t, 2>(dqkv, dout, qkv, L, Dl, s, window, dr); break;
      case 4: bwd_simt<scalar_t, 4>(dqkv, dout, qkv, L, Dl, s, window, dr); break;
      default: bwd_simt<scalar_t, 8>(dqkv, dout, qkv, L, Dl, s, window, dr); break;
    }
  });
}

}  // namespace cuda
}  // namespace gptcore
