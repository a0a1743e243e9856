// gptcore's Tensor: a contiguous, row-major, typed view of one storage on one device.
//
// There is no striding and no autograd: every op reads and writes whole contiguous buffers.
// A Tensor is cheap to copy (it shares its Storage). CPU storage is 64-byte aligned when
// gptcore allocates it; storage wrapped from NumPy, PyTorch or DLPack keeps the producer's
// pointer and releases the producer through its deleter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace gptcore {

// ---- errors -------------------------------------------------------------------------------
// bindings.cpp turns these into Python's ValueError and TypeError; std::runtime_error becomes
// RuntimeError. Nothing in the core aborts.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
using RuntimeError = std::runtime_error;

// ---- dtype and device ---------------------------------------------------------------------
enum class DType : int8_t { float32 = 0, bfloat16 = 1, int32 = 2, int64 = 3, uint16 = 4 };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
DType dtype_from_name(const std::string& name);  // "float32", "bf16", "bfloat16", "int32", ...

enum class DeviceType : int8_t { CPU = 0, CUDA = 1 };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;           // "cpu" or "cuda:N"
  static Device parse(const std::string& s);  // "cpu", "cuda", "cuda:1"
};

// ---- storage ------------------------------------------------------------------------------
struct Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  Device device;
  // Memory gptcore must never write: a read-only NumPy array (np.load(..., mmap_mode="r") maps
  // it PROT_READ, so a write would segfault) or a DLPack tensor flagged read-only. Every op
  // that writes (outputs, KV caches, gradients, optimiser state), copy_ and zero_ refuse it.
  bool read_only = false;
  std::function<void(void*)> deleter;  // frees `data` (allocator or foreign owner)
  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (deleter) deleter(data);
  }
};

// ---- tensor -------------------------------------------------------------------------------
class Tensor {
 public:
  Tensor() = default;
  // Refuses (ValueError) a negative dimension and a shape whose element or byte count does not
  // fit in int64 (so numel() and nbytes() never wrap around).
  Tensor(std::shared_ptr<Storage> storage, std::vector<int64_t> shape, DType dtype);

  bool defined() const { return storage_ != nullptr; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device{}; }
  bool is_cuda() const { return device().is_cuda(); }
  bool read_only() const { return storage_ && storage_->read_only; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  void* raw() const { return storage_ ? storage_->data : nullptr; }
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  // Same storage, another shape with the same number of elements.
  Tensor view(std::vector<int64_t> shape) const;
  // Rows [start, start + length) of dimension 0, sharing memory (still contiguous).
  Tensor narrow(int64_t start, int64_t length) const;
  std::string shape_str() const;  // "(2, 3, 4)"

 private:
  std::shared_ptr<Storage> storage_;
  std::vector<int64_t> shape_;
  int64_t numel_ = 1;
  DType dtype_ = DType::float32;
};

// "(2, 3, 4)" for any shape (also one no Tensor could hold, for error messages).
std::string shape_string(const std::vector<int64_t>& shape);
// The element count of `shape` for `dtype`: ValueError ("<what>: ...") for a negative dimension
// or when the element count or the byte count overflows int64.
int64_t checked_numel(const std::vector<int64_t>& shape, DType dtype, const char* what);
// ValueError "<name>: is read-only, but the op writes into it ..." for a read-only tensor.
void check_writable(const Tensor& t, const std::string& name);

// Allocation (CPU: 64-byte aligned; CUDA: gptcore's caching allocator). The shape is checked
// by checked_numel before anything is allocated.
Tensor empty(const std::vector<int64_t>& shape, DType dtype, Device device);
Tensor zeros(const std::vector<int64_t>& shape, DType dtype, Device device);
void fill_zero(Tensor& t);  // refuses a read-only t
// Copy `src` into `dst` (same shape and dtype; any devices; dst writable).
void copy_(Tensor& dst, const Tensor& src);
// A new tensor on `device` with `dtype` (float32 <-> bfloat16 rounds to nearest even;
// integer <-> float conversions truncate as C does).
Tensor to(const Tensor& src, Device device, DType dtype);

// Number of CPU threads the kernels use (OpenMP); 0 restores the default. Every thread may run
// an OpenBLAS sgemm at the same time, and OpenBLAS only has per-thread buffers for the
// MAX_THREADS it was built with: n in [0, max_num_threads()] (ValueError otherwise), and the
// default is clamped to it.
void set_num_threads(int64_t n);
int get_num_threads();
int max_num_threads();

// ---- bfloat16 on the host -----------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace gptcore
