// Token + position embedding on the GPU: the gather, and a deterministic scatter-add.
//
// Forward: out[b,t,:] = wte[idx[b,t],:] + wpe[p+t,:], 16-byte vectors per thread. An id outside
// [0, V) cannot be raised from a kernel; its row is written as NaN (never read out of bounds).
// The first position p is an argument, or is read from device memory (pos_dev) by every thread,
// so that a decode step captured in a CUDA graph embeds at the position current at replay;
// pos_dev holds one p for every row, or one per row (pos_stride 1: row b reads pos_dev[b]). The
// host cannot check a device p; a p with p < 0 or p + T > wpe rows makes its row(s) NaN.
// Embedding dropout (the DROP instantiations, only when dropout_p > 0) is applied to the sum in
// registers before the store, with the mask of core/hash.h over out's element index: the sum is
// rounded to T first, so the result is bitwise embedding then dropout_forward, one pass instead
// of two. NaN rows (a bad id or device p) stay NaN.
//
// Backward: dwpe[t] += sum_b dout[b,t] is a plain column sum in b order. dwte is a scatter-add
// with repeated ids, where float atomics would make the result depend on timing. Instead the
// positions are bucketed by token: integer atomics count each token and hand out bucket space
// (the placement may vary, the integer results do not); then one warp per distinct token sorts
// its bucket's positions and adds their dout rows in increasing position order, so every element
// of dwte is summed in the same order on every run. Frequent tokens (more than 64 occurrences)
// skip the sort: their warp walks all positions in order with ballots and takes the matches.
#include <climits>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

template <typename T, bool VEC, bool DROP = false>
__global__ void embedding_forward_kernel(T* __restrict__ out, const void* idx, bool idx64,
                                         const T* __restrict__ wte, const T* __restrict__ wpe,
                                         const int32_t* pos_dev, int pos_stride, int64_t pos,
                                         int64_t N, int64_t T_, int64_t C, int64_t V,
                                         int64_t n_pos, hash::Dropout drop = {}) {
  constexpr int P = VEC ? Pack<T>::N : 1;
  const int64_t per_row = C / P;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * per_row) return;
  const int64_t bt = i / per_row, c = (i % per_row) * P;
  const int64_t id = load_index(idx, idx64, bt);
  const int64_t p0 = pos_dev ? static_cast<int64_t>(pos_dev[pos_stride * (bt / T_)]) : pos;
  const int64_t t = p0 + bt % T_;
  T* o = out + bt * C + c;
  if (id < 0 || id >= V || p0 < 0 || p0 + T_ > n_pos) {
#pragma unroll
    for (int e = 0; e < P; ++e) o[e] = from_f<T>(NAN);
    return;
  }
  if constexpr (VEC) {
    const Pack<T> a = Pack<T>::load(wte + id * C + c), b = Pack<T>::load(wpe + t * C + c);
    Pack<T> r;
#pragma unroll
    for (int e = 0; e < P; ++e) {
      if constexpr (DROP) {
        const float v = to_f(from_f<T>(a.f(e) + b.f(e)));  // what the unfused op stores
        r.set(e, drop.keep(uint64_t(bt * C + c + e)) ? v * drop.scale : 0.f);
      } else {
        r.set(e, a.f(e) + b.f(e));
      }
    }
    r.store(o);
  } else {
    if constexpr (DROP) {
      const float v = to_f(from_f<T>(to_f(wte[id * C + c]) + to_f(wpe[t * C + c])));
      o[0] = from_f<T>(drop.keep(uint64_t(bt * C + c)) ? v * drop.scale : 0.f);
    } else {
      o[0] = from_f<T>(to_f(wte[id * C + c]) + to_f(wpe[t * C + c]));
    }
  }
}

// dwpe[t, c] += sum over b (in order) of dout[b, t, c].
template <typename T>
__global__ void embedding_dwpe_kernel(T* dwpe, const T* dout, int64_t B, int64_t T_, int64_t C) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= T_ * C) return;
  float s = 0.f;
  for (int64_t b = 0; b < B; ++b) s += to_f(dout[b * T_ * C + i]);
  dwpe[i] = from_f<T>(to_f(dwpe[i]) + s);
}

struct Buckets {
  int* counts;   // (V) occurrences of each token
  int* slot_of;  // (V) token -> slot
  int* uniq;     // (N) slot -> token
  int* base;     // (N) slot -> start of its bucket
  int* fill;     // (N) slot -> positions placed so far
  int* bucket;   // (N) positions grouped by slot
  int* nuniq;    // number of distinct tokens
  int* cursor;   // bucket space handed out
};

__global__ void embedding_count_kernel(Buckets bk, const void* idx, bool idx64, int64_t N,
                                       int64_t V) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const int64_t v = load_index(idx, idx64, i);
  if (v < 0 || v >= V) return;
  if (atomicAdd(&bk.counts[v], 1) == 0) {  // first arrival registers the token
    const int s = atomicAdd(bk.nuniq, 1);
    bk.uniq[s] = static_cast<int>(v);
    bk.slot_of[v] = s;
  }
}

__global__ void embedding_alloc_kernel(Buckets bk, int64_t N) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= N || s >= *bk.nuniq) return;
  bk.base[s] = atomicAdd(bk.cursor, bk.counts[bk.uniq[s]]);
}

__global__ void embedding_fill_kernel(Buckets bk, const void* idx, bool idx64, int64_t N,
                                      int64_t V) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const int64_t v = load_index(idx, idx64, i);
  if (v < 0 || v >= V) return;
  const int s = bk.slot_of[v];
  bk.bucket[bk.base[s] + atomicAdd(&bk.fill[s], 1)] = static_cast<int>(i);
}

constexpr int kSortMax = 64;  // buckets up to this size are sorted in registers
constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
embedding_dwte_kernel(T* dwte, const T* dout, Buckets bk, const void* idx, bool idx64, int64_t N,
                      int64_t C) {
  __shared__ int sorted[kWarpsPerBlock][kSortMax];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t s = blockIdx.x * int64_t(kWarpsPerBlock) + warp;
  if (s >= N || s >= *bk.nuniq) return;  // warp-uniform
  const int v = bk.uniq[s];
  const int cnt = bk.counts[v];
  T* row = dwte + int64_t(v) * C;
  if (cnt <= kSortMax) {
    // Rank each position among the bucket's (all distinct): rank = how many are smaller.
    const int* pos = bk.bucket + bk.base[s];
    const int p0 = lane < cnt ? pos[lane] : INT_MAX;
    const int p1 = lane + 32 < cnt ? pos[lane + 32] : INT_MAX;
    int r0 = 0, r1 = 0;
    for (int j = 0; j < 32; ++j) {
      const int q0 = __shfl_sync(0xffffffffu, p0, j), q1 = __shfl_sync(0xffffffffu, p1, j);
      r0 += (q0 < p0) + (q1 < p0);
      r1 += (q0 < p1) + (q1 < p1);
    }
    if (lane < cnt) sorted[warp][r0] = p0;
    if (lane + 32 < cnt) sorted[warp][r1] = p1;
    __syncwarp();
    for (int64_t c = lane; c < C; c += 32) {
      float a = 0.f;
      for (int k = 0; k < cnt; ++k) a += to_f(dout[int64_t(sorted[warp][k]) * C + c]);
      row[c] = from_f<T>(to_f(row[c]) + a);
    }
    return;
  }
  // Frequent token: walk every position in order, 32 at a time, taking the matches.
  constexpr int U = 8;
  for (int64_t c0 = 0; c0 < C; c0 += 32 * U) {
    float a[U];
#pragma unroll
    for (int u = 0; u < U; ++u) a[u] = 0.f;
    for (int64_t i0 = 0; i0 < N; i0 += 32) {
      const int64_t id = i0 + lane < N ? load_index(idx, idx64, i0 + lane) : -1;
      unsigned mask = __ballot_sync(0xffffffffu, id == v);
      while (mask) {
        const int b = __ffs(mask) - 1;
        mask &= mask - 1;
        const T* g = dout + (i0 + b) * C;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t c = c0 + lane + 32 * u;
          if (c < C) a[u] += to_f(g[c]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + lane + 32 * u;
      if (c < C) row[c] = from_f<T>(to_f(row[c]) + a[u]);
    }
  }
}

template <typename T>
void forward_impl(Tensor& out, const Tensor& idx, const Tensor& wte, const Tensor& wpe,
                  int64_t pos, const int32_t* pos_dev, int pos_stride,
                  const hash::Dropout* drop) {
  const int64_t B = idx.size(0), T_ = idx.size(1), C = wte.size(1), V = wte.size(0);
  const int64_t N = B * T_;
  constexpr int P = Pack<T>::N;
  const bool vec = C % P == 0 && aligned16(out.raw()) && aligned16(wte.raw()) && aligned16(wpe.raw());
  const bool i64 = idx.dtype() == DType::int64;
  const int64_t work = N * (vec ? C / P : C);
  if (work == 0) return;  // C == 0 (dispatch allows an empty width): a 0-block launch is an error
  const unsigned blocks = ceil_div(work, 256);
  const int64_t n_pos = wpe.size(0);
  if (drop) {  // embedding dropout fused
    if (vec)
      embedding_forward_kernel<T, true, true><<<blocks, 256, 0, stream()>>>(
          out.data<T>(), idx.raw(), i64, wte.data<T>(), wpe.data<T>(), pos_dev, pos_stride, pos,
          N, T_, C, V, n_pos, *drop);
    else
      embedding_forward_kernel<T, false, true><<<blocks, 256, 0, stream()>>>(
          out.data<T>(), idx.raw(), i64, wte.data<T>(), wpe.data<T>(), pos_dev, pos_stride, pos,
          N, T_, C, V, n_pos, *drop);
    GPTCORE_CHECK_LAUNCH("embedding_forward_kernel (dropout)");
    return;
  }
  if (vec)
    embedding_forward_kernel<T, true><<<blocks, 256, 0, stream()>>>(
        out.data<T>(), idx.raw(), i64, wte.data<T>(), wpe.data<T>(), pos_dev, pos_stride, pos,
        N, T_, C, V, n_pos);
  else
    embedding_forward_kernel<T, false><<<blocks, 256, 0, stream()>>>(
        out.data<T>(), idx.raw(), i64, wte.data<T>(), wpe.data<T>(), pos_dev, pos_stride, pos,
        N, T_, C, V, n_pos);
  GPTCORE_CHECK_LAUNCH("embedding_forward_kernel");
}

template <typename T>
void backward_impl(Tensor& dwte, Tensor& dwpe, const Tensor& dout, const Tensor& idx) {
  const int64_t B = idx.size(0), T_ = idx.size(1), C = dwte.size(1), V = dwte.size(0);
  const int64_t N = B * T_;
  const bool i64 = idx.dtype() == DType::int64;
  const int dev = idx.device().index;
  if (C == 0) return;  // nothing to add, and a 0-block dwpe launch would be an error

  embedding_dwpe_kernel<T><<<ceil_div(T_ * C, 256), 256, 0, stream()>>>(dwpe.data<T>(),
                                                                        dout.data<T>(), B, T_, C);
  GPTCORE_CHECK_LAUNCH("embedding_dwpe_kernel");

  // counts and fill must start at zero; the rest is written before it is read.
  const size_t words = size_t(2 * V + 4 * N + 2);
  Scratch scratch(words * sizeof(int), dev);
  int* w = scratch.as<int>();
  Buckets bk;
  bk.counts = w;
  bk.fill = w + V;
  bk.nuniq = w + V + N;
  bk.cursor = w + V + N + 1;
  bk.slot_of = w + V + N + 2;
  bk.uniq = bk.slot_of + V;
  bk.base = bk.uniq + N;
  bk.bucket = bk.base + N;
  memset_zero(w, size_t(V + N + 2) * sizeof(int), dev);
  const unsigned blocks = ceil_div(N, 256);
  embedding_count_kernel<<<blocks, 256, 0, stream()>>>(bk, idx.raw(), i64, N, V);
  GPTCORE_CHECK_LAUNCH("embedding_count_kernel");
  embedding_alloc_kernel<<<blocks, 256, 0, stream()>>>(bk, N);
  GPTCORE_CHECK_LAUNCH("embedding_alloc_kernel");
  embedding_fill_kernel<<<blocks, 256, 0, stream()>>>(bk, idx.raw(), i64, N, V);
  GPTCORE_CHECK_LAUNCH("embedding_fill_kernel");
  embedding_dwte_kernel<T><<<ceil_div(N, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream()>>>(
      dwte.data<T>(), dout.data<T>(), bk, idx.raw(), i64, N, C);
  GPTCORE_CHECK_LAUNCH("embedding_dwte_kernel");
}

}  // namespace

void embedding_forward(const Tensor& idx, const Tensor& wte, const Tensor& wpe, int64_t pos,
                       const Tensor& pos_dev, double dropout_p, uint64_t seed, uint64_t stream_id,
                       Tensor& out) {
  DeviceGuard guard(idx.device().index);
  const int32_t* p = pos_dev.defined() ? pos_dev.data<int32_t>() : nullptr;
  const int stride = p && pos_dev.numel() > 1 ? 1 : 0;  // per-row positions
  const hash::Dropout d = hash::dropout(dropout_p, seed, stream_id);
  const hash::Dropout* drop = dropout_p > 0.0 ? &d : nullptr;
  GPTCORE_FLOAT_TYPES(wte.dtype(), "wte",
                      forward_impl<scalar_t>(out, idx, wte, wpe, pos, p, stride, drop));
}

void embedding_backward(const Tensor& dout, const Tensor& idx, Tensor& dwte, Tensor& dwpe) {
  DeviceGuard guard(idx.device().index);
  GPTCORE_FLOAT_TYPES(dwte.dtype(), "dwte", backward_impl<scalar_t>(dwte, dwpe, dout, idx));
}

}  // namespace cuda
}  // namespace gptcore
