// gptcore._C: the only file that knows Python. It binds the Tensor, the DLPack and NumPy
// bridges, the checked op table (ops::*) and the CUDA runtime controls. Ops release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "core/dlpack.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "tokenizer/tokenizer.h"

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
  const char order = dt.byteorder();  // '=' native, '|' not applicable, '<' or '>' explicit
  const bool little = [] { const uint16_t one = 1; return *reinterpret_cast<const uint8_t*>(&one) == 1; }();
  if (order == (little ? '>' : '<'))
    throw TypeError(std::string(arg) + ": non-native byte order " +
                    py::str(static_cast<py::object>(dt)).cast<std::string>() +
                    "; convert with array.astype(array.dtype.newbyteorder('='))");
  if (kind == 'f' && size == 4) return DType::float32;
  if (kind == 'i' && size == 4) return DType::int32;
  if (kind == 'i' && size == 8) return DType::int64;
  if (kind == 'u' && size == 2) return DType::uint16;
  throw TypeError(std::string(arg) + ": unsupported dtype " +
                  py::str(static_cast<py::object>(dt)).cast<std::string>() +
                  "; gptcore holds float32, bfloat16, int32, int64 and uint16");
}

// Wraps a C-contiguous NumPy array without copying; the array stays alive with the storage. A
// read-only array (np.load(..., mmap_mode="r"), a view of bytes) gives a read-only Tensor.
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
  storage->read_only = !a.writeable();
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
  py::array arr(py::dtype(numpy_dtype_str(host.dtype())), shape, host.raw(), base);
  if (host.read_only()) arr.attr("flags").attr("writeable") = false;  // a view stays read-only
  return arr;
}

// ---- DLPack bridge ------------------------------------------------------------------------

void dlpack_versioned_capsule_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<GcDLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (m && m->deleter) m->deleter(m);
  }
  // No PyErr_Clear() here (there was one): PyCapsule_IsValid sets no error, and a capsule is
  // often freed while an exception propagates (a temporary argument of a call that raised);
  // clearing it then turned that exception into "SystemError: error return without exception set".
}

void dlpack_capsule_destructor(PyObject* cap) {
  // Only an unconsumed capsule still owns its tensor; a consumer renames it "used_dltensor".
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<GcDLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (m && m->deleter) m->deleter(m);
  }
  // (no PyErr_Clear: see dlpack_versioned_capsule_destructor)
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
      .def_property_readonly("read_only", &Tensor::read_only,
                             "True for memory gptcore must not write (a read-only NumPy array or "
                             "DLPack tensor); ops refuse it as an output, cache or gradient.")
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
             bool overflow = false;
             for (size_t i = 0; i < shape.size(); ++i) {
               if (shape[i] == -1) {
                 if (infer >= 0) throw ValueError("view: only one dimension can be -1");
                 infer = static_cast<int64_t>(i);
               } else if (shape[i] >= 0) {
                 overflow = overflow || __builtin_mul_overflow(known, shape[i], &known);
               }
             }
             if (infer >= 0 && !overflow) shape[infer] = known ? t.numel() / known : 0;
             return t.view(shape);  // refuses negative, overflowing and mismatched shapes
           }, "The same memory with another shape (one dimension may be -1).")
      .def("narrow", &Tensor::narrow, py::arg("start"), py::arg("length"),
           "Rows [start, start + length) of the first dimension, sharing memory.")
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
            // dl_device asks for the data on a given device; gptcore never copies here, so a
            // request for another device than the tensor's is refused (array API: BufferError).
            if (!dl_device.is_none()) {
              auto want = dl_device.cast<py::tuple>();
              const int own_type = t.is_cuda() ? int(kGcDLCUDA) : int(kGcDLCPU);
              const int own_id = t.is_cuda() ? t.device().index : 0;
              if (want.size() != 2 || want[0].cast<int>() != own_type ||
                  want[1].cast<int>() != own_id)
                throw py::buffer_error("gptcore: __dlpack__(dl_device=...) asks for another device "
                                       "than the tensor's (" + t.device().str() +
                                       "); move it with .to() first");
            }
#ifdef GPTCORE_WITH_CUDA
            // The consumer's stream, per the array-API DLPack protocol: None means the legacy
            // default stream (DLPack's 1, gptcore's 0; a 0 from the consumer is read the same
            // way), 2 the per-thread default stream, -1 "do not synchronise", larger values a
            // cudaStream_t. (Before: None never synchronised, so a consumer on the legacy
            // stream could read unfinished data when gptcore runs on a stream of its own, and 1
            // always synchronised even though it is the very stream gptcore's 0 names.)
            if (t.is_cuda()) {
              const int64_t s = stream.is_none() ? 1 : stream.cast<int64_t>();
              const uintptr_t ours = cuda::current_stream();
              const bool same = (s == 0 || s == 1) ? ours == 0
                                                    : (s > 2 && static_cast<uintptr_t>(s) == ours);
              if (s != -1 && !same) {
                py::gil_scoped_release nogil;
                cuda::synchronize();  // the consumer's stream then sees finished data
              }
            }
#endif
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
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("max_num_threads", &max_num_threads);
  // A machine with more cores than OpenBLAS's MAX_THREADS starts within the limit too.
  if (get_num_threads() > max_num_threads()) set_num_threads(0);

  // ---- ops (checked in dispatch.cpp) ------------------------------------------------------
  // Every argument is named as in ops.h, in the same order (tests/test_op_signatures.py compares
  // these names with python/gptcore/ops.py and reference.py through __doc__). Optional arguments
  // default to None; where a required argument follows an optional one the rest is keyword-only
  // (py::kw_only), as in ops.py, so each signature is one that Python could spell.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  const auto none = py::none();
  m.def("embedding_forward", &ops::embedding_forward, nogil, py::arg("idx"), py::arg("wte"),
        py::arg("wpe"), py::arg("pos") = 0, py::arg("pos_dev") = none, py::kw_only(),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("stream") = 0,
        py::arg("out") = none);
  m.def("embedding_backward", &ops::embedding_backward, nogil, py::arg("dout"), py::arg("idx"),
        py::arg("dwte"), py::arg("dwpe"));
  m.def("layernorm_forward", &ops::layernorm_forward, nogil, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps") = 1e-5, py::arg("out") = none, py::arg("mean") = none,
        py::arg("rstd") = none);
  m.def("layernorm_backward", &ops::layernorm_backward, nogil, py::arg("dout"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::kw_only(), py::arg("dresidual") = none,
        py::arg("weight"), py::arg("dweight"), py::arg("dbias"), py::arg("dx") = none);
  m.def("residual_layernorm_forward", &ops::residual_layernorm_forward, nogil, py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps") = 1e-5,
        py::kw_only(), py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("stream") = 0,
        py::arg("sum") = none, py::arg("out") = none, py::arg("mean") = none,
        py::arg("rstd") = none);
  m.def("residual_layernorm_backward", &ops::residual_layernorm_backward, nogil,
        py::arg("dout"), py::arg("sum"), py::arg("mean"), py::arg("rstd"), py::kw_only(),
        py::arg("dsum") = none, py::arg("weight"), py::arg("dweight"), py::arg("dbias"),
        py::arg("dx") = none);
  m.def("linear_forward", &ops::linear_forward, nogil, py::arg("x"), py::arg("weight"),
        py::arg("bias") = none, py::arg("gelu") = false, py::arg("out") = none,
        py::arg("pre") = none);
  m.def("linear_backward", &ops::linear_backward, nogil, py::arg("dout"), py::arg("x"),
        py::kw_only(), py::arg("pre") = none, py::arg("weight"), py::arg("need_dx") = true,
        py::arg("dweight"), py::arg("dbias") = none, py::arg("dx") = none);
  m.def("attention_forward", &ops::attention_forward, nogil, py::arg("qkv"), py::arg("n_head"),
        py::arg("window") = none, py::kw_only(), py::arg("dropout_p") = 0.0, py::arg("seed") = 0,
        py::arg("stream") = 0, py::arg("out") = none, py::arg("lse") = none);
  m.def("attention_backward", &ops::attention_backward, nogil, py::arg("dout"), py::arg("qkv"),
        py::arg("out"), py::arg("lse"), py::arg("n_head"), py::arg("window") = none,
        py::kw_only(), py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("stream") = 0,
        py::arg("dqkv") = none);
  m.def("attention_kvcache", &ops::attention_kvcache, nogil, py::arg("qkv"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("pos"), py::kw_only(), py::arg("pos_dev") = none,
        py::arg("n_head"), py::arg("window") = none, py::arg("out") = none);
  m.def("dropout_forward", &ops::dropout_forward, nogil, py::arg("x"), py::arg("p"),
        py::arg("seed"), py::arg("stream"), py::kw_only(), py::arg("inplace") = false,
        py::arg("out") = none);
  m.def("dropout_backward", &ops::dropout_backward, nogil, py::arg("dout"), py::arg("p"),
        py::arg("seed"), py::arg("stream"), py::kw_only(), py::arg("inplace") = false,
        py::arg("out") = none);
  m.def("cross_entropy", &ops::cross_entropy, nogil, py::arg("logits"), py::arg("targets"),
        py::arg("vocab_size") = none, py::arg("ignore_index") = -1, py::arg("with_grad") = false,
        py::arg("grad_scale") = none, py::arg("inplace") = false, py::arg("losses") = none,
        py::arg("dlogits") = none);
  m.def("adamw_step", &ops::adamw_step, nogil, py::arg("params"), py::arg("grads"), py::arg("m"),
        py::arg("v"), py::kw_only(), py::arg("master") = std::vector<Tensor>{}, py::arg("decay"),
        py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.95, py::arg("eps") = 1e-8,
        py::arg("weight_decay") = 0.0, py::arg("step"), py::arg("grad_scale") = 1.0,
        py::arg("seed") = 0);
  m.def("global_norm", &ops::global_norm, nogil, py::arg("tensors"));
  m.def("sample_tokens", &ops::sample_tokens, nogil, py::arg("logits"), py::arg("counts") = none,
        py::arg("counter") = none, py::arg("logit_bias") = none, py::arg("forced") = none,
        py::arg("vocab_size") = none, py::arg("temperature") = 1.0, py::arg("top_k") = none,
        py::arg("top_p") = none, py::arg("frequency_penalty") = 0.0,
        py::arg("presence_penalty") = 0.0, py::arg("seed") = 0, py::arg("tokens") = none);

  // ---- CUDA runtime -----------------------------------------------------------------------
  py::module_ mc = m.def_submodule("cuda", "CUDA runtime controls");
#ifdef GPTCORE_WITH_CUDA
  mc.attr("compiled") = true;
  mc.def("device_count", &cuda::device_count);
  mc.def("unavailable_reason", &cuda::unavailable_reason);
  mc.def("set_stream", [](uintptr_t s) { cuda::set_stream(s); }, py::arg("stream"));
  mc.def("current_stream", &cuda::current_stream);
  mc.def("synchronize", &cuda::synchronize, py::call_guard<py::gil_scoped_release>());
  mc.def("empty_cache", &cuda::empty_cache);
  mc.def("cached_bytes", &cuda::cached_bytes);
  mc.def("capturing", &cuda::capturing);
  // CUDA graphs (python/gptcore/cuda.py wraps this in gptcore.cuda.Graph).
  py::class_<cuda::Graph>(mc, "Graph")
      .def(py::init<>())
      .def("capture_begin", &cuda::Graph::capture_begin)
      .def("capture_end", &cuda::Graph::capture_end, py::call_guard<py::gil_scoped_release>())
      .def("capture_abort", &cuda::Graph::capture_abort)
      .def("replay", &cuda::Graph::replay, py::call_guard<py::gil_scoped_release>())
      .def("reset", &cuda::Graph::reset)
      .def_property_readonly("captured", &cuda::Graph::captured)
      .def_property_readonly("in_capture", &cuda::Graph::in_capture);
#else
  mc.attr("compiled") = false;
  mc.def("device_count", []() { return 0; });
  mc.def("unavailable_reason",
         []() { return std::string("this gptcore build has no CUDA support (rebuild with nvcc)"); });
  mc.def("capturing", []() { return false; });
#endif

  // ==== tokenizer (owned by tok) ====
  // gptcore._C.tokenizer: the byte-level BPE core (csrc/tokenizer/). python/gptcore/tokenizer.py
  // is the public face; these bindings only convert arguments and release the GIL.
  {
    namespace tk = gptcore::tokenizer;
    py::module_ mt = m.def_submodule("tokenizer", "byte-level BPE core (use gptcore.Tokenizer)");

    // str -> UTF-8. A str holding lone surrogates has no UTF-8 form; like tiktoken, each one
    // becomes U+FFFD (the fallback string is kept in `spill`, which must outlive the view).
    auto utf8_of = [](py::handle text, const char* arg, std::string* spill) -> std::string_view {
      if (!PyUnicode_Check(text.ptr()))
        throw TypeError(std::string(arg) + ": expected str, got " +
                        py::str(py::type::handle_of(text).attr("__name__")).cast<std::string>());
      Py_ssize_t n = 0;
      if (const char* p = PyUnicode_AsUTF8AndSize(text.ptr(), &n)) return std::string_view(p, size_t(n));
      PyErr_Clear();
      py::bytes fixed = py::reinterpret_borrow<py::object>(text)
                            .attr("encode")("utf-16", "surrogatepass")
                            .attr("decode")("utf-16", "replace")
                            .attr("encode")("utf-8");
      *spill = std::string(fixed);
      return *spill;
    };
    auto to_list = [](const std::vector<tk::TokenId>& ids) {
      PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
      if (!list) throw py::error_already_set();
      for (size_t i = 0; i < ids.size(); ++i) {
        PyObject* v = PyLong_FromUnsignedLong(ids[i]);
        if (!v) {
          Py_DECREF(list);
          throw py::error_already_set();
        }
        PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
      }
      return py::reinterpret_steal<py::list>(list);
    };
    // Views of the UTF-8 of each str in `texts`; `keep` holds references (and fallback strings)
    // so the views stay valid while the GIL is released.
    struct TextBatch {
      std::vector<py::object> keep;
      std::vector<std::unique_ptr<std::string>> spill;
      std::vector<std::string_view> views;
    };
    auto batch_of = [utf8_of](const py::sequence& texts, TextBatch* b) {
      const size_t n = py::len(texts);
      b->keep.reserve(n);
      b->views.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        b->keep.push_back(texts[i]);
        auto spill = std::make_unique<std::string>();
        const std::string arg = "texts[" + std::to_string(i) + "]";
        b->views.push_back(utf8_of(b->keep.back(), arg.c_str(), spill.get()));
        if (!spill->empty()) b->spill.push_back(std::move(spill));
      }
    };

    py::class_<tk::BPE>(mt, "BPE", "A byte-level BPE vocabulary with GPT-2's pre-tokenizer")
        .def(py::init<const std::vector<std::pair<std::string, int64_t>>&,
                      const std::vector<std::pair<std::string, std::string>>&,
                      const std::vector<std::pair<std::string, int64_t>>&>(),
             py::arg("vocab"), py::arg("merges"), py::arg("specials"),
             "vocab: [(token bytes, id)], merges: [(left bytes, right bytes)] in rank order, "
             "specials: [(text, id)]")
        .def_static("from_ranks", &tk::BPE::from_ranks, py::arg("ranks"), py::arg("specials"),
                    "tiktoken-style vocabulary: [(token bytes, rank)]; merges are recovered")
        .def_property_readonly("vocab_size", &tk::BPE::vocab_size)
        .def_property_readonly("num_tokens", &tk::BPE::num_tokens)
        .def_property_readonly("num_merges", &tk::BPE::num_merges)
        .def_property_readonly("heap_path_exact", &tk::BPE::heap_path_exact)
        .def("encode",
             [utf8_of, to_list](const tk::BPE& self, py::handle text, const std::vector<std::string>& allowed) {
               std::string spill;
               const std::string_view view = utf8_of(text, "text", &spill);
               std::vector<tk::TokenId> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = self.encode(view, allowed);
               }
               return to_list(ids);
             },
             py::arg("text"), py::arg("allowed"))
        .def("encode_ordinary",
             [utf8_of, to_list](const tk::BPE& self, py::handle text) {
               std::string spill;
               const std::string_view view = utf8_of(text, "text", &spill);
               std::vector<tk::TokenId> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = self.encode_ordinary(view);
               }
               return to_list(ids);
             },
             py::arg("text"))
        .def("encode_bytes",
             [to_list](const tk::BPE& self, const py::bytes& data) {
               const std::string_view view(data);
               std::vector<tk::TokenId> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = self.encode_ordinary(view);
               }
               return to_list(ids);
             },
             py::arg("data"), "encode_ordinary of raw bytes; invalid UTF-8 bytes count as 'other'")
        .def("encode_batch",
             [batch_of, to_list](const tk::BPE& self, const py::sequence& texts,
                                 const std::vector<std::string>& allowed, int num_threads) {
               TextBatch b;
               batch_of(texts, &b);
               std::vector<std::vector<tk::TokenId>> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = self.encode_batch(b.views, allowed, num_threads);
               }
               py::list out(ids.size());
               for (size_t i = 0; i < ids.size(); ++i) out[i] = to_list(ids[i]);
               return out;
             },
             py::arg("texts"), py::arg("allowed"), py::arg("num_threads"))
        .def("encode_batch_flat",
             [batch_of](const tk::BPE& self, const py::sequence& texts,
                        const std::vector<std::string>& allowed, int num_threads) {
               TextBatch b;
               batch_of(texts, &b);
               std::vector<std::vector<tk::TokenId>> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = self.encode_batch(b.views, allowed, num_threads);
               }
               py::array_t<int64_t> offsets(static_cast<py::ssize_t>(ids.size() + 1));
               int64_t* off = offsets.mutable_data();
               off[0] = 0;
               for (size_t i = 0; i < ids.size(); ++i) off[i + 1] = off[i] + int64_t(ids[i].size());
               py::array_t<uint32_t> flat(static_cast<py::ssize_t>(off[ids.size()]));
               uint32_t* dst = flat.mutable_data();
               {
                 py::gil_scoped_release nogil;
                 for (size_t i = 0; i < ids.size(); ++i)
                   std::copy(ids[i].begin(), ids[i].end(), dst + off[i]);
               }
               return py::make_tuple(flat, offsets);
             },
             py::arg("texts"), py::arg("allowed"), py::arg("num_threads"),
             "(tokens as one uint32 array, int64 offsets: text i is tokens[offsets[i]:offsets[i+1]])")
        .def("encode_piece",
             [to_list](const tk::BPE& self, const py::bytes& piece) {
               return to_list(self.encode_piece(std::string_view(piece)));
             },
             py::arg("piece"), "BPE of one piece's bytes, without pre-tokenization or cache")
        .def("decode",
             [](const tk::BPE& self, const py::array_t<int64_t, py::array::c_style>& ids) {
               if (ids.ndim() != 1) throw ValueError("ids: expected a 1-D sequence of token ids");
               std::string out;
               {
                 py::gil_scoped_release nogil;
                 out = self.decode(ids.data(), static_cast<size_t>(ids.size()));
               }
               return py::bytes(out);
             },
             py::arg("ids"))
        .def("decode_list",
             [](const tk::BPE& self, const py::list& ids) {
               // A Python list of ints, read without a NumPy round trip.
               std::vector<int64_t> v(py::len(ids));
               for (size_t i = 0; i < v.size(); ++i) {
                 PyObject* o = PyList_GET_ITEM(ids.ptr(), static_cast<Py_ssize_t>(i));
                 if (!PyLong_Check(o) || PyBool_Check(o))
                   throw TypeError("tokens[" + std::to_string(i) + "]: expected an int token id, got " +
                                   std::string(Py_TYPE(o)->tp_name));
                 int overflow = 0;
                 const long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
                 if (overflow != 0 || (x == -1 && PyErr_Occurred())) {
                   PyErr_Clear();
                   throw ValueError("tokens[" + std::to_string(i) +
                                    "]: not a token id of this tokenizer (too large)");
                 }
                 v[i] = x;
               }
               std::string out;
               {
                 py::gil_scoped_release nogil;
                 out = self.decode(v.data(), v.size());
               }
               return py::bytes(out);
             },
             py::arg("ids"))
        .def("vocab",
             [](const tk::BPE& self) {
               py::list out;
               for (uint32_t id = 0; id < self.vocab_size(); ++id)
                 if (self.has_token(id) && !self.is_special(id))
                   out.append(py::make_tuple(py::bytes(std::string(self.token_bytes(id))), id));
               return out;
             },
             "[(token bytes, id)] of the ordinary tokens, by id")
        .def("merges",
             [](const tk::BPE& self) {
               py::list out;
               for (const auto& m : self.merges())
                 out.append(py::make_tuple(py::bytes(std::string(self.token_bytes(m.left))),
                                           py::bytes(std::string(self.token_bytes(m.right)))));
               return out;
             },
             "[(left bytes, right bytes)] in rank order")
        .def("specials", [](const tk::BPE& self) { return self.specials(); }, "[(text, id)]")
        .def("token_bytes",
             [](const tk::BPE& self, int64_t id) {
               if (id < 0 || !self.has_token(static_cast<uint32_t>(id)))
                 throw ValueError("id: " + std::to_string(id) + " is not a token id of this tokenizer");
               return py::bytes(std::string(self.token_bytes(static_cast<uint32_t>(id))));
             },
             py::arg("id"));

    auto train_config = [](size_t vocab_size, const std::vector<std::string>& special_tokens,
                           uint64_t min_frequency, int num_threads, uint64_t chunk_bytes) {
      tk::TrainConfig config;
      config.vocab_size = vocab_size;
      config.special_tokens = special_tokens;
      config.min_frequency = min_frequency;
      config.num_threads = num_threads;
      if (chunk_bytes > 0) config.chunk_bytes = chunk_bytes;
      return config;
    };
    mt.def("train",
           [batch_of, train_config](const py::sequence& texts, const std::vector<std::string>& files,
                                    size_t vocab_size, const std::vector<std::string>& special_tokens,
                                    uint64_t min_frequency, int num_threads, uint64_t chunk_bytes) {
             TextBatch b;
             batch_of(texts, &b);
             const tk::TrainConfig config =
                 train_config(vocab_size, special_tokens, min_frequency, num_threads, chunk_bytes);
             py::gil_scoped_release nogil;
             return tk::train_bpe(b.views, files, config);
           },
           py::arg("texts"), py::arg("files"), py::arg("vocab_size"), py::arg("special_tokens"),
           py::arg("min_frequency"), py::arg("num_threads"), py::arg("chunk_bytes") = 0);
    mt.def("count_pieces",
           [batch_of, train_config](const py::sequence& texts, const std::vector<std::string>& files,
                                    const std::vector<std::string>& special_tokens, int num_threads,
                                    uint64_t chunk_bytes) {
             TextBatch b;
             batch_of(texts, &b);
             const tk::TrainConfig config = train_config(0, special_tokens, 1, num_threads, chunk_bytes);
             std::vector<std::pair<std::string, uint64_t>> counts;
             {
               py::gil_scoped_release nogil;
               counts = tk::count_pieces(b.views, files, config);
             }
             py::dict out;
             for (const auto& [piece, n] : counts) out[py::bytes(piece)] = n;
             return out;
           },
           py::arg("texts"), py::arg("files"), py::arg("special_tokens"), py::arg("num_threads"),
           py::arg("chunk_bytes") = 0, "training's first step: {piece bytes: count}");
    mt.def("pretokenize",
           [utf8_of](py::handle text) {
             std::string spill;
             const std::string_view view = utf8_of(text, "text", &spill);
             py::list out;
             tk::pretokenize(view, [&](size_t off, size_t len) {
               out.append(py::str(view.data() + off, len));
             });
             return out;
           },
           py::arg("text"), "GPT-2's pre-tokenization pieces of a str");
    mt.def("char_class", [](uint32_t cp) { return static_cast<int>(tk::char_class(cp)); },
           py::arg("cp"), "0 other, 1 letter (\\p{L}), 2 number (\\p{N}), 3 white space (\\s)");
    mt.attr("unicode_version") = tk::unicode_version();
    mt.def("bytes_to_vocab_strings",
           [](const std::vector<std::string>& tokens) {
             py::list out;
             for (const std::string& t : tokens) {
               const std::string s = tk::bytes_to_vocab_string(t);
               out.append(py::str(s.data(), s.size()));
             }
             return out;
           },
           py::arg("tokens"), "token bytes -> GPT-2 vocabulary-file spelling");
    mt.def("vocab_strings_to_bytes",
           [](const std::vector<std::string>& strings) {
             py::list out;
             std::string b;
             for (size_t i = 0; i < strings.size(); ++i) {
               if (!tk::vocab_string_to_bytes(strings[i], &b))
                 throw ValueError("vocabulary entry " + std::to_string(i) + " (" + strings[i].substr(0, 40) +
                                  ") holds a character outside GPT-2's byte alphabet");
               out.append(py::bytes(b));
             }
             return out;
           },
           py::arg("strings"), "GPT-2 vocabulary-file spelling -> token bytes");
    mt.def("vocab_string_to_bytes_or_none",
           [](const std::string& s) -> py::object {
             std::string b;
             if (!tk::vocab_string_to_bytes(s, &b)) return py::none();
             return py::bytes(b);
           },
           py::arg("string"));
  }
  // ==== end tokenizer ====
}
