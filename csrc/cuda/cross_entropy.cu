// Fused softmax cross-entropy on the GPU (the "fused classifier"): one block per row of logits.
//
// Pass 1 reads the row once, keeping a running (max, sum of exp) per thread -- an online
// softmax -- and folds the threads' pairs into the row's log-sum-exp. The loss needs only that
// and the target's logit. Pass 2, when a gradient is wanted, reads the row again (now mostly
// from L2: a 50K-column bf16 row is 100 KB) and writes grad_scale * (softmax - onehot) straight
// into dlogits, which may be the logits buffer itself: each element is read and then written by
// the same thread. The probabilities never exist in memory, and the (N, V) softmax of an
// unfused implementation is never written or read back.
// Padding columns (j >= vocab_size) get a zero gradient and never enter the sum. Rows whose
// target is ignore_index get loss 0 and a zero gradient. A target outside [0, V) that is not
// ignore_index cannot be raised from inside a kernel: its loss is NaN so it shows.
#include <cmath>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

template <typename T, bool VEC>
__global__ void __launch_bounds__(1024) cross_entropy_kernel(float* __restrict__ losses, T* dlogits, const T* logits,
                                     const void* targets, bool targets64, int64_t Vp, int64_t V,
                                     int64_t ignore_index, float grad_scale) {
  constexpr int P = Pack<T>::N;
  __shared__ float red[32];
  __shared__ float target_logit;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * Vp;
  T* d = dlogits ? dlogits + row * Vp : nullptr;
  const int64_t t = load_index(targets, targets64, row);

  if (t == ignore_index) {  // masked position: no loss, no gradient
    if (threadIdx.x == 0) losses[row] = 0.f;
    if (d) {
      for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) d[j] = from_f<T>(0.f);
    }
    return;
  }
  const bool t_ok = t >= 0 && t < V;
  if (threadIdx.x == 0) target_logit = t_ok ? to_f(x[t]) : NAN;  // before any in-place write

  // Pass 1: per-thread online (max, sum exp) over the real columns.
  float m = -INFINITY, s = 0.f;
  if (VEC) {
    for (int64_t pk = threadIdx.x; pk * P < V; pk += blockDim.x) {
      const Pack<T> v = Pack<T>::load(x + pk * P);
      float pm = -INFINITY;
#pragma unroll
      for (int e = 0; e < P; ++e)
        if (pk * P + e < V) pm = fmaxf(pm, v.f(e));
      if (pm > m) {
        s *= __expf(m - pm);
        m = pm;
      }
      // m == -inf means every value seen so far is -inf: they add 0 (and -inf - -inf = NaN).
      if (m != -INFINITY) {
#pragma unroll
        for (int e = 0; e < P; ++e)
          if (pk * P + e < V) s += __expf(v.f(e) - m);
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const float v = to_f(x[j]);
      if (v > m) {
        s *= __expf(m - v);
        m = v;
      }
      if (m != -INFINITY) s += __expf(v - m);  // a -inf logit before any finite one adds 0
    }
  }
  const float row_max = block_max(m, red);
  const float scaled = m == -INFINITY ? 0.f : s * __expf(m - row_max);
  const float sum = block_sum(scaled, red);  // ends with a barrier: target_logit is visible
  const float lse = row_max + logf(sum);
  if (threadIdx.x == 0) losses[row] = lse - target_logit;
  if (!d) return;

  // Pass 2: dlogits = grad_scale * (softmax - onehot), zero in the padding columns.
  if (VEC) {
    for (int64_t pk = threadIdx.x; pk * P < Vp; pk += blockDim.x) {
      const int64_t j0 = pk * P;
      Pack<T> out;
      if (j0 < V) {
        const Pack<T> v = Pack<T>::load(x + j0);
#pragma unroll
        for (int e = 0; e < P; ++e) {
          const int64_t j = j0 + e;
          const float g = j < V ? __expf(v.f(e) - lse) - (j == t ? 1.f : 0.f) : 0.f;
          out.set(e, grad_scale * g);
        }
      } else {
#pragma unroll
        for (int e = 0; e < P; ++e) out.set(e, 0.f);
      }
      out.store(d + j0);
    }
  } else {
    for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
      float g = 0.f;
      if (j < V) g = __expf(to_f(x[j]) - lse) - (j == t ? 1.f : 0.f);
      d[j] = from_f<T>(grad_scale * g);
    }
  }
}

template <typename T>
void launch(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
            int64_t V, int64_t ignore_index, float grad_scale) {
  const int64_t N = logits.size(0), Vp = logits.size(1);
  constexpr int P = Pack<T>::N;
  T* d = dlogits.defined() ? dlogits.data<T>() : nullptr;
  const bool vec = Vp % P == 0 && aligned16(logits.raw()) && (!d || aligned16(d));
  const int threads = Vp >= 16384 ? 1024 : Vp >= 2048 ? 256 : 64;
  const bool t64 = targets.dtype() == DType::int64;
  if (vec)
    cross_entropy_kernel<T, true><<<static_cast<unsigned>(N), threads, 0, stream()>>>(
        losses.data<float>(), d, logits.data<T>(), targets.raw(), t64, Vp, V, ignore_index,
        grad_scale);
  else
    cross_entropy_kernel<T, false><<<static_cast<unsigned>(N), threads, 0, stream()>>>(
        losses.data<float>(), d, logits.data<T>(), targets.raw(), t64, Vp, V, ignore_index,
        grad_scale);
  GPTCORE_CHECK_LAUNCH("cross_entropy_kernel");
}

}  // namespace

void cross_entropy(const Tensor& logits, const Tensor& targets, int64_t vocab_size,
                   int64_t ignore_index, float grad_scale, Tensor& losses, Tensor& dlogits) {
  DeviceGuard guard(logits.device().index);
  GPTCORE_FLOAT_TYPES(logits.dtype(), "logits",
                      launch<scalar_t>(losses, dlogits, logits, targets, vocab_size, ignore_index,
                                       grad_scale));
}

}  // namespace cuda
}  // namespace gptcore
