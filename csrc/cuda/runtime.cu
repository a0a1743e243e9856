// The CUDA runtime layer: device discovery, the caching allocator, the current stream,
// copies, and dtype casts.
//
// Caching allocator: cudaMalloc/cudaFree synchronise the device and cost tens of
// microseconds, so freed blocks are kept in per-device free lists (sizes rounded up, best fit
// by size) and handed out again. A block freed while kernels still use it is safe to reuse on
// the same stream, because the next user's kernels run after them in stream order; when the
// caller switches streams, set_stream makes the new stream wait for the old one, so that
// ordering carries over. GPTCORE_POISON_ALLOC=1 fills every block handed out with 0xFF bytes
// (NaN in float32 and bfloat16), so a kernel that skips an output element is caught by tests.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {

// ---- devices --------------------------------------------------------------------------------
int device_count() {
  // Statically linked cudart: without a driver or GPU this returns an error, which means 0.
  static const int count = [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

const cudaDeviceProp& device_props() {
  static std::mutex mu;
  static std::vector<cudaDeviceProp*> props;  // never freed: used until exit
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(props.size()) <= dev) props.resize(dev + 1, nullptr);
  if (!props[dev]) {
    auto* p = new cudaDeviceProp();
    check_cuda(cudaGetDeviceProperties(p, dev), "cudaGetDeviceProperties");
    props[dev] = p;
  }
  return *props[dev];
}

// ---- stream ---------------------------------------------------------------------------------
namespace {
std::atomic<uintptr_t> g_stream{0};
}

cudaStream_t stream() { return reinterpret_cast<cudaStream_t>(g_stream.load()); }

void set_stream(uintptr_t s) {
  const uintptr_t old = g_stream.load();
  if (old == s) return;
  if (device_count() > 0) {
    // Work already queued on the old stream (and memory it may still read) comes first.
    cudaEvent_t ev;
    check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "set_stream (event)");
    cudaError_t err = cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(old));
    if (err == cudaSuccess) err = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(s), ev, 0);
    cudaEventDestroy(ev);
    check_cuda(err, "set_stream");
  }
  g_stream.store(s);
}

uintptr_t current_stream() { return g_stream.load(); }

void synchronize() {
  if (device_count() == 0) throw RuntimeError("synchronize: no CUDA GPU is available");
  check_cuda(cudaStreamSynchronize(stream()), "synchronize");
}

// ---- caching allocator ----------------------------------------------------------------------
namespace {

struct Block {
  size_t size;
  int device;
};

class CachingAllocator {
 public:
  void* malloc(size_t nbytes, int device) {
    const size_t size = round_size(nbytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto& pool = free_[device];
    // Best fit: the smallest cached block that is large enough but not wastefully so.
    auto it = pool.lower_bound(size);
    if (it != pool.end() && it->first <= size + size / 4 + (1u << 20)) {
      void* p = it->second;
      cached_ -= it->first;
      pool.erase(it);
      return p;
    }
    DeviceGuard guard(device);
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, size);
    if (err != cudaSuccess) {  // give the cache back to the driver and try once more
      (void)cudaGetLastError();
      release_all_locked();
      err = cudaMalloc(&p, size);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        throw RuntimeError("CUDA out of memory: could not allocate " + std::to_string(nbytes) +
                           " bytes on cuda:" + std::to_string(device) + " (" +
                           cudaGetErrorString(err) + ")");
      }
    }
    live_[p] = Block{size, device};
    return p;
  }

  void free(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours: nothing to do
    free_[it->second.device].emplace(it->second.size, p);
    cached_ += it->second.size;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    release_all_locked();
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  static size_t round_size(size_t n) {
    if (n == 0) n = 1;
    if (n < (1u << 20)) return (n + 511) & ~size_t(511);        // small: 512-byte steps
    return (n + (1u << 17) - 1) & ~((size_t(1) << 17) - 1);      // large: 128 KiB steps
  }

  void release_all_locked() {
    for (auto& [device, pool] : free_) {
      if (pool.empty()) continue;
      DeviceGuard guard(device);
      cudaDeviceSynchronize();  // blocks may still be in use by queued kernels
      for (auto& [size, p] : pool) {
        cudaFree(p);
        live_.erase(p);
        cached_ -= size;
      }
      pool.clear();
    }
  }

  std::mutex mu_;
  std::map<int, std::multimap<size_t, void*>> free_;
  std::unordered_map<void*, Block> live_;  // every block we own, cached or handed out
  size_t cached_ = 0;
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();  // never destroyed: tensors outlive statics
  return *a;
}

bool poison_enabled() {
  const char* v = std::getenv("GPTCORE_POISON_ALLOC");
  return v && v[0] && v[0] != '0';
}

}  // namespace

void* malloc_cached(size_t nbytes, int device) {
  void* p = allocator().malloc(nbytes, device);
  if (poison_enabled()) {
    DeviceGuard guard(device);
    check_cuda(cudaMemsetAsync(p, 0xFF, nbytes, stream()), "malloc_cached (poison fill)");
  }
  return p;
}

void free_cached(void* ptr) {
  if (ptr) allocator().free(ptr);
}

void empty_cache() {
  if (device_count() > 0) allocator().empty_cache();
}

size_t cached_bytes() { return allocator().cached(); }

// ---- copies ---------------------------------------------------------------------------------
void memcpy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t nbytes) {
  if (nbytes == 0) return;
  if (dst_dev.is_cuda() && src_dev.is_cuda()) {
    if (dst_dev.index == src_dev.index) {
      DeviceGuard guard(dst_dev.index);
      check_cuda(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, stream()),
                 "memcpy (device to device)");
    } else {
      DeviceGuard guard(src_dev.index);
      check_cuda(cudaMemcpyPeerAsync(dst, dst_dev.index, src, src_dev.index, nbytes, stream()),
                 "memcpy (peer)");
    }
    return;
  }
  // Host memory is involved: the host buffer may be pageable or freed right after this call,
  // so the copy completes before returning.
  const int dev = dst_dev.is_cuda() ? dst_dev.index : src_dev.index;
  DeviceGuard guard(dev);
  const cudaMemcpyKind kind = dst_dev.is_cuda() ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  check_cuda(cudaMemcpyAsync(dst, src, nbytes, kind, stream()),
             dst_dev.is_cuda() ? "memcpy (host to device)" : "memcpy (device to host)");
  check_cuda(cudaStreamSynchronize(stream()), "memcpy (synchronize)");
}

void memset_zero(void* dst, size_t nbytes, int device) {
  if (nbytes == 0) return;
  DeviceGuard guard(device);
  check_cuda(cudaMemsetAsync(dst, 0, nbytes, stream()), "memset_zero");
}

// ---- casts ----------------------------------------------------------------------------------
namespace {

template <typename T>
__device__ __forceinline__ double cast_load(const void* p, int64_t i) {
  return static_cast<double>(static_cast<const T*>(p)[i]);
}
template <>
__device__ __forceinline__ double cast_load<bf16>(const void* p, int64_t i) {
  return static_cast<double>(__bfloat162float(static_cast<const bf16*>(p)[i]));
}

template <typename T>
__device__ __forceinline__ void cast_store(void* p, int64_t i, double x) {
  static_cast<T*>(p)[i] = static_cast<T>(x);
}
template <>
__device__ __forceinline__ void cast_store<float>(void* p, int64_t i, double x) {
  static_cast<float*>(p)[i] = static_cast<float>(x);
}
template <>
__device__ __forceinline__ void cast_store<bf16>(void* p, int64_t i, double x) {
  // Through float first (as the host does): fp32 -> bf16 rounds to nearest even.
  static_cast<bf16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(x));
}

// Element-wise conversion; integer <-> integer goes through int64 so large values stay exact.
template <typename D, typename S>
__global__ void cast_kernel(void* dst, const void* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    constexpr bool s_int = !std::is_same<S, float>::value && !std::is_same<S, bf16>::value;
    constexpr bool d_int = !std::is_same<D, float>::value && !std::is_same<D, bf16>::value;
    if constexpr (s_int && d_int) {
      static_cast<D*>(dst)[i] = static_cast<D>(static_cast<int64_t>(static_cast<const S*>(src)[i]));
    } else if constexpr (std::is_same<S, float>::value && std::is_same<D, bf16>::value) {
      static_cast<bf16*>(dst)[i] = __float2bfloat16_rn(static_cast<const float*>(src)[i]);
    } else {
      cast_store<D>(dst, i, cast_load<S>(src, i));
    }
  }
}

template <typename D>
void launch_cast_from(void* dst, const void* src, DType st, int64_t n) {
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65536));
  switch (st) {
    case DType::float32: cast_kernel<D, float><<<blocks, 256, 0, stream()>>>(dst, src, n); break;
    case DType::bfloat16: cast_kernel<D, bf16><<<blocks, 256, 0, stream()>>>(dst, src, n); break;
    case DType::int32: cast_kernel<D, int32_t><<<blocks, 256, 0, stream()>>>(dst, src, n); break;
    case DType::int64: cast_kernel<D, int64_t><<<blocks, 256, 0, stream()>>>(dst, src, n); break;
    case DType::uint16: cast_kernel<D, uint16_t><<<blocks, 256, 0, stream()>>>(dst, src, n); break;
  }
}

}  // namespace

void cast(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n, int device) {
  if (n <= 0) return;
  DeviceGuard guard(device);
  switch (dst_dtype) {
    case DType::float32: launch_cast_from<float>(dst, src, src_dtype, n); break;
    case DType::bfloat16: launch_cast_from<bf16>(dst, src, src_dtype, n); break;
    case DType::int32: launch_cast_from<int32_t>(dst, src, src_dtype, n); break;
    case DType::int64: launch_cast_from<int64_t>(dst, src, src_dtype, n); break;
    case DType::uint16: launch_cast_from<uint16_t>(dst, src, src_dtype, n); break;
  }
  GPTCORE_CHECK_LAUNCH("cast_kernel");
}

}  // namespace cuda
}  // namespace gptcore
