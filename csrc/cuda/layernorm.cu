// LayerNorm on the GPU: forward, the fused residual-add + LayerNorm forward, and backward.
//
// Fast path (the row fits in registers: C a multiple of the 16-byte pack and at most 256 packs;
// every pointer 16-byte aligned): one warp per row. The row is read from memory once into
// registers (fused: the residual add, whose sum is written out as it is formed), then the mean,
// the variance (two passes over registers: a stable variance) and the normalised output follow
// without touching memory again. Backward likewise reads x, dout (and dresidual) once and writes
// dx once, while each lane keeps running sums of dweight and dbias for its channels; a block
// folds its warps' sums in a fixed order into one partial row, and a second small kernel adds the
// partial rows in block order: deterministic, no float atomics.
// Generic path (any C, any alignment): the same arithmetic with scalar loads, re-reading the row
// from L1/L2, and a separate column-reduction kernel for dweight and dbias.
// Residual dropout (the DROP instantiations, only when dropout_p > 0): the fused add reads x
// through the counter-based mask of core/hash.h (element row*C + c), one mix64 per element in
// registers, instead of a separate dropout pass over x in memory. The kept value x * scale is
// rounded to T before the add, as dropout_forward would have stored it, so sum is bitwise the
// unfused pair's. DROP = false is the dropout-free kernel, unchanged.
#include <algorithm>
#include <initializer_list>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

constexpr int kWarps = 8;            // warps (rows in flight) per block
constexpr int kBwdMaxBlocks = 512;   // partial rows of dweight/dbias

// ---- forward, fast path ---------------------------------------------------------------------
// x * scale where dropout keeps element i (rounded to T, as dropout_forward stores it), else 0.
template <typename T>
__device__ __forceinline__ float dropped(float x, const hash::Dropout& d, uint64_t i) {
  return d.keep(i) ? to_f(from_f<T>(x * d.scale)) : 0.f;
}

template <typename T, int MAXP, bool DROP = false>
__global__ void __launch_bounds__(kWarps * 32)
layernorm_forward_kernel(T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                         const T* __restrict__ x, const T* __restrict__ residual,
                         T* __restrict__ sum, const T* __restrict__ weight,
                         const T* __restrict__ bias, int64_t N, int C, float eps,
                         hash::Dropout drop = {}) {
  constexpr int P = Pack<T>::N;
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  const int npk = C / P;
  const int64_t base = row * C;
  Pack<T> xv[MAXP];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < MAXP; ++i) {
    const int pk = lane + 32 * i;
    if (pk < npk) {
      xv[i] = Pack<T>::load_cs(x + base + pk * P);
      if (residual) {  // fused residual add; the rounded sum is what is normalised and saved
        const Pack<T> r = Pack<T>::load_cs(residual + base + pk * P);
#pragma unroll
        for (int e = 0; e < P; ++e) {
          if constexpr (DROP)
            xv[i].set(e, dropped<T>(xv[i].f(e), drop, uint64_t(base + pk * P + e)) + r.f(e));
          else
            xv[i].set(e, xv[i].f(e) + r.f(e));
        }
        xv[i].store(sum + base + pk * P);
      }
#pragma unroll
      for (int e = 0; e < P; ++e) s += xv[i].f(e);
    }
  }
  const float mu = warp_sum(s) / C;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < MAXP; ++i) {
    if (lane + 32 * i < npk) {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float d = xv[i].f(e) - mu;
        ss += d * d;
      }
    }
  }
  const float rs = rsqrtf(warp_sum(ss) / C + eps);
#pragma unroll
  for (int i = 0; i < MAXP; ++i) {
    const int pk = lane + 32 * i;
    if (pk < npk) {
      const Pack<T> w = Pack<T>::load(weight + pk * P), b = Pack<T>::load(bias + pk * P);
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < P; ++e) o.set(e, (xv[i].f(e) - mu) * rs * w.f(e) + b.f(e));
      o.store(out + base + pk * P);
    }
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// ---- forward, generic path ------------------------------------------------------------------
template <typename T, bool DROP = false>
__global__ void __launch_bounds__(kWarps * 32)
layernorm_forward_generic(T* out, float* mean, float* rstd, const T* x, const T* residual, T* sum,
                          const T* weight, const T* bias, int64_t N, int C, float eps,
                          hash::Dropout drop = {}) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  const int64_t base = row * C;
  const T* src = x + base;
  if (residual) {  // write the sum first, then normalise what was written
    for (int c = lane; c < C; c += 32) {
      float xc = to_f(x[base + c]);
      if constexpr (DROP) xc = dropped<T>(xc, drop, uint64_t(base + c));
      sum[base + c] = from_f<T>(xc + to_f(residual[base + c]));
    }
    __syncwarp();
    src = sum + base;
  }
  float s = 0.f;
  for (int c = lane; c < C; c += 32) s += to_f(src[c]);
  const float mu = warp_sum(s) / C;
  float ss = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float d = to_f(src[c]) - mu;
    ss += d * d;
  }
  const float rs = rsqrtf(warp_sum(ss) / C + eps);
  for (int c = lane; c < C; c += 32)
    out[base + c] = from_f<T>((to_f(src[c]) - mu) * rs * to_f(weight[c]) + to_f(bias[c]));
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// ---- backward, fast path --------------------------------------------------------------------
// dx = dresidual + rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight;
// partial[block] = (sum over the block's rows of dout * xhat | of dout).
template <typename T, int MAXP>
__global__ void __launch_bounds__(kWarps * 32)
layernorm_backward_kernel(T* __restrict__ dx, float* __restrict__ partial,
                          const T* __restrict__ dout, const T* __restrict__ dres,
                          const T* __restrict__ x, const T* __restrict__ weight,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          int64_t N, int C) {
  constexpr int P = Pack<T>::N;
  extern __shared__ float acc_smem[];  // 2C floats
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int npk = C / P;
  float dw[MAXP][P], db[MAXP][P];
#pragma unroll
  for (int i = 0; i < MAXP; ++i)
#pragma unroll
    for (int e = 0; e < P; ++e) dw[i][e] = db[i][e] = 0.f;

  for (int64_t row = blockIdx.x * int64_t(kWarps) + warp; row < N;
       row += int64_t(gridDim.x) * kWarps) {
    const int64_t base = row * C;
    const float mu = mean[row], rs = rstd[row];
    Pack<T> xv[MAXP], gv[MAXP];
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int i = 0; i < MAXP; ++i) {
      const int pk = lane + 32 * i;
      if (pk < npk) {
        xv[i] = Pack<T>::load_cs(x + base + pk * P);
        gv[i] = Pack<T>::load_cs(dout + base + pk * P);
        const Pack<T> w = Pack<T>::load(weight + pk * P);
#pragma unroll
        for (int e = 0; e < P; ++e) {
          const float xh = (xv[i].f(e) - mu) * rs, d = gv[i].f(e), g = d * w.f(e);
          sg += g;
          sgx += g * xh;
          dw[i][e] += d * xh;
          db[i][e] += d;
        }
      }
    }
    const float mg = warp_sum(sg) / C, mgx = warp_sum(sgx) / C;
#pragma unroll
    for (int i = 0; i < MAXP; ++i) {
      const int pk = lane + 32 * i;
      if (pk < npk) {
        const Pack<T> w = Pack<T>::load(weight + pk * P);
        Pack<T> r;
        if (dres) r = Pack<T>::load_cs(dres + base + pk * P);
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < P; ++e) {
          const float xh = (xv[i].f(e) - mu) * rs;
          float v = rs * (gv[i].f(e) * w.f(e) - mg - xh * mgx);
          if (dres) v += r.f(e);
          o.set(e, v);
        }
        o.store(dx + base + pk * P);
      }
    }
  }
  // Fold the warps' sums into shared memory in warp order, then write the block's partial row.
  for (int c = threadIdx.x; c < 2 * C; c += blockDim.x) acc_smem[c] = 0.f;
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < MAXP; ++i) {
        const int pk = lane + 32 * i;
        if (pk < npk) {
#pragma unroll
          for (int e = 0; e < P; ++e) {
            acc_smem[pk * P + e] += dw[i][e];
            acc_smem[C + pk * P + e] += db[i][e];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < 2 * C; c += blockDim.x)
    partial[blockIdx.x * int64_t(2 * C) + c] = acc_smem[c];
}

// ---- backward, generic path -----------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
layernorm_backward_dx_generic(T* dx, const T* dout, const T* dres, const T* x, const T* weight,
                              const float* mean, const float* rstd, int64_t N, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  const int64_t base = row * C;
  const float mu = mean[row], rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float g = to_f(dout[base + c]) * to_f(weight[c]);
    sg += g;
    sgx += g * (to_f(x[base + c]) - mu) * rs;
  }
  const float mg = warp_sum(sg) / C, mgx = warp_sum(sgx) / C;
  for (int c = lane; c < C; c += 32) {
    const float xh = (to_f(x[base + c]) - mu) * rs;
    float v = rs * (to_f(dout[base + c]) * to_f(weight[c]) - mg - xh * mgx);
    if (dres) v += to_f(dres[base + c]);
    dx[base + c] = from_f<T>(v);
  }
}

// Column sums of dout * xhat and dout over a slice of rows: block (32 channels x 8 rows),
// partial[blockIdx.y] = this slice's sums (rows reduced in a fixed order).
template <typename T>
__global__ void layernorm_param_grad_generic(float* partial, const T* dout, const T* x,
                                             const float* mean, const float* rstd, int64_t N,
                                             int C) {
  __shared__ float sw[8][33], sb[8][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + tx;
  float aw = 0.f, ab = 0.f;
  if (c < C) {
    for (int64_t r = blockIdx.y * 8 + ty; r < N; r += int64_t(gridDim.y) * 8) {
      const float d = to_f(dout[r * C + c]);
      aw += d * (to_f(x[r * C + c]) - mean[r]) * rstd[r];
      ab += d;
    }
  }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && c < C) {
    float w = 0.f, b = 0.f;
    for (int k = 0; k < 8; ++k) {
      w += sw[k][tx];
      b += sb[k][tx];
    }
    partial[blockIdx.y * int64_t(2 * C) + c] = w;
    partial[blockIdx.y * int64_t(2 * C) + C + c] = b;
  }
}

// dweight[c] += sum_b partial[b][c], dbias[c] += sum_b partial[b][C + c], blocks in order.
__global__ void layernorm_param_grad_reduce(float* dweight, float* dbias, const float* partial,
                                            int nparts, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= 2 * C) return;
  float s = 0.f;
  for (int b = 0; b < nparts; ++b) s += partial[b * int64_t(2 * C) + c];
  if (c < C) dweight[c] += s; else dbias[c - C] += s;
}

// ---- launch helpers -------------------------------------------------------------------------
// Packs per lane (rounded up to 1, 2, 4, 8) when the fast path applies, else 0.
template <typename T>
int fast_packs(int C, std::initializer_list<const void*> ptrs) {
  constexpr int P = Pack<T>::N;
  if (C % P != 0) return 0;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return 0;
  const int per_lane = (C / P + 31) / 32;
  if (per_lane <= 1) return 1;
  if (per_lane <= 2) return 2;
  if (per_lane <= 4) return 4;
  if (per_lane <= 8) return 8;
  return 0;
}

// drop: residual dropout on x (only with a residual), the DROP kernels; else the plain ones.
template <typename T>
void forward_impl(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const T* residual,
                  T* sum, const Tensor& weight, const Tensor& bias, float eps,
                  const hash::Dropout* drop = nullptr) {
  const int C = static_cast<int>(x.size(-1));
  const int64_t N = x.numel() / C;
  const unsigned blocks = ceil_div(N, kWarps);
  T* o = out.data<T>();
  float *mu = mean.data<float>(), *rs = rstd.data<float>();
  const T *xp = x.data<T>(), *w = weight.data<T>(), *b = bias.data<T>();
  const int mp = fast_packs<T>(C, {o, xp, residual, sum, w, b});
#define GPTCORE_LN_FWD(MP)                                                                      \
  layernorm_forward_kernel<T, MP><<<blocks, kWarps * 32, 0, stream()>>>(o, mu, rs, xp, residual, \
                                                                        sum, w, b, N, C, eps)
#define GPTCORE_LN_FWD_DROP(MP)                                                               \
  layernorm_forward_kernel<T, MP, true><<<blocks, kWarps * 32, 0, stream()>>>(                \
      o, mu, rs, xp, residual, sum, w, b, N, C, eps, *drop)
  if (drop) {
    switch (mp) {
      case 1: GPTCORE_LN_FWD_DROP(1); break;
      case 2: GPTCORE_LN_FWD_DROP(2); break;
      case 4: GPTCORE_LN_FWD_DROP(4); break;
      case 8: GPTCORE_LN_FWD_DROP(8); break;
      default:
        layernorm_forward_generic<T, true><<<blocks, kWarps * 32, 0, stream()>>>(
            o, mu, rs, xp, residual, sum, w, b, N, C, eps, *drop);
    }
    GPTCORE_CHECK_LAUNCH("layernorm_forward_kernel (residual dropout)");
    return;
  }
  switch (mp) {
    case 1: GPTCORE_LN_FWD(1); break;
    case 2: GPTCORE_LN_FWD(2); break;
    case 4: GPTCORE_LN_FWD(4); break;
    case 8: GPTCORE_LN_FWD(8); break;
    default:
      layernorm_forward_generic<T><<<blocks, kWarps * 32, 0, stream()>>>(o, mu, rs, xp, residual,
                                                                         sum, w, b, N, C, eps);
  }
#undef GPTCORE_LN_FWD_DROP
#undef GPTCORE_LN_FWD
  GPTCORE_CHECK_LAUNCH("layernorm_forward_kernel");
}

template <typename T>
void backward_impl(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dout,
                   const Tensor& dresidual, const Tensor& x, const Tensor& weight,
                   const Tensor& mean, const Tensor& rstd) {
  const int C = static_cast<int>(x.size(-1));
  const int64_t N = x.numel() / C;
  T* dxp = dx.data<T>();
  const T *dy = dout.data<T>(), *xp = x.data<T>(), *w = weight.data<T>();
  const T* dr = dresidual.defined() ? dresidual.data<T>() : nullptr;
  const float *mu = mean.data<float>(), *rs = rstd.data<float>();
  const int mp = fast_packs<T>(C, {dxp, dy, xp, w, dr});
  const size_t smem = size_t(2) * C * sizeof(float);
  int nparts;
  if (mp && smem <= 48 * 1024) {
    nparts = static_cast<int>(std::min<int64_t>(ceil_div(N, kWarps), kBwdMaxBlocks));
    Scratch partial(size_t(nparts) * 2 * C * sizeof(float), x.device().index);
#define GPTCORE_LN_BWD(MP)                                                                   \
  layernorm_backward_kernel<T, MP><<<nparts, kWarps * 32, smem, stream()>>>(                 \
      dxp, partial.as<float>(), dy, dr, xp, w, mu, rs, N, C)
    switch (mp) {
      case 1: GPTCORE_LN_BWD(1); break;
      case 2: GPTCORE_LN_BWD(2); break;
      case 4: GPTCORE_LN_BWD(4); break;
      default: GPTCORE_LN_BWD(8); break;
    }
#undef GPTCORE_LN_BWD
    GPTCORE_CHECK_LAUNCH("layernorm_backward_kernel");
    layernorm_param_grad_reduce<<<ceil_div(2 * C, 256), 256, 0, stream()>>>(
        dweight.data<float>(), dbias.data<float>(), partial.as<float>(), nparts, C);
    GPTCORE_CHECK_LAUNCH("layernorm_param_grad_reduce");
    return;
  }
  layernorm_backward_dx_generic<T><<<ceil_div(N, kWarps), kWarps * 32, 0, stream()>>>(
      dxp, dy, dr, xp, w, mu, rs, N, C);
  GPTCORE_CHECK_LAUNCH("layernorm_backward_dx_generic");
  nparts = static_cast<int>(std::min<int64_t>(ceil_div(N, 64), 64));
  Scratch partial(size_t(nparts) * 2 * C * sizeof(float), x.device().index);
  layernorm_param_grad_generic<T><<<dim3(ceil_div(C, 32), nparts), 256, 0, stream()>>>(
      partial.as<float>(), dy, xp, mu, rs, N, C);
  GPTCORE_CHECK_LAUNCH("layernorm_param_grad_generic");
  layernorm_param_grad_reduce<<<ceil_div(2 * C, 256), 256, 0, stream()>>>(
      dweight.data<float>(), dbias.data<float>(), partial.as<float>(), nparts, C);
  GPTCORE_CHECK_LAUNCH("layernorm_param_grad_reduce");
}

}  // namespace

void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
                       Tensor& out, Tensor& mean, Tensor& rstd) {
  DeviceGuard guard(x.device().index);
  GPTCORE_FLOAT_TYPES(x.dtype(), "x", forward_impl<scalar_t>(out, mean, rstd, x, nullptr, nullptr,
                                                               weight, bias, eps));
}

void residual_layernorm_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                const Tensor& bias, float eps, double dropout_p, uint64_t seed,
                                uint64_t stream_id, Tensor& sum, Tensor& out, Tensor& mean,
                                Tensor& rstd) {
  DeviceGuard guard(x.device().index);
  const hash::Dropout d = hash::dropout(dropout_p, seed, stream_id);
  const hash::Dropout* drop = dropout_p > 0.0 ? &d : nullptr;
  GPTCORE_FLOAT_TYPES(x.dtype(), "x",
                      forward_impl<scalar_t>(out, mean, rstd, x, residual.data<scalar_t>(),
                                             sum.data<scalar_t>(), weight, bias, eps, drop));
}

void layernorm_backward(const Tensor& dout, const Tensor& x, const Tensor& mean,
                        const Tensor& rstd, const Tensor& dresidual, const Tensor& weight,
                        Tensor& dweight, Tensor& dbias, Tensor& dx) {
  DeviceGuard guard(x.device().index);
  GPTCORE_FLOAT_TYPES(x.dtype(), "x",
                      backward_impl<scalar_t>(dx, dweight, dbias, dout, dresidual, x, weight,
                                              mean, rstd));
}

}  // namespace cuda
}  // namespace gptcore
