"""gptcore.Tensor and the ways in and out of it (NumPy, DLPack, Python data)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._load import _C

Tensor = _C.Tensor

DTYPES = ("float32", "bfloat16", "int32", "int64", "uint16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}
_NUMPY_OK = {np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.uint16)}


def _dtype_name(dtype) -> Optional[str]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype, dtype)
    elif hasattr(dtype, "is_floating_point") or type(dtype).__module__.startswith("torch"):
        name = str(dtype).replace("torch.", "")
    else:
        name = np.dtype(dtype).name
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise TypeError(f"dtype: expected one of {', '.join(DTYPES)}; got {dtype!r}")
    return name


def from_numpy(array: np.ndarray, name: str = "array") -> Tensor:
    """Wrap a C-contiguous NumPy array (float32, int32, int64 or uint16) without copying.

    A read-only array (``np.load(..., mmap_mode="r")``, a view of ``bytes``) gives a Tensor with
    ``read_only`` True: ops read it, but refuse it as an output, KV cache, gradient or optimiser
    state, and ``copy_``/``zero_`` refuse it; its ``numpy()`` view is read-only too."""
    return _C.from_numpy(array, name)


def from_dlpack(obj, name: str = "x") -> Tensor:
    """Wrap any object with ``__dlpack__`` (NumPy, PyTorch, CuPy, JAX...) without copying.

    The producer must hold a C-contiguous array of a gptcore dtype on the CPU or a CUDA device.
    A raw DLPack capsule is accepted too.
    """
    if isinstance(obj, Tensor):
        return obj
    if hasattr(obj, "__dlpack__"):
        dev_type = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else 1
        if dev_type == 2:  # CUDA: ask the producer to order its work before ours
            from . import cuda

            stream = cuda.current_stream() or 1  # 1 = the legacy default stream in DLPack
            capsule = obj.__dlpack__(stream=stream)
        else:
            capsule = obj.__dlpack__()
        return _C.from_dlpack_capsule(capsule, name)
    if type(obj).__name__ == "PyCapsule":
        return _C.from_dlpack_capsule(obj, name)
    raise TypeError(f"{name}: expected an object with __dlpack__ or a DLPack capsule, got {type(obj).__name__}")


def as_tensor(x, name: str = "x") -> Tensor:
    """Return ``x`` as a Tensor without copying (the entry point of every op).

    Accepts a gptcore Tensor, a NumPy array or anything with the buffer protocol, or anything
    that speaks DLPack. Non-contiguous input raises ValueError; unsupported dtypes TypeError.
    """
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.ndim == 0:
            raise ValueError(f"{name}: expected an array, got a 0-d scalar")
        return _C.from_numpy(x, name)
    if hasattr(x, "__dlpack__"):
        if hasattr(x, "is_contiguous") and not x.is_contiguous():
            raise ValueError(f"{name}: must be C-contiguous (call .contiguous() first)")
        return from_dlpack(x, name)
    try:
        view = memoryview(x)
    except TypeError:
        raise TypeError(
            f"{name}: expected a gptcore.Tensor, a NumPy array (or other buffer) or a DLPack "
            f"object; got {type(x).__name__}") from None
    return _C.from_numpy(np.asarray(view), name)


def tensor(data, device: str = "cpu", dtype=None) -> Tensor:
    """A new Tensor holding a copy of ``data`` (array, nested lists, scalars, Tensor, DLPack).

    ``dtype`` defaults to the data's own; float64 becomes float32 and Python ints int64.
    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """
    want = _dtype_name(dtype)
    if isinstance(data, Tensor) or (hasattr(data, "__dlpack__") and not isinstance(data, np.ndarray)):
        src = as_tensor(data, "data")
        out = src.to(device=device, dtype=want or src.dtype)
        if out.data_ptr() == src.data_ptr() and src.numel() > 0:  # same place: force a copy
            out = _C.empty(list(src.shape), out.dtype, out.device).copy_(out)
        return out
    arr = np.array(data)
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.int32)
    elif arr.dtype.kind in "iu" and np.dtype(arr.dtype) not in _NUMPY_OK:
        arr = arr.astype(np.int64)
    if want == "bfloat16":
        arr = arr.astype(np.float32)
    elif want is not None:
        arr = arr.astype(want)
    if np.dtype(arr.dtype) not in _NUMPY_OK:
        raise TypeError(f"data: unsupported dtype {arr.dtype}; gptcore holds {', '.join(DTYPES)}")
    arr = np.ascontiguousarray(arr)
    host = _C.from_numpy(arr, "data")
    return host.to(device=device, dtype=want or host.dtype)


def upload(arr: np.ndarray, device: str = "cpu", dtype="float32") -> Tensor:
    """A fresh gptcore-allocated tensor (aligned, owned by gptcore) on ``device`` holding the
    float values of ``arr`` as ``dtype`` (what parameters are made of)."""
    host = _C.from_numpy(np.ascontiguousarray(arr, dtype=np.float32), "arr")
    if device == "cpu" and _dtype_name(dtype) == "float32":
        out = empty(list(host.shape), "float32", "cpu")
        out.copy_(host)
        return out
    return host.to(device=device, dtype=_dtype_name(dtype))


def float_input(x, name: str, device: str, dtype) -> Tensor:
    """``x`` (a Tensor, or anything ``np.asarray`` takes holding floating values) as a ``dtype``
    tensor on ``device``, copied only when it is not one already."""
    if isinstance(x, Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name}: expected floating-point values, got {arr.dtype}")
        t = _C.from_numpy(np.ascontiguousarray(arr, dtype=np.float32), name)
    if t.device != device or t.dtype != _dtype_name(dtype):
        t = t.to(device=device, dtype=_dtype_name(dtype))
    return t


def _shape(shape) -> list:
    """``shape`` as a list of ints the core takes. The core refuses negative dimensions and
    shapes whose element or byte count overflows; here only what pybind11 cannot convert (a
    float, a dimension outside int64) is caught, with the dimension named."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        if hasattr(shape, "__index__") and not isinstance(shape, bool):
            shape = [shape]
        else:
            raise TypeError(f"shape: expected a sequence of ints, got {type(shape).__name__}")
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not hasattr(d, "__index__"):
            raise TypeError(f"shape[{i}]: expected an int, got {type(d).__name__}")
        d = d.__index__()
        if not -2 ** 63 <= d < 2 ** 63:
            raise ValueError(f"shape[{i}]: {d} is outside the 64-bit integer range")
        dims.append(d)
    return dims


def empty(shape: Sequence[int], dtype="float32", device: str = "cpu") -> Tensor:
    """An uninitialised Tensor. A shape whose element or byte count overflows 64 bits raises
    ValueError (it would otherwise wrap around to a tiny buffer)."""
    return _C.empty(_shape(shape), _dtype_name(dtype), device)


def zeros(shape: Sequence[int], dtype="float32", device: str = "cpu") -> Tensor:
    """A Tensor of zeros (shapes checked as in :func:`empty`)."""
    return _C.zeros(_shape(shape), _dtype_name(dtype), device)
