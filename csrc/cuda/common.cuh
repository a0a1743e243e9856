// Shared helpers of gptcore's CUDA kernels: error checks that become gptcore::RuntimeError
// naming the kernel, the current stream, a device guard, bf16/fp32 load-store helpers with
// 16-byte vector packs, warp and block reductions, tanh-GELU, a counter-based hash for
// stochastic rounding, scratch memory from the caching allocator, and the thin inline-PTX
// wrappers (cp.async, ldmatrix, mma.sync) used by the tensor-core kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/hash.h"
#include "core/ops.h"
#include "core/tensor.h"

namespace gptcore {
namespace cuda {

using bf16 = __nv_bfloat16;

// ---- errors -------------------------------------------------------------------------------
[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what) {
  throw RuntimeError(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + " (" +
                     cudaGetErrorString(err) + ")");
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so later calls do not see it
    throw_cuda(err, what);
  }
}

// After every launch: a bad configuration (too much shared memory, too many threads, ...) is
// reported here, naming the kernel. Faults inside a kernel surface at the next synchronising
// call (memcpy to the host, synchronize), which names itself.
#define GPTCORE_CHECK_LAUNCH(name) ::gptcore::cuda::check_cuda(cudaGetLastError(), name)

// ---- stream and device ----------------------------------------------------------------------
// The stream set by set_stream() (runtime.cu); every kernel launches on it.
cudaStream_t stream();

// Makes `device` current for the lifetime of the guard, restoring the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    cur_ = device;
  }
  ~DeviceGuard() {
    if (prev_ != cur_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0, cur_ = 0;
};

// Properties of the current device, read once per device.
const cudaDeviceProp& device_props();
inline int sm_count() { return device_props().multiProcessorCount; }

// Scratch memory from the caching allocator, returned when the object dies. Returning it
// right after the launches that use it is safe: the next user of the block runs later on the
// same stream (runtime.cu orders stream switches).
class Scratch {
 public:
  Scratch(size_t nbytes, int device) : ptr_(nbytes ? malloc_cached(nbytes, device) : nullptr) {}
  ~Scratch() {
    if (ptr_) free_cached(ptr_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_;
};

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- element access -----------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// Index (token id or target) i of an int32 or int64 array.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// 16 bytes of T: 4 floats or 8 bf16, loaded and stored as one vector access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
  __device__ __forceinline__ static Pack load(const T* p) {
    Pack r;
    *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
    return r;
  }
  // Streaming load for data read once (does not linger in L1).
  __device__ __forceinline__ static Pack load_cs(const T* p) {
    Pack r;
    *reinterpret_cast<int4*>(&r) = __ldcs(reinterpret_cast<const int4*>(p));
    return r;
  }
  __device__ __forceinline__ void store(T* p) const {
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(this);
  }
  __device__ __forceinline__ float f(int i) const { return to_f(v[i]); }
  __device__ __forceinline__ void set(int i, float x) { v[i] = from_f<T>(x); }
};

// ---- reductions ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `buf` holds 32 floats of shared memory. The order is fixed: deterministic.
__device__ __forceinline__ float block_sum(float x, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  x = lane < nwarps ? buf[lane] : 0.f;
  return warp_sum(x);
}
__device__ __forceinline__ float block_max(float x, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  x = lane < nwarps ? buf[lane] : -INFINITY;
  return warp_max(x);
}

// ---- GELU (tanh form, as GPT-2) -----------------------------------------------------------
// 0.5 * (1 + tanh(u)) = sigmoid(2u): the same logistic form as the CPU kernels, accurate in
// both tails (no 1 - tanh cancellation).
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;
__device__ __forceinline__ float gelu_sigmoid(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 1.0f / (1.0f + __expf(-2.0f * u));
}
__device__ __forceinline__ float gelu_f(float x) { return x * gelu_sigmoid(x); }
__device__ __forceinline__ float gelu_grad_f(float x) {
  const float s = gelu_sigmoid(x);
  const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  return s + 2.0f * x * s * (1.0f - s) * du;
}

// ---- randomness for stochastic rounding ---------------------------------------------------
// A counter-based hash (splitmix64 finaliser): the same (seed, counter) gives the same bits on
// every run, whatever the launch shape.
__device__ __forceinline__ uint32_t hash_u32(uint64_t seed, uint64_t counter) {
  return static_cast<uint32_t>(hash::mix64(seed + hash::kGamma * (counter + 1)) >> 16);
}

// fp32 -> bf16 with stochastic rounding: add 16 random bits below the kept mantissa and
// truncate, so E[result] = x. NaN stays NaN (a quiet bit is forced).
__device__ __forceinline__ bf16 bf16_stochastic(float x, uint32_t rnd) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __float2bfloat16_rn(x);
  bits += rnd & 0xffffu;
  return __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
}

// ---- inline PTX for the tensor-core kernels (sm_80+) --------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global->shared copy; with valid == false the 16 bytes are zero-filled
// and global memory is not touched.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D = A(16x16 bf16, row) * B(16x8 bf16, col) + D, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two bf16 (low half = first), the A/B operand format.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t r) {
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&r);
  return __bfloat1622float2(v);
}

// ---- dtype dispatch -------------------------------------------------------------------------
// Runs BODY with `scalar_t` bound to float or bf16 according to `dt`.
#define GPTCORE_FLOAT_TYPES(dt, name, ...)                                                   \
  do {                                                                                      \
    if ((dt) == ::gptcore::DType::float32) {                                                \
      using scalar_t = float;                                                               \
      __VA_ARGS__;                                                                          \
    } else if ((dt) == ::gptcore::DType::bfloat16) {                                        \
      using scalar_t = ::gptcore::cuda::bf16;                                               \
      __VA_ARGS__;                                                                          \
    } else {                                                                                \
      throw ::gptcore::TypeError(std::string(name) + ": CUDA kernels take float32 or bfloat16"); \
    }                                                                                       \
  } while (0)

// ---- multi-tensor chunks --------------------------------------------------------------------
// AdamW and the global norm walk many tensors in one launch: the tensors are cut into chunks
// of kChunk elements, one block per chunk; a block finds its tensor by a binary search over
// the chunk offsets passed by value in the kernel's parameter struct.
constexpr int kMaxTensorsPerLaunch = 96;
constexpr int64_t kChunk = 16384;

template <typename Table>
__device__ __forceinline__ int find_tensor(const Table& t, int64_t chunk) {
  int lo = 0, hi = t.count - 1;  // chunk_start[lo] <= chunk < chunk_start[hi + 1]
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace cuda
}  // namespace gptcore
