"""safetensors files by hand (memory-mapped reads, one copy per tensor), bfloat16 bits on the
host, and the error type every checkpoint reader raises."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._fileio import atomic_file as _atomic_file
from .._fileio import parse_json

PathLike = Union[str, "os.PathLike[str]"]



class CheckpointError(ValueError):
    """A checkpoint, vocabulary or shard file that cannot be used (foreign, damaged, mismatched)."""


def _p(path) -> str:
    return os.fspath(path)


# ================================================================================================
# bfloat16 <-> float32 on the host. NumPy has no bfloat16: its bits travel as uint16.
# ================================================================================================


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact: bf16 is the top half of an fp32)."""
    out = np.empty(bits.shape, np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # add 0x7FFF plus the lowest kept bit, then truncate: round half to even
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # the carry could turn a NaN into an infinity or a zero: keep a quiet NaN
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


# ================================================================================================
# Memory maps and the one copy a load makes
# ================================================================================================


def _map_file(path: str, offset: int, length: int, prefetch: bool = False) -> np.ndarray:
    """A read-only uint8 view of ``length`` bytes of ``path`` from ``offset``, memory-mapped.

    ``prefetch`` tells the kernel the whole range will be read in order (asynchronous
    read-ahead), for loaders that are about to copy everything.
    """
    if length == 0:
        return np.zeros(0, np.uint8)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if prefetch:
        for advice in ("MADV_SEQUENTIAL", "MADV_WILLNEED"):
            flag = getattr(mmap, advice, None)
            if flag is not None and hasattr(mm, "madvise"):
                with contextlib.suppress(OSError):
                    mm.madvise(flag)
    return np.frombuffer(mm, dtype=np.uint8, count=length, offset=offset)


def _num_threads() -> int:
    try:
        from .._load import _C
        n = int(_C.get_num_threads())
    except Exception:  # the extension is missing: plain NumPy still works
        n = 0
    return max(1, min(n or (os.cpu_count() or 1), 16))


_COPY_BLOCK = 1 << 20  # bytes of destination per task: a transposed block stays in L2


def _parallel_copy(pairs: Sequence[Tuple[np.ndarray, np.ndarray]]) -> None:
    """``dst[...] = src`` for every pair, in row blocks spread over threads.

    Sources may be memory-mapped, transposed (Conv1D) or float16 views: the block split keeps a
    transposed read cache-friendly, and NumPy drops the GIL while it copies, so page faults on
    the mapping and the transposes proceed in parallel.
    """
    tasks = []
    for dst, src in pairs:
        if dst.ndim == 0 or dst.shape[0] == 0 or dst.size == 0:
            np.copyto(dst, src, casting="same_kind")
            continue
        step = max(1, _COPY_BLOCK // max(1, dst.nbytes // dst.shape[0]))
        for r in range(0, dst.shape[0], step):
            tasks.append((dst[r:r + step], src[r:r + step]))
    workers = min(len(tasks), _num_threads())
    if workers <= 1:
        for d, s in tasks:
            np.copyto(d, s, casting="same_kind")
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda t: np.copyto(t[0], t[1], casting="same_kind"), tasks):
            pass


# ================================================================================================
# safetensors, by hand
#
#   8 bytes      little-endian uint64 N: the header's length
#   N bytes      JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
#                       "__metadata__": {str: str}}   (padded with spaces)
#   the rest     the tensors' bytes, little-endian, row-major; offsets count from here
# ================================================================================================

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
             np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
             np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit too


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    ``raw(name)`` is a zero-copy view with the stored dtype (BF16 as its uint16 bits);
    ``get(name)`` is a NumPy array with a NumPy dtype (F32/F16/ints are still zero-copy views,
    BF16 is converted to a new float32 array). Views stay valid after the file is replaced or
    deleted (the mapping holds the old file).
    """

    def __init__(self, path: PathLike, prefetch: bool = False):
        self.path = path = _p(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"safetensors file {path!r} does not exist")
        if not os.path.isfile(path):
            raise CheckpointError(f"safetensors file {path!r} is not a regular file")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path!r} is {size} bytes: too short for a safetensors file "
                                      "(truncated or not safetensors)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _ST_MAX_HEADER:
                raise CheckpointError(f"{path!r} is not a safetensors file (its first 8 bytes give a "
                                      f"header length of {n})")
            if 8 + n > size:
                raise CheckpointError(f"{path!r} is truncated: its safetensors header needs {n} bytes, "
                                      f"only {size - 8} follow")
            raw_header = f.read(n)
        header = parse_json(raw_header, f"{path!r}: safetensors header (damaged, or not safetensors)",
                            CheckpointError)
        if not isinstance(header, dict):
            raise CheckpointError(f"{path!r}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{path!r}: __metadata__ must map strings to strings")
        self.metadata: Dict[str, str] = meta
        self.data_start = 8 + n
        self.data_len = data_len = size - self.data_start
        entries: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            where = f"{path!r}: tensor {name!r}"
            if not isinstance(info, dict):
                raise CheckpointError(f"{where}: expected an object with dtype, shape, data_offsets")
            dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if dt not in _ST_DTYPES:
                raise CheckpointError(f"{where}: unsupported dtype {dt!r} (gptcore reads "
                                      f"{', '.join(_ST_DTYPES)})")
            if (not isinstance(shape, list)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise CheckpointError(f"{where}: malformed shape {shape!r}")
            # NumPy's limits: 64 dimensions, and dimensions whose product fits its index type
            # even when another dimension is 0 (the data size check below cannot see those)
            if len(shape) > 64 or math.prod(d for d in shape if d) * _ST_DTYPES[dt].itemsize >= 2**63:
                raise CheckpointError(f"{where}: shape {shape!r} is too large for an array")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
                raise CheckpointError(f"{where}: malformed data_offsets {offs!r}")
            begin, end = offs
            nbytes = math.prod(shape) * _ST_DTYPES[dt].itemsize
            if not 0 <= begin <= end:
                raise CheckpointError(f"{where}: malformed data_offsets {offs!r}")
            if end - begin != nbytes:
                raise CheckpointError(f"{where}: holds {end - begin} bytes but {dt} x {tuple(shape)} "
                                      f"needs {nbytes}")
            if end > data_len:
                raise CheckpointError(f"{path!r} is truncated: tensor {name!r} ends at byte {end} of the "
                                      f"data section, which has {data_len} bytes")
            entries[name] = (dt, tuple(shape), begin, end)
        spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
        covered = 0
        for b, e, k in spans:
            if b < covered:
                raise CheckpointError(f"{path!r}: tensor {k!r} overlaps another tensor's bytes")
            if b > covered:
                raise CheckpointError(f"{path!r}: {b - covered} bytes before tensor {k!r} belong to no "
                                      "tensor (damaged file)")
            covered = e
        if covered != data_len:
            raise CheckpointError(f"{path!r}: {data_len - covered} bytes at the end belong to no tensor "
                                  "(damaged file, or not safetensors)")
        self._entries = entries
        self._map = _map_file(path, self.data_start, data_len, prefetch)

    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def dtype(self, name: str) -> str:
        """The stored dtype string ("F32", "BF16", ...)."""
        return self._entry(name)[0]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name)[1]

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path!r} has no tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of the stored data (BF16 as uint16 bits)."""
        dt, shape, begin, end = self._entry(name)
        return self._map[begin:end].view(_ST_DTYPES[dt]).reshape(shape)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array: a view, or a float32 copy for BF16."""
        arr = self.raw(name)
        if self.dtype(name) == "BF16":
            return bf16_bits_to_float32(arr)
        return arr

    def close(self) -> None:
        """Drop this object's mapping (views already handed out keep theirs)."""
        self._map = np.zeros(0, np.uint8)


def load_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
    """name -> array for every tensor in a safetensors file (memory-mapped; BF16 -> float32)."""
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


def _as_host_array(value, name: str) -> Tuple[np.ndarray, Optional[str]]:
    """(array, 'BF16' if the source was a bfloat16 gptcore tensor else None)."""
    src_bf16 = getattr(value, "dtype", None) == "bfloat16" and hasattr(value, "numpy")
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray) and not hasattr(value, "detach"):
        arr = np.asarray(value.numpy())  # gptcore Tensor: CPU float32 is a view, others copy
    else:
        arr = np.asarray(value)
    if arr.dtype not in _NP_TO_ST:
        raise TypeError(f"tensors[{name!r}]: unsupported dtype {arr.dtype}")
    return arr, ("BF16" if src_bf16 else None)


def _write_safetensors(f, tensors: Sequence[Tuple[str, np.ndarray, str]], metadata: Dict[str, str]) -> None:
    """Write (name, array, stored dtype) triples; arrays may be non-contiguous views."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr, dt in tensors:
        nbytes = int(arr.size) * _ST_DTYPES[dt].itemsize
        header[name] = {"dtype": dt, "shape": [int(d) for d in arr.shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)  # tensor data starts 8-byte aligned
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, arr, dt in tensors:
        if dt == "BF16" and arr.dtype == np.uint16:
            data = np.ascontiguousarray(arr)  # already bfloat16 bits
        else:
            want = np.dtype(np.float32) if dt == "BF16" else _ST_DTYPES[dt]
            if arr.dtype == want and arr.flags.c_contiguous:
                data = arr
            else:  # transposed (Conv1D) or converted: one parallel pass
                data = np.empty(arr.shape, want)
                _parallel_copy([(data, arr)])
            if dt == "BF16":
                data = float32_to_bf16_bits(data)
        if data.size:
            f.write(memoryview(data.reshape(-1)).cast("B"))


def _stored_dtype(arr: np.ndarray, want: Optional[str], from_bf16: Optional[str]) -> str:
    if arr.dtype.kind == "f":
        if want is not None:
            return want
        return from_bf16 or _NP_TO_ST[arr.dtype]
    return _NP_TO_ST[arr.dtype]


_FLOAT_FORMATS = {None: None, "float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16",
                  "float16": "F16", "fp16": "F16", "float64": "F64"}


def _float_format(dtype, arg: str = "dtype") -> Optional[str]:
    key = dtype if dtype is None or isinstance(dtype, str) else np.dtype(dtype).name
    if key not in _FLOAT_FORMATS:
        raise ValueError(f"{arg}: expected 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return _FLOAT_FORMATS[key]


def save_safetensors(path: PathLike, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None,
                     dtype=None) -> None:
    """Write ``tensors`` (name -> NumPy array or gptcore Tensor) as a safetensors file, atomically.

    ``dtype`` ('float32', 'bfloat16', 'float16') converts every floating tensor (bfloat16 rounds
    to nearest even); by default each keeps its own dtype (a bfloat16 gptcore tensor stays BF16).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a mapping of name -> array, got {type(tensors).__name__}")
    want = _float_format(dtype)
    meta = {} if metadata is None else dict(metadata)
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("metadata: keys and values must be strings")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensors: invalid tensor name {name!r}")
        arr, src = _as_host_array(value, name)
        items.append((name, arr, _stored_dtype(arr, want, src)))
    with _atomic_file(path) as f:
        _write_safetensors(f, items, meta)


