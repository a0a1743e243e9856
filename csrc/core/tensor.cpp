#include "tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include <sys/mman.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

namespace gptcore {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::float32: return 4;
    case DType::bfloat16: return 2;
    case DType::int32: return 4;
    case DType::int64: return 8;
    case DType::uint16: return 2;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::float32: return "float32";
    case DType::bfloat16: return "bfloat16";
    case DType::int32: return "int32";
    case DType::int64: return "int64";
    case DType::uint16: return "uint16";
  }
  return "?";
}

DType dtype_from_name(const std::string& name) {
  if (name == "float32" || name == "fp32" || name == "float") return DType::float32;
  if (name == "bfloat16" || name == "bf16") return DType::bfloat16;
  if (name == "int32") return DType::int32;
  if (name == "int64") return DType::int64;
  if (name == "uint16") return DType::uint16;
  throw TypeError("dtype: expected one of float32, bfloat16, int32, int64, uint16; got '" +
                  name + "'");
}

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

Device Device::parse(const std::string& s) {
  if (s == "cpu") return Device{DeviceType::CPU, 0};
  if (s == "cuda") return Device{DeviceType::CUDA, 0};
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5) {
    const std::string num = s.substr(5);
    if (num.find_first_not_of("0123456789") == std::string::npos && num.size() < 6)
      return Device{DeviceType::CUDA, std::stoi(num)};
  }
  throw ValueError("device: expected 'cpu', 'cuda' or 'cuda:N'; got '" + s + "'");
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

int64_t checked_numel(const std::vector<int64_t>& shape, DType dtype, const char* what) {
  // The product of the non-zero dimensions must fit, whatever their order and whether another
  // dimension is 0: kernels multiply dimensions in their own orders.
  int64_t nonzero = 1;
  bool empty = false, overflow = false;
  for (int64_t s : shape) {
    if (s < 0)
      throw ValueError(std::string(what) + ": negative dimension in shape " + shape_string(shape));
    if (s == 0) empty = true;
    else overflow = overflow || __builtin_mul_overflow(nonzero, s, &nonzero);
  }
  int64_t bytes = 0;
  if (overflow || __builtin_mul_overflow(nonzero, static_cast<int64_t>(dtype_size(dtype)), &bytes))
    throw ValueError(std::string(what) + ": " + shape_string(shape) + " of " +
                     dtype_name(dtype) + " is too large (its element count times " +
                     std::to_string(dtype_size(dtype)) + " bytes exceeds 2**63 - 1)");
  return empty ? 0 : nonzero;
}

void check_writable(const Tensor& t, const std::string& name) {
  if (t.read_only())
    throw ValueError(name + ": is read-only (e.g. a read-only or memory-mapped NumPy array), but "
                            "the op writes into it; pass a writable buffer");
}

Tensor::Tensor(std::shared_ptr<Storage> storage, std::vector<int64_t> shape, DType dtype)
    : storage_(std::move(storage)), shape_(std::move(shape)), dtype_(dtype) {
  numel_ = checked_numel(shape_, dtype_, "shape");
}

int64_t Tensor::size(int64_t d) const {
  const int64_t n = dim();
  if (d < 0) d += n;
  if (d < 0 || d >= n) throw ValueError("dimension out of range for shape " + shape_str());
  return shape_[d];
}

Tensor Tensor::view(std::vector<int64_t> shape) const {
  if (checked_numel(shape, dtype_, "view") != numel())
    throw ValueError("view: cannot view " + shape_str() + " as " + shape_string(shape));
  return Tensor(storage_, std::move(shape), dtype_);
}

Tensor Tensor::narrow(int64_t start, int64_t length) const {
  if (dim() < 1) throw ValueError("narrow: a 0-D tensor has no rows");
  if (start < 0 || length < 0 || start > shape_[0] || length > shape_[0] - start)
    throw ValueError("narrow: rows [" + std::to_string(start) + ", " +
                     std::to_string(start + length) + ") are outside " + shape_str());
  const size_t row_bytes = static_cast<size_t>(numel() / std::max<int64_t>(shape_[0], 1)) *
                           dtype_size(dtype_);
  auto sub = std::make_shared<Storage>();
  sub->data = static_cast<char*>(storage_->data) + start * row_bytes;
  sub->nbytes = length * row_bytes;
  sub->device = storage_->device;
  sub->read_only = storage_->read_only;
  std::shared_ptr<Storage> parent = storage_;
  sub->deleter = [parent](void*) {};  // keeps the parent alive; frees nothing itself
  std::vector<int64_t> shape = shape_;
  shape[0] = length;
  return Tensor(sub, shape, dtype_);
}

std::string Tensor::shape_str() const { return shape_string(shape_); }

// ---- allocation ---------------------------------------------------------------------------
static void check_cuda_device(Device device) {
#ifdef GPTCORE_WITH_CUDA
  const int n = cuda::device_count();
  if (n == 0) throw RuntimeError("CUDA device requested but no CUDA GPU is available");
  if (device.index < 0 || device.index >= n)
    throw ValueError("device: " + device.str() + " does not exist (" + std::to_string(n) +
                     " CUDA device(s))");
#else
  throw RuntimeError("device " + device.str() +
                     ": this gptcore build has no CUDA support (rebuild with nvcc present)");
#endif
}

Tensor empty(const std::vector<int64_t>& shape, DType dtype, Device device) {
  const int64_t n = checked_numel(shape, dtype, "shape");
  auto storage = std::make_shared<Storage>();
  storage->device = device;
  storage->nbytes = static_cast<size_t>(n) * dtype_size(dtype);
  if (device.is_cpu()) {
    const size_t padded = ((storage->nbytes + 63) / 64) * 64;
    void* p = padded ? std::aligned_alloc(64, padded) : nullptr;
    if (padded && !p) throw RuntimeError("out of CPU memory allocating " +
                                         std::to_string(storage->nbytes) + " bytes");
    // Large buffers: ask for transparent huge pages, so first touch faults 2 MiB at a time
    // (a fresh 50 MB logits gradient otherwise spends most of its time in page faults).
    if (padded >= (size_t(4) << 20)) {
      const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + 4095) & ~uintptr_t(4095);
      const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + padded) & ~uintptr_t(4095);
      if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
    }
    storage->data = p;
    storage->deleter = [](void* q) { std::free(q); };
  } else {
    check_cuda_device(device);
#ifdef GPTCORE_WITH_CUDA
    storage->data = storage->nbytes ? cuda::malloc_cached(storage->nbytes, device.index) : nullptr;
    storage->deleter = [](void* q) {
      if (q) cuda::free_cached(q);
    };
#endif
  }
  return Tensor(storage, shape, dtype);
}

void fill_zero(Tensor& t) {
  check_writable(t, "zero_");
  if (!t.nbytes()) return;
  if (t.device().is_cpu()) {
    std::memset(t.raw(), 0, t.nbytes());
  } else {
#ifdef GPTCORE_WITH_CUDA
    cuda::memset_zero(t.raw(), t.nbytes(), t.device().index);
#endif
  }
}

Tensor zeros(const std::vector<int64_t>& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  fill_zero(t);
  return t;
}

void copy_(Tensor& dst, const Tensor& src) {
  if (dst.shape() != src.shape() || dst.dtype() != src.dtype())
    throw ValueError("copy_: shapes/dtypes differ: " + dst.shape_str() + " " +
                     dtype_name(dst.dtype()) + " vs " + src.shape_str() + " " +
                     dtype_name(src.dtype()));
  check_writable(dst, "copy_");
  if (!src.nbytes() || dst.raw() == src.raw()) return;
  if (dst.device().is_cpu() && src.device().is_cpu()) {
    std::memcpy(dst.raw(), src.raw(), src.nbytes());
    return;
  }
#ifdef GPTCORE_WITH_CUDA
  cuda::memcpy(dst.raw(), dst.device(), src.raw(), src.device(), src.nbytes());
#else
  throw RuntimeError("copy_: this gptcore build has no CUDA support");
#endif
}

// Host conversion between any two dtypes.
static void cast_cpu(void* dst, DType dt, const void* src, DType st, int64_t n) {
  auto load = [&](int64_t i) -> double {
    switch (st) {
      case DType::float32: return static_cast<const float*>(src)[i];
      case DType::bfloat16: return bf16_to_float(static_cast<const uint16_t*>(src)[i]);
      case DType::int32: return static_cast<const int32_t*>(src)[i];
      case DType::int64: return static_cast<double>(static_cast<const int64_t*>(src)[i]);
      case DType::uint16: return static_cast<const uint16_t*>(src)[i];
    }
    return 0.0;
  };
  // Integer <-> integer conversions go through int64 so large values stay exact.
  const bool int_to_int = (st != DType::float32 && st != DType::bfloat16) &&
                          (dt != DType::float32 && dt != DType::bfloat16);
  auto load_int = [&](int64_t i) -> int64_t {
    switch (st) {
      case DType::int32: return static_cast<const int32_t*>(src)[i];
      case DType::int64: return static_cast<const int64_t*>(src)[i];
      case DType::uint16: return static_cast<const uint16_t*>(src)[i];
      default: return 0;
    }
  };
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    switch (dt) {
      case DType::float32:
        static_cast<float*>(dst)[i] = static_cast<float>(load(i));
        break;
      case DType::bfloat16:
        static_cast<uint16_t*>(dst)[i] = float_to_bf16(static_cast<float>(load(i)));
        break;
      case DType::int32:
        static_cast<int32_t*>(dst)[i] =
            int_to_int ? static_cast<int32_t>(load_int(i)) : static_cast<int32_t>(load(i));
        break;
      case DType::int64:
        static_cast<int64_t*>(dst)[i] =
            int_to_int ? load_int(i) : static_cast<int64_t>(load(i));
        break;
      case DType::uint16:
        static_cast<uint16_t*>(dst)[i] =
            int_to_int ? static_cast<uint16_t>(load_int(i)) : static_cast<uint16_t>(load(i));
        break;
    }
  }
}

Tensor to(const Tensor& src, Device device, DType dtype) {
  if (src.device() == device && src.dtype() == dtype) return src;
  if (src.dtype() == dtype) {
    Tensor out = empty(src.shape(), dtype, device);
    copy_(out, src);
    return out;
  }
  if (src.device().is_cpu() && device.is_cpu()) {
    Tensor out = empty(src.shape(), dtype, device);
    cast_cpu(out.raw(), dtype, src.raw(), src.dtype(), src.numel());
    return out;
  }
#ifdef GPTCORE_WITH_CUDA
  if (src.is_cuda()) {
    // Cast on the source GPU, then move.
    Tensor cast = empty(src.shape(), dtype, src.device());
    cuda::cast(cast.raw(), dtype, src.raw(), src.dtype(), src.numel(), src.device().index);
    return to(cast, device, dtype);
  }
  // CPU source, CUDA destination: move, then cast on the GPU.
  Tensor moved = to(src, device, src.dtype());
  return to(moved, device, dtype);
#else
  throw RuntimeError("to: this gptcore build has no CUDA support");
#endif
}

int max_num_threads() {
  static const int limit = cpu::blas_max_threads();
  return limit;
}

void set_num_threads(int64_t n) {
  const int limit = max_num_threads();
  if (n < 0 || n > limit)
    throw ValueError("num_threads: expected 0 (the default) to " + std::to_string(limit) +
                     " (the most threads this build's OpenBLAS can be called from at once, its "
                     "MAX_THREADS), got " + std::to_string(n));
#ifdef _OPENMP
  static const int default_threads = std::min(omp_get_max_threads(), limit);
  omp_set_num_threads(n > 0 ? static_cast<int>(n) : default_threads);
#endif
}

int get_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace gptcore
