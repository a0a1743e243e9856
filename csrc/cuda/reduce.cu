// Reductions on the GPU: the global L2 norm of a list of tensors (gradient clipping).
//
// Deterministic two-stage sum of squares: every tensor is cut into fixed chunks (one block
// each, all tensors of a dtype in one launch); each block sums its chunk's squares in fp32 in a
// fixed order and writes one partial; a single block then adds all partials in double, again in
// a fixed order. The same inputs give the same bits on every run.
#include <cmath>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

struct NormTable {
  int count;
  int64_t chunk_start[kMaxTensorsPerLaunch + 1];
  const void* x[kMaxTensorsPerLaunch];
  int64_t n[kMaxTensorsPerLaunch];
};

template <typename T>
__global__ void __launch_bounds__(256) sumsq_kernel(const __grid_constant__ NormTable tab,
                                                    float* partial) {
  __shared__ float red[32];
  const int64_t chunk = blockIdx.x;
  const int ti = find_tensor(tab, chunk);
  const int64_t start = (chunk - tab.chunk_start[ti]) * kChunk;
  const int64_t end = min(tab.n[ti], start + kChunk);
  const T* x = static_cast<const T*>(tab.x[ti]);
  float s = 0.f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float v = to_f(x[i]);
    s = fmaf(v, v, s);
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) partial[chunk] = s;
}

__global__ void __launch_bounds__(1024) sum_partials_kernel(const float* partial, int64_t n,
                                                            double* out) {
  __shared__ double red[1024];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = red[0];
}

template <typename T>
void launch_sumsq(const std::vector<const Tensor*>& ts, float* partial, int64_t& base) {
  for (size_t first = 0; first < ts.size(); first += kMaxTensorsPerLaunch) {
    NormTable tab{};
    int64_t chunks = 0;
    // k stays below first + kMaxTensorsPerLaunch (not just count): with empty tensors
    // skipped, the count bound would reach into the next launch's range and count them twice.
    for (size_t k = first; k < ts.size() && k < first + kMaxTensorsPerLaunch; ++k) {
      const int64_t n = ts[k]->numel();
      if (n == 0) continue;
      const int c = tab.count++;
      tab.chunk_start[c] = chunks;
      tab.x[c] = ts[k]->raw();
      tab.n[c] = n;
      chunks += (n + kChunk - 1) / kChunk;
    }
    tab.chunk_start[tab.count] = chunks;
    if (chunks == 0) continue;
    sumsq_kernel<T><<<static_cast<unsigned>(chunks), 256, 0, stream()>>>(tab, partial + base);
    GPTCORE_CHECK_LAUNCH("sumsq_kernel");
    base += chunks;
  }
}

}  // namespace

double global_norm(const std::vector<Tensor>& tensors) {
  const int dev = tensors[0].device().index;
  DeviceGuard guard(dev);
  std::vector<const Tensor*> by_type[2];
  int64_t chunks = 0;
  for (const Tensor& t : tensors) {
    by_type[t.dtype() == DType::bfloat16].push_back(&t);
    chunks += (t.numel() + kChunk - 1) / kChunk;
  }
  Scratch scratch(size_t(chunks) * sizeof(float) + sizeof(double) + 16, dev);
  double* result = reinterpret_cast<double*>(scratch.as<char>());
  float* partial = reinterpret_cast<float*>(scratch.as<char>() + 16);
  int64_t base = 0;
  launch_sumsq<float>(by_type[0], partial, base);
  launch_sumsq<bf16>(by_type[1], partial, base);
  if (base == 0) return 0.0;
  sum_partials_kernel<<<1, 1024, 0, stream()>>>(partial, base, result);
  GPTCORE_CHECK_LAUNCH("sum_partials_kernel");
  double host = 0.0;
  memcpy(&host, Device{DeviceType::CPU, 0}, result, Device{DeviceType::CUDA, dev}, sizeof(double));
  return std::sqrt(host);
}

}  // namespace cuda
}  // namespace gptcore
