// gptcore._C: the only file that knows Python. It binds the Tensor, the DLPack and NumPy
// bridges, the checked op table (ops::*) and the CUDA runtime controls. Ops release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "core/dlpack.h"
#include "core/ops.h"
#include "core/tensor.h"

namespace py = pybind11;
using namespace gptcore;

namespace {

// ---- NumPy bridge -------------------------------------------------------------------------

std::string numpy_dtype_str(DType dt) {
  switch (dt) {
    case DType::float32: return "float32";
    case DType::int32: return "int32";
    case DType::int64: return "int64";
    case DType::uint16: return "uint16";
    case DType::bfloat16: return "float32";  // NumPy has no bfloat16: widened on export
  }
  return "float32";
}

DType dtype_from_numpy(const py::array& a, const char* arg) {
  const py::dtype dt = a.dtype();
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return DType::float32;
  if (kind == 'i' && size == 4) return DType::int32;
  if (kind == 'i' && size == 8) return DType::int64;
  if (kind == 'u' && size == 2) return DType::uint16;
  throw TypeError(std::string(arg) + ": unsupported dtype " +
                  py::str(static_cast<py::object>(dt)).cast<std::string>() +
                  "; gptcore holds float32, bfloat16, int32, int64 and uint16");
}

// Wraps a C-contiguous NumPy array without copying; the array stays alive with the storage.
Tensor from_numpy(const py::array& a, const char* arg) {
  if (!(a.flags() & py::array::c_style))
    throw ValueError(std::string(arg) +
                     ": must be C-contiguous (gptcore tensors are dense row-major); "
                     "use numpy.ascontiguousarray first");
  const DType dtype = dtype_from_numpy(a, arg);
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  auto storage = std::make_shared<Storage>();
  storage->data = const_cast<void*>(a.data());
  storage->nbytes = static_cast<size_t>(a.nbytes());
  storage->device = Device{DeviceType::CPU, 0};
  auto* owner = new py::object(a);
  storage->deleter = [owner](void*) {
    py::gil_scoped_acquire gil;
    delete owner;
  };
  return Tensor(storage, shape, dtype);
}

// A NumPy array viewing (CPU, not bf16) or holding a copy of (CUDA or bf16) the tensor.
py::array to_numpy(const Tensor& t) {
  Tensor host = t;
  if (t.is_cuda() || t.dtype() == DType::bfloat16) {
    const DType dt = t.dtype() == DType::bfloat16 ? DType::float32 : t.dtype();
    py::gil_scoped_release nogil;
    host = to(t, Device{}, dt);
  }
  std::vector<py::ssize_t> shape(host.shape().begin(), host.shape().end());
  auto* keep = new Tensor(host);
  py::capsule base(keep, [](void* p) { delete static_cast<Tensor*>(p); });
  return py::array(py::dtype(numpy_dtype_str(host.dtype())), shape, host.raw(), base);
}

// ---- DLPack bridge ------------------------------------------------------------------------

void dlpack_versioned_capsule_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<GcDLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (m && m->deleter) m->deleter(m);
  } else {
    PyErr_Clear();
  }
}

void dlpack_capsule_destructor(PyObject* cap) {
  // Only an unconsumed capsule still owns its tensor; a consumer renames it "used_dltensor".
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<GcDLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (m && m->deleter) m->deleter(m);
  } else {
    PyErr_Clear();
  }
}

py::object to_dlpack_capsule(const Tensor& t, bool versioned) {
  if (versioned) {
    GcDLManagedTensorVersioned* mv = to_dlpack_versioned(t);
    PyObject* cap = PyCapsule_New(mv, "dltensor_versioned", dlpack_versioned_capsule_destructor);
    if (!cap) {
      mv->deleter(mv);
      throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(cap);
  }
  GcDLManagedTensor* m = to_dlpack(t);
  PyObject* cap = PyCapsule_New(m, "dltensor", dlpack_capsule_destructor);
  if (!cap) {
    m->deleter(m);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

Tensor from_dlpack_capsule(py::object capsule, const char* arg) {
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* mv = static_cast<GcDLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    Tensor t = from_dlpack(mv, arg);
    PyCapsule_SetName(cap, "used_dltensor_versioned");
    return t;
  }
  if (!PyCapsule_IsValid(cap, "dltensor")) {
    if (PyCapsule_IsValid(cap, "used_dltensor") || PyCapsule_IsValid(cap, "used_dltensor_versioned"))
      throw ValueError(std::string(arg) + ": this DLPack capsule was already consumed");
    throw TypeError(std::string(arg) + ": expected a DLPack capsule named 'dltensor'");
  }
  auto* m = static_cast<GcDLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  Tensor t = from_dlpack(m, arg);  // throws before taking ownership if unsupported
  PyCapsule_SetName(cap, "used_dltensor");
  return t;
}

template <typename F>
auto without_gil(F&& f) {
  py::gil_scoped_release nogil;
  return f();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptcore's C++/CUDA core (use the gptcore package, not this module directly)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gptcore::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  // ---- Tensor -----------------------------------------------------------------------------
  py::class_<Tensor>(m, "Tensor", R"doc(
A dense, contiguous, row-major array on the CPU or a CUDA device.

Create one with ``gptcore.tensor(data, device=, dtype=)``, ``gptcore.zeros``, ``gptcore.empty``
or ``gptcore.from_dlpack``. ``numpy()`` views CPU memory without a copy (bfloat16 and CUDA
tensors are copied to a float32/host array). ``__dlpack__`` hands memory to NumPy, PyTorch,
CuPy or JAX without a copy.
)doc")
      .def_property_readonly("shape",
                             [](const Tensor& t) {
                               py::tuple s(t.dim());
                               for (int64_t i = 0; i < t.dim(); ++i) s[i] = t.shape()[i];
                               return s;
                             })
      .def_property_readonly("dtype", [](const Tensor& t) { return std::string(dtype_name(t.dtype())); })
      .def_property_readonly("device", [](const Tensor& t) { return t.device().str(); })
      .def_property_readonly("ndim", &Tensor::dim)
      .def_property_readonly("nbytes", &Tensor::nbytes)
      .def("numel", &Tensor::numel)
      .def("__len__",
           [](const Tensor& t) {
             if (t.dim() == 0) throw py::type_error("len() of a 0-d tensor");
             return t.shape()[0];
           })
      .def("data_ptr", [](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.raw()); })
      .def("numpy", &to_numpy, "A NumPy array of this tensor (a view for CPU float32/int tensors).")
      .def(
          "__array__",
          [](const Tensor& t, py::object dtype, py::object copy) {
            py::object arr = to_numpy(t);
            if (!dtype.is_none()) arr = arr.attr("astype")(dtype, py::arg("copy") = false);
            if (!copy.is_none() && copy.cast<bool>()) arr = arr.attr("copy")();
            return arr;
          },
          py::arg("dtype") = py::none(), py::arg("copy") = py::none())
      .def(
          "to",
          [](const Tensor& t, py::object device, py::object dtype) {
            Device dev = device.is_none() ? t.device() : Device::parse(py::str(device));
            DType dt = dtype.is_none() ? t.dtype() : dtype_from_name(py::str(dtype));
            py::gil_scoped_release nogil;
            return to(t, dev, dt);
          },
          py::arg("device") = py::none(), py::arg("dtype") = py::none(),
          "This tensor on another device and/or with another dtype (self if nothing changes).")
      .def("view",
           [](const Tensor& t, std::vector<int64_t> shape) {
             int64_t known = 1, infer = -1;
             for (size_t i = 0; i < shape.size(); ++i) {
               if (shape[i] == -1) {
                 if (infer >= 0) throw ValueError("view: only one dimension can be -1");
                 infer = static_cast<int64_t>(i);
               } else {
                 known *= shape[i];
               }
             }
             if (infer >= 0) shape[infer] = known ? t.numel() / known : 0;
             return t.view(shape);
           }, "The same memory with another shape (one dimension may be -1).")
      .def("copy_",
           [](Tensor& t, const Tensor& src) {
             py::gil_scoped_release nogil;
             copy_(t, src);
             return t;
           }, "Copy `src` (same shape and dtype, any device) into this tensor in place.")
      .def("zero_",
           [](Tensor& t) {
             fill_zero(t);
             return t;
           }, "Fill with zeros in place.")
      .def(
          "__dlpack__",
          [](const Tensor& t, py::object stream, py::object max_version, py::object dl_device,
             py::object copy) {
            if (!copy.is_none() && copy.cast<bool>())
              throw py::buffer_error("gptcore: __dlpack__(copy=True) is not supported");
#ifdef GPTCORE_WITH_CUDA
            if (t.is_cuda() && !stream.is_none() && stream.cast<int64_t>() != -1 &&
                static_cast<uintptr_t>(stream.cast<int64_t>()) != cuda::current_stream()) {
              py::gil_scoped_release nogil;
              cuda::synchronize();  // the consumer's stream then sees finished data
            }
#endif
            (void)dl_device;
            bool versioned = false;
            if (!max_version.is_none()) {
              auto mv = max_version.cast<py::tuple>();
              versioned = mv.size() >= 1 && mv[0].cast<int>() >= 1;
            }
            return to_dlpack_capsule(t, versioned);
          },
          py::kw_only(), py::arg("stream") = py::none(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__",
           [](const Tensor& t) {
             return py::make_tuple(t.is_cuda() ? int(kGcDLCUDA) : int(kGcDLCPU),
                                   t.is_cuda() ? t.device().index : 0);
           })
      .def("__repr__", [](const Tensor& t) {
        std::string s = "gptcore.Tensor(shape=" + t.shape_str() + ", dtype=" +
                        dtype_name(t.dtype()) + ", device='" + t.device().str() + "')";
        return s;
      });

  m.def("from_numpy", [](py::array a, const char* arg) { return from_numpy(a, arg); },
        py::arg("array"), py::arg("name") = "array");
  m.def("from_dlpack_capsule", &from_dlpack_capsule, py::arg("capsule"), py::arg("name") = "x");
  m.def(
      "empty",
      [](std::vector<int64_t> shape, const std::string& dtype, const std::string& device) {
        return empty(shape, dtype_from_name(dtype), Device::parse(device));
      },
      py::arg("shape"), py::arg("dtype") = "float32", py::arg("device") = "cpu");
  m.def(
      "zeros",
      [](std::vector<int64_t> shape, const std::string& dtype, const std::string& device) {
        return zeros(shape, dtype_from_name(dtype), Device::parse(device));
      },
      py::arg("shape"), py::arg("dtype") = "float32", py::arg("device") = "cpu");
  m.def("set_num_threads", &set_num_threads);
  m.def("get_num_threads", &get_num_threads);

  // ---- ops (checked in dispatch.cpp) ------------------------------------------------------
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("embedding_forward", &ops::embedding_forward, nogil);
  m.def("embedding_backward", &ops::embedding_backward, nogil);
  m.def("layernorm_forward", &ops::layernorm_forward, nogil);
  m.def("layernorm_backward", &ops::layernorm_backward, nogil);
  m.def("residual_layernorm_forward", &ops::residual_layernorm_forward, nogil);
  m.def("linear_forward", &ops::linear_forward, nogil);
  m.def("linear_backward", &ops::linear_backward, nogil);
  m.def("attention_forward", &ops::attention_forward, nogil);
  m.def("attention_backward", &ops::attention_backward, nogil);
  m.def("cross_entropy", &ops::cross_entropy, nogil);
  m.def("adamw_step", &ops::adamw_step, nogil);
  m.def("global_norm", &ops::global_norm, nogil);

  // ---- CUDA runtime -----------------------------------------------------------------------
  py::module_ mc = m.def_submodule("cuda", "CUDA runtime controls");
#ifdef GPTCORE_WITH_CUDA
  mc.attr("compiled") = true;
  mc.def("device_count", &cuda::device_count);
  mc.def("set_stream", [](uintptr_t s) { cuda::set_stream(s); }, py::arg("stream"));
  mc.def("current_stream", &cuda::current_stream);
  mc.def("synchronize", &cuda::synchronize, py::call_guard<py::gil_scoped_release>());
  mc.def("empty_cache", &cuda::empty_cache);
  mc.def("cached_bytes", &cuda::cached_bytes);
#else
  mc.attr("compiled") = false;
  mc.def("device_count", []() { return 0; });
#endif

  // ==== tokenizer (owned by tok) ====
  // ==== end tokenizer ====
}
