// The DLPack exchange ABI (https://dmlc.github.io/dlpack), the subset gptcore speaks:
// unversioned DLManagedTensor capsules ("dltensor"), CPU and CUDA devices, and gptcore's
// five dtypes. The struct layouts are fixed by the DLPack specification.
#pragma once

#include <cstdint>

#include "tensor.h"

extern "C" {
enum GptcoreDLDeviceType : int32_t { kGcDLCPU = 1, kGcDLCUDA = 2, kGcDLCUDAHost = 3 };
enum GptcoreDLDataTypeCode : uint8_t { kGcDLInt = 0, kGcDLUInt = 1, kGcDLFloat = 2, kGcDLBfloat = 4 };

struct GcDLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct GcDLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct GcDLTensor {
  void* data;
  GcDLDevice device;
  int32_t ndim;
  GcDLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // may be NULL (compact row-major)
  uint64_t byte_offset;
};
struct GcDLManagedTensor {
  GcDLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(GcDLManagedTensor* self);
};
// DLPack >= 1.0: the versioned capsule ("dltensor_versioned"), which carries flags.
struct GcDLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct GcDLManagedTensorVersioned {
  GcDLPackVersion version;
  void* manager_ctx;
  void (*deleter)(GcDLManagedTensorVersioned* self);
  uint64_t flags;  // bit 0: read-only, bit 1: is a copy
  GcDLTensor dl_tensor;
};
constexpr uint64_t kGcDLFlagReadOnly = 1;  // DLPACK_FLAG_BITMASK_READ_ONLY
}

namespace gptcore {

// A new DLManagedTensor that keeps `t`'s storage alive until its deleter runs.
GcDLManagedTensor* to_dlpack(const Tensor& t);
GcDLManagedTensorVersioned* to_dlpack_versioned(const Tensor& t);
// Wraps a producer's DLManagedTensor without copying; the producer's deleter runs when the
// last gptcore Tensor sharing the storage dies. Throws ValueError/TypeError for layouts or
// dtypes gptcore cannot hold (non-contiguous strides, unsupported dtype or device); in that
// case the caller still owns `m`.
Tensor from_dlpack(GcDLManagedTensor* m, const char* arg_name);
Tensor from_dlpack(GcDLManagedTensorVersioned* m, const char* arg_name);

}  // namespace gptcore
