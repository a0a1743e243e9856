#include "dlpack.h"

#include <string>

namespace gptcore {

namespace {

struct ExportCtx {
  Tensor tensor;  // holds the storage
  std::vector<int64_t> shape;
};

GcDLDataType to_dl_dtype(DType dt) {
  switch (dt) {
    case DType::float32: return {kGcDLFloat, 32, 1};
    case DType::bfloat16: return {kGcDLBfloat, 16, 1};
    case DType::int32: return {kGcDLInt, 32, 1};
    case DType::int64: return {kGcDLInt, 64, 1};
    case DType::uint16: return {kGcDLUInt, 16, 1};
  }
  return {kGcDLFloat, 32, 1};
}

DType from_dl_dtype(GcDLDataType d, const char* arg) {
  if (d.lanes == 1) {
    if (d.code == kGcDLFloat && d.bits == 32) return DType::float32;
    if (d.code == kGcDLBfloat && d.bits == 16) return DType::bfloat16;
    if (d.code == kGcDLInt && d.bits == 32) return DType::int32;
    if (d.code == kGcDLInt && d.bits == 64) return DType::int64;
    if (d.code == kGcDLUInt && d.bits == 16) return DType::uint16;
  }
  throw TypeError(std::string(arg) + ": unsupported dtype (DLPack code " +
                  std::to_string(d.code) + ", bits " + std::to_string(d.bits) + ", lanes " +
                  std::to_string(d.lanes) +
                  "); gptcore holds float32, bfloat16, int32, int64 and uint16");
}

// Describes `t` in `dl`; the shape array lives in `ctx`.
void fill_dl_tensor(GcDLTensor& dl, const Tensor& t, ExportCtx* ctx) {
  dl.data = t.raw();
  dl.device = {t.is_cuda() ? kGcDLCUDA : kGcDLCPU, t.is_cuda() ? t.device().index : 0};
  dl.ndim = static_cast<int32_t>(t.dim());
  dl.dtype = to_dl_dtype(t.dtype());
  dl.shape = ctx->shape.data();
  dl.strides = nullptr;
  dl.byte_offset = 0;
}

// Wraps the producer's memory; `release` runs the producer's deleter. read_only: the producer
// flagged the memory read-only (DLPack >= 1.0 only; a legacy capsule cannot say).
Tensor wrap_dl_tensor(const GcDLTensor& dl, const char* arg, bool read_only,
                      std::function<void(void*)> release) {
  Device device;
  if (dl.device.device_type == kGcDLCPU || dl.device.device_type == kGcDLCUDAHost) {
    device = Device{DeviceType::CPU, 0};
  } else if (dl.device.device_type == kGcDLCUDA) {
    device = Device{DeviceType::CUDA, dl.device.device_id};
  } else {
    throw ValueError(std::string(arg) + ": unsupported DLPack device type " +
                     std::to_string(dl.device.device_type) + " (gptcore takes cpu and cuda)");
  }
  const DType dtype = from_dl_dtype(dl.dtype, arg);
  if (dl.ndim < 0 || (dl.ndim > 0 && !dl.shape))
    throw ValueError(std::string(arg) + ": malformed DLPack tensor (ndim " +
                     std::to_string(dl.ndim) + ")");
  std::vector<int64_t> shape(dl.shape, dl.shape + dl.ndim);
  const int64_t n = checked_numel(shape, dtype, arg);
  if (dl.strides) {  // must be compact row-major (size-1 dims may carry any stride)
    int64_t expected = 1;
    for (int32_t i = dl.ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && dl.strides[i] != expected)
        throw ValueError(std::string(arg) +
                         ": must be C-contiguous (gptcore tensors are dense row-major); "
                         "make a contiguous copy first");
      expected *= shape[i];
    }
  }
  auto storage = std::make_shared<Storage>();
  storage->data = static_cast<char*>(dl.data) + dl.byte_offset;
  storage->device = device;
  storage->read_only = read_only;
  storage->nbytes = static_cast<size_t>(n) * dtype_size(dtype);
  storage->deleter = std::move(release);
  return Tensor(storage, shape, dtype);
}

}  // namespace

GcDLManagedTensorVersioned* to_dlpack_versioned(const Tensor& t) {
  auto* ctx = new ExportCtx{t, t.shape()};
  auto* m = new GcDLManagedTensorVersioned{};
  m->version = {1, 0};
  m->flags = t.read_only() ? kGcDLFlagReadOnly : 0;  // a consumer must not write it either
  fill_dl_tensor(m->dl_tensor, t, ctx);
  m->manager_ctx = ctx;
  m->deleter = [](GcDLManagedTensorVersioned* self) {
    delete static_cast<ExportCtx*>(self->manager_ctx);
    delete self;
  };
  return m;
}

Tensor from_dlpack(GcDLManagedTensorVersioned* m, const char* arg) {
  if (m->version.major != 1)
    throw ValueError(std::string(arg) + ": unsupported DLPack major version " +
                     std::to_string(m->version.major));
  return wrap_dl_tensor(m->dl_tensor, arg, (m->flags & kGcDLFlagReadOnly) != 0, [m](void*) {
    if (m->deleter) m->deleter(m);
  });
}

GcDLManagedTensor* to_dlpack(const Tensor& t) {
  auto* ctx = new ExportCtx{t, t.shape()};
  auto* m = new GcDLManagedTensor{};
  fill_dl_tensor(m->dl_tensor, t, ctx);
  m->manager_ctx = ctx;
  m->deleter = [](GcDLManagedTensor* self) {
    delete static_cast<ExportCtx*>(self->manager_ctx);
    delete self;
  };
  return m;
}

Tensor from_dlpack(GcDLManagedTensor* m, const char* arg) {
  return wrap_dl_tensor(m->dl_tensor, arg, false, [m](void*) {
    if (m->deleter) m->deleter(m);
  });
}

}  // namespace gptcore
