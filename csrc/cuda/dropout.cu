// Dropout on the GPU: out[i] = x[i] * scale where element i is kept, 0 where it is dropped. The
// keep bit is regenerated from the counter-based hash of core/hash.h (bit-identical to the CPU
// and the NumPy reference), so no mask is stored and backward is this same kernel on dout. The
// key is mixed once on the host; each element costs one mix64. Memory-bound: each thread moves
// one 16-byte pack (4 floats or 8 bf16) when both buffers are 16-byte aligned.
#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

template <typename T>
__global__ void dropout_kernel(T* out, const T* x, int64_t n, hash::Dropout d, bool vec) {
  constexpr int N = Pack<T>::N;
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * N;
  if (i0 >= n) return;
  if (vec && i0 + N <= n) {
    const Pack<T> in = Pack<T>::load_cs(x + i0);
    Pack<T> r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.set(k, d.keep(uint64_t(i0 + k)) ? in.f(k) * d.scale : 0.f);
    r.store(out + i0);
    return;
  }
  const int64_t i1 = i0 + N < n ? i0 + N : n;
  for (int64_t i = i0; i < i1; ++i)
    out[i] = from_f<T>(d.keep(uint64_t(i)) ? to_f(x[i]) * d.scale : 0.f);
}

}  // namespace

void dropout_apply(const Tensor& x, double p, uint64_t seed, uint64_t stream_id, Tensor& out) {
  DeviceGuard guard(x.device().index);
  const hash::Dropout d = hash::dropout(p, seed, stream_id);
  const int64_t n = x.numel();
  GPTCORE_FLOAT_TYPES(x.dtype(), "x", {
    constexpr int N = Pack<scalar_t>::N;
    const bool vec = aligned16(x.raw()) && aligned16(out.raw());
    constexpr int kThreads = 256;
    const int64_t blocks = (n + int64_t(kThreads) * N - 1) / (int64_t(kThreads) * N);
    if (blocks > 2147483647LL)
      throw ValueError("x: " + std::to_string(n) + " elements exceed the CUDA dropout grid");
    dropout_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(
        out.data<scalar_t>(), x.data<scalar_t>(), n, d, vec);
    GPTCORE_CHECK_LAUNCH("dropout_kernel");
  });
}

}  // namespace cuda
}  // namespace gptcore
