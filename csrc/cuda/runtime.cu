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
//
// CUDA graphs: Graph records the kernels gptcore launches while it captures and replays them
// with one launch. The captured kernels keep the addresses they were given, so while a graph
// lives the memory it touches must not be handed to anyone else: a capture gets a private
// pool, blocks freed during the capture (scratch, temporaries) and blocks handed out during it
// go there when freed, and only that graph's next capture or its reset gives them back. While
// a capture runs, nothing may call cudaMalloc (it is not capturable and would end the capture)
// or wait for the device: those paths raise a RuntimeError instead.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <map>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {

// ---- devices --------------------------------------------------------------------------------
namespace {
// cudaGetDeviceCount's answer, asked once: the count, or 0 and why (no driver, a driver older
// than this statically linked runtime needs, no device...).
struct DeviceQuery {
  int count = 0;
  std::string reason;
};

const DeviceQuery& device_query() {
  static const DeviceQuery q = [] {
    DeviceQuery r;
    const cudaError_t err = cudaGetDeviceCount(&r.count);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      r.count = 0;
      r.reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
      if (err == cudaErrorInsufficientDriver)
        r.reason += " (no NVIDIA driver, or one too old for the CUDA " +
                    std::to_string(CUDART_VERSION / 1000) + "." +
                    std::to_string(CUDART_VERSION % 1000 / 10) +
                    " runtime gptcore was built with: update the driver or build with an older "
                    "toolkit)";
    } else if (r.count == 0) {
      r.reason = "the driver reports no CUDA device";
    }
    return r;
  }();
  return q;
}
}  // namespace

int device_count() { return device_query().count; }

std::string unavailable_reason() { return device_query().reason; }

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

// The private memory pool of the Graph that this thread is capturing into (0: none).
thread_local uint64_t t_capture_pool = 0;

// Whether `s` is recording into a graph. A query that fails (the legacy default stream while
// another thread captures a blocking stream) counts as capturing: work there would break it.
bool is_capturing(cudaStream_t s) {
  if (device_count() == 0) return false;
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(s, &st);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return st != cudaStreamCaptureStatusNone;
}
}  // namespace

cudaStream_t stream() { return reinterpret_cast<cudaStream_t>(g_stream.load()); }

bool capturing() { return t_capture_pool != 0 || is_capturing(stream()); }

// Raises for a call that cannot run while gptcore's stream is captured into a CUDA graph.
static void refuse_during_capture(const char* what, const char* why) {
  if (capturing())
    throw RuntimeError(std::string(what) + ": not allowed while a CUDA graph is being captured on "
                       "gptcore's current stream (" + why + ")");
}

void set_stream(uintptr_t s) {
  const uintptr_t old = g_stream.load();
  if (old == s) return;
  if (t_capture_pool != 0)
    throw RuntimeError("set_stream: not allowed inside Graph.capture(): every captured kernel must "
                       "launch on the capture stream; switch streams before or after the capture");
  if (device_count() > 0 && !is_capturing(reinterpret_cast<cudaStream_t>(old)) &&
      !is_capturing(reinterpret_cast<cudaStream_t>(s))) {
    // Work already queued on the old stream (and memory it may still read) comes first. When
    // either stream is being captured by the caller (e.g. torch.cuda.graph), an event between
    // them would fork or join that capture, so the caller orders the streams itself.
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
  refuse_during_capture("synchronize", "captured work does not run until the graph is replayed");
  check_cuda(cudaStreamSynchronize(stream()), "synchronize");
}

// ---- caching allocator ----------------------------------------------------------------------
namespace {

struct Block {
  size_t size;
  int device;
  uint64_t pool;  // the graph pool this block belongs to once freed (0: the shared cache)
};

using FreeList = std::multimap<size_t, void*>;  // size -> block

class CachingAllocator {
 public:
  // `pool` != 0: the calling thread is capturing into that graph pool; the request is served
  // from the pool, else from the shared cache (the block then joins the pool). A request the
  // caches cannot serve returns nullptr unless `may_malloc` allows a cudaMalloc.
  void* malloc(size_t nbytes, int device, uint64_t pool, bool may_malloc) {
    const size_t size = round_size(nbytes);
    std::lock_guard<std::mutex> lock(mu_);
    if (pool) {
      if (void* p = take(pools_[{pool, device}], size)) return p;
    }
    if (void* p = take(free_[device], size)) {
      cached_ -= live_[p].size;
      live_[p].pool = pool;
      return p;
    }
    if (!may_malloc) return nullptr;
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
    live_[p] = Block{size, device, 0};
    return p;
  }

  // `pool` != 0: freed by a thread capturing into that pool (a captured kernel may use it).
  void free(void* p, uint64_t pool) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;  // not ours: nothing to do
    Block& blk = it->second;
    if (!blk.pool) blk.pool = pool;
    if (blk.pool && pools_alive_.count(blk.pool)) {  // held for its graph's replays
      pools_[{blk.pool, blk.device}].emplace(blk.size, p);
      return;
    }
    blk.pool = 0;
    free_[blk.device].emplace(blk.size, p);
    cached_ += blk.size;
  }

  // Freed while someone else's capture (e.g. torch.cuda.graph) records gptcore's stream: that
  // graph may write the block at every replay and gptcore cannot know when it dies, so the
  // block is never reused or released (a deliberate, bounded leak: scratch of the captured ops).
  void retire(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(p);
  }

  uint64_t new_pool() {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t id = ++last_pool_;
    pools_alive_.insert(id);
    return id;
  }

  // A graph is gone (or never captured): its pool's free blocks return to the shared cache,
  // and blocks of the pool still in use will go there when freed. No wait is needed: the
  // blocks' next users run after the graph's replays in stream order, like any freed block.
  void release_pool(uint64_t id) {
    if (!id) return;
    std::lock_guard<std::mutex> lock(mu_);
    pools_alive_.erase(id);
    for (auto it = pools_.begin(); it != pools_.end();) {
      if (it->first.first != id) {
        ++it;
        continue;
      }
      for (auto& [size, p] : it->second) {
        live_[p].pool = 0;
        free_[it->first.second].emplace(size, p);
        cached_ += size;
      }
      it = pools_.erase(it);
    }
    for (auto& [p, blk] : live_)
      if (blk.pool == id) blk.pool = 0;
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

  // Best fit: the smallest block of the list that is large enough but not wastefully so.
  static void* take(FreeList& list, size_t size) {
    auto it = list.lower_bound(size);
    if (it == list.end() || it->first > size + size / 4 + (1u << 20)) return nullptr;
    void* p = it->second;
    list.erase(it);
    return p;
  }

  // Frees the shared cache only: graph pools stay with their graphs.
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
  std::map<int, FreeList> free_;                          // the shared cache, per device
  std::map<std::pair<uint64_t, int>, FreeList> pools_;    // (graph pool, device) -> free blocks
  std::unordered_set<uint64_t> pools_alive_;
  uint64_t last_pool_ = 0;
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
  const uint64_t pool = t_capture_pool;
  void* p = allocator().malloc(nbytes, device, pool, false);
  if (!p) {
    // Only a miss asks whether a capture runs: cudaMalloc is not capturable (and would end the
    // capture). gptcore's own capture has a pool; a caller's (e.g. torch.cuda.graph on the
    // stream handed to set_stream) is found by asking the stream.
    if (pool != 0 || is_capturing(stream()))
      throw RuntimeError(
          "malloc_cached: " + std::to_string(nbytes) + " new bytes on cuda:" +
          std::to_string(device) + " are needed while a CUDA graph is being captured, but "
          "cudaMalloc cannot be captured. Allocate every buffer the captured step uses before "
          "the capture (pass them as out=), and run the step once before capturing so that "
          "gptcore's cache holds its scratch memory");
    p = allocator().malloc(nbytes, device, 0, true);
  }
  if (poison_enabled()) {
    DeviceGuard guard(device);
    check_cuda(cudaMemsetAsync(p, 0xFF, nbytes, stream()), "malloc_cached (poison fill)");
  }
  return p;
}

void free_cached(void* ptr) {
  if (!ptr) return;
  if (t_capture_pool == 0 && device_count() > 0 && is_capturing(stream()))
    allocator().retire(ptr);  // a caller's capture: see CachingAllocator::retire
  else
    allocator().free(ptr, t_capture_pool);
}

void empty_cache() {
  if (device_count() == 0) return;
  refuse_during_capture("empty_cache", "releasing memory waits for the device");
  allocator().empty_cache();
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
  // so the copy completes before returning. That wait cannot be captured into a graph; fill
  // a device buffer before the capture (or between replays) instead.
  refuse_during_capture(dst_dev.is_cuda() ? "memcpy (host to device)" : "memcpy (device to host)",
                        "a copy from or to host memory waits for the device; copy into a device "
                        "buffer before the capture or between replays");
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

// ---- CUDA graphs ----------------------------------------------------------------------------
// capture_begin switches gptcore to a private stream, begins recording it, and gives the
// thread a fresh memory pool; capture_end stops recording, switches back and instantiates the
// graph; replay launches it on the current stream, so it runs after the work queued there
// before the call and before the work queued after it, like one more kernel.
//
// The capture mode is cudaStreamCaptureModeThreadLocal. Global would also refuse unsafe calls
// (cudaMalloc, synchronising copies) made by *other* threads, so an unrelated thread of the
// program (a data loader, another library) would break the capture or fail itself. Relaxed
// would refuse nothing, so a cudaMalloc or a blocking copy slipping into the captured step
// would run once at capture time and silently be missing from every replay. ThreadLocal
// refuses exactly the thread that captures: the one running the step, whose unsafe calls
// gptcore already turns into clear errors (malloc_cached, memcpy, synchronize).
struct Graph::Impl {
  int device = -1;
  cudaStream_t capture_stream = nullptr;
  cudaGraphExec_t exec = nullptr;
  uint64_t pool = 0;       // memory held for this graph (its capture and replays)
  uintptr_t prev_stream = 0;
  bool capturing = false;

  // Ends a capture in any state and switches back to the stream current before it. Never
  // throws; returns the recorded graph (nullptr when the capture broke) and the error.
  std::pair<cudaGraph_t, cudaError_t> stop() noexcept {
    cudaGraph_t g = nullptr;
    cudaError_t err = cudaStreamEndCapture(capture_stream, &g);
    if (err != cudaSuccess) (void)cudaGetLastError();
    capturing = false;
    t_capture_pool = 0;
    try {
      set_stream(prev_stream);
    } catch (...) {  // ordering event failed: still switch (the capture stream ran nothing)
      g_stream.store(prev_stream);
    }
    return {g, err};
  }

  void drop_exec() noexcept {
    // An executable graph still running is freed by the driver once it completes.
    if (exec) cudaGraphExecDestroy(exec);
    exec = nullptr;
    allocator().release_pool(pool);
    pool = 0;
  }
};

Graph::Graph() : impl_(new Impl()) {
  if (device_count() == 0)
    throw RuntimeError("Graph: no CUDA GPU is available (gptcore.cuda.is_available() is False)");
  check_cuda(cudaGetDevice(&impl_->device), "Graph (cudaGetDevice)");
}

Graph::~Graph() {
  Impl& g = *impl_;
  if (g.capturing) {
    auto [graph, err] = g.stop();
    (void)err;
    if (graph) cudaGraphDestroy(graph);
  }
  g.drop_exec();
  if (g.capture_stream) cudaStreamDestroy(g.capture_stream);
}

void Graph::capture_begin() {
  Impl& g = *impl_;
  if (g.capturing) throw RuntimeError("Graph.capture: this graph is already capturing");
  if (t_capture_pool != 0)
    throw RuntimeError("Graph.capture: another gptcore graph is being captured on this thread; "
                       "captures do not nest");
  if (is_capturing(stream()))
    throw RuntimeError("Graph.capture: gptcore's current stream is already being captured "
                       "(by another library?)");
  g.drop_exec();  // a new capture replaces the old graph
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "Graph.capture (cudaGetDevice)");
  if (g.capture_stream && dev != g.device) {
    cudaStreamDestroy(g.capture_stream);
    g.capture_stream = nullptr;
  }
  g.device = dev;
  if (!g.capture_stream)  // non-blocking: no implicit sync with the legacy stream to break it
    check_cuda(cudaStreamCreateWithFlags(&g.capture_stream, cudaStreamNonBlocking),
               "Graph.capture (cudaStreamCreateWithFlags)");
  g.prev_stream = current_stream();
  // The capture stream waits for the work queued so far (an ordinary, uncaptured wait).
  set_stream(reinterpret_cast<uintptr_t>(g.capture_stream));
  g.pool = allocator().new_pool();
  const cudaError_t err = cudaStreamBeginCapture(g.capture_stream, cudaStreamCaptureModeThreadLocal);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    allocator().release_pool(g.pool);
    g.pool = 0;
    g_stream.store(g.prev_stream);
    throw_cuda(err, "Graph.capture (cudaStreamBeginCapture)");
  }
  t_capture_pool = g.pool;
  g.capturing = true;
}

void Graph::capture_end() {
  Impl& g = *impl_;
  if (!g.capturing) throw RuntimeError("Graph.capture: capture_end without capture_begin");
  auto [graph, err] = g.stop();
  if (err != cudaSuccess || !graph) {
    if (graph) cudaGraphDestroy(graph);
    g.drop_exec();
    throw RuntimeError(
        std::string("Graph.capture: the capture failed (") + cudaGetErrorName(err) + ": " +
        cudaGetErrorString(err) + "); a call inside the captured block was not capturable "
        "(a cudaMalloc, a host copy, a synchronisation, or work on another stream)");
  }
  const cudaError_t ierr = cudaGraphInstantiate(&g.exec, graph, 0);
  cudaGraphDestroy(graph);
  if (ierr != cudaSuccess) {
    (void)cudaGetLastError();
    g.exec = nullptr;
    g.drop_exec();
    throw_cuda(ierr, "Graph.capture (cudaGraphInstantiate)");
  }
}

void Graph::capture_abort() noexcept {
  Impl& g = *impl_;
  if (!g.capturing) return;
  auto [graph, err] = g.stop();
  (void)err;
  if (graph) cudaGraphDestroy(graph);
  g.drop_exec();  // nothing captured ever ran: the pool's blocks are free to reuse
}

void Graph::replay() {
  Impl& g = *impl_;
  if (g.capturing) throw RuntimeError("Graph.replay: the graph is still being captured");
  if (!g.exec)
    throw RuntimeError("Graph.replay: nothing captured (use `with graph.capture(): ...` first)");
  refuse_during_capture("Graph.replay", "replay a graph outside of another capture");
  DeviceGuard guard(g.device);
  check_cuda(cudaGraphLaunch(g.exec, stream()), "Graph.replay (cudaGraphLaunch)");
}

void Graph::reset() {
  Impl& g = *impl_;
  if (g.capturing) throw RuntimeError("Graph.reset: the graph is being captured");
  g.drop_exec();
}

bool Graph::captured() const { return impl_->exec != nullptr; }
bool Graph::in_capture() const { return impl_->capturing; }

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
