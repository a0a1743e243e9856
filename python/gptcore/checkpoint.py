"""Checkpoints that travel: Hugging Face GPT-2 / GPT-1 directories, safetensors, and llm.c's files.

gptcore's own checkpoint *is* a Hugging Face GPT-2 directory, so ``transformers`` opens it as it is:

    config.json              GPT2Config fields (or OpenAIGPTConfig for a post-LN GPT-1) plus a
                             "gptcore" section (attention windows, biases) that transformers ignores
    model.safetensors        transformers' key names and layouts: Conv1D weights stored (in, out),
                             the embedding unpadded (vocab_size rows), the tied lm_head left out
    optimizer.safetensors    AdamW moments (and fp32 master weights), gptcore names and shapes
    trainer_state.json       step, optimizer hyper-parameters, whatever the trainer wants to keep
    vocab.json, merges.txt   the tokenizer, when one is given

The other formats are llm.c's (https://github.com/karpathy/llm.c): a model ``.bin`` (256 int32
header, magic 20240326, version 3 = fp32 / 5 = bf16, vocabulary padded), token shards (magic
20240520, see :mod:`gptcore.data`) and a tokenizer ``.bin`` (magic 20240328). :func:`convert`
moves a model, a vocabulary or a shard between any of them.

Reading never copies what it does not have to: safetensors and llm.c files are memory-mapped and
each tensor is copied once, straight into the model's parameter memory (transposing Conv1D
weights on the way). Every file is validated before use (sizes, offsets, shapes, magic numbers,
versions): a foreign or truncated file gets a ValueError naming the file and what is wrong, a
missing tensor or a wrong shape one naming the key, the expected and the found shape. Nothing is
built until everything has been checked, so a failed load never leaves a half-initialised model.
Writing goes to a temporary name next to the target, is fsync'ed, then renamed into place: a
failed save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import mmap
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .config import GPTConfig
from .data import HEADER_BYTES as _LLMC_HEADER_BYTES, HEADER_INTS as _LLMC_HEADER_INTS
from .data import read_llmc_header

__all__ = [
    "CheckpointError", "SafetensorsFile", "load_safetensors", "save_safetensors",
    "save_pretrained", "load_pretrained", "load_weights", "load_training_state", "read_weights",
    "write_weights",
    "read_llmc_model", "write_llmc_model", "LlmcTokenizer", "read_llmc_tokenizer",
    "write_llmc_tokenizer", "read_gpt2_vocab", "write_gpt2_vocab", "load_tokenizer", "detect_format",
    "convert",
    "LLMC_MODEL_MAGIC", "LLMC_TOKENIZER_MAGIC", "LLMC_SHARD_MAGIC",
]

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
        from ._load import _C
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
# Atomic writing
# ================================================================================================


from ._fileio import atomic_file as _atomic_file, fsync_path as _fsync_path, temp_name as _temp_name  # noqa: E402


# Files a checkpoint directory may hold; anything else found in a directory being replaced is
# carried over to the new one (a README, a model card...), these are not (they would be stale).
_CHECKPOINT_FILES = {
    "config.json", "model.safetensors", "model.safetensors.index.json", "optimizer.safetensors",
    "trainer_state.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "pytorch_model.bin", "encoder.json",
    "vocab.bpe", "special_tokens.json",
    "model.npz", "optim.npz", "state.json",  # gptcore train's first format, replaced on save
}


@contextlib.contextmanager
def _atomic_directory(path: PathLike) -> Iterator[str]:
    """Yield an empty temporary directory next to ``path``; on success fsync everything in it and
    swap it in for ``path``. An existing checkpoint at ``path`` is replaced only once the new one
    is complete; on any error it is left as it was and the temporary directory is removed.

    ``path`` may be missing, an empty directory or a checkpoint directory (one holding a
    config.json); anything else is refused rather than deleted.
    """
    path = os.path.abspath(_p(path))
    parent = os.path.dirname(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{path!r} exists and is not a directory; refusing to replace it")
        entries = os.listdir(path)
        if entries and "config.json" not in entries:
            raise FileExistsError(f"{path!r} is a non-empty directory without a config.json (not a "
                                  "checkpoint); refusing to replace it")
    os.makedirs(parent, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    os.mkdir(tmp, 0o777)
    old = None
    try:
        yield tmp
        written = set(os.listdir(tmp))
        for name in written:
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                _fsync_path(full)
        _fsync_path(tmp, directory=True)
        if os.path.lexists(path):
            old = _temp_name(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(old, path)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(parent, directory=True)
    # A crash from here on leaves the previous checkpoint as .NAME.old-XXXX; nothing is lost.
    if old is not None:
        for name in os.listdir(old):
            if name not in written and name not in _CHECKPOINT_FILES:
                os.rename(os.path.join(old, name), os.path.join(path, name))
    for stale in _old_copies(path):  # this one, and any an earlier crash left behind
        shutil.rmtree(stale, ignore_errors=True)


def _old_copies(path: str) -> List[str]:
    """Previous checkpoints moved aside (.NAME.old-XXXX) next to ``path``, newest last."""
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    olds = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f".{base}.old-")]
    return sorted(olds, key=os.path.getmtime)


def _resolve_checkpoint_dir(path: str) -> str:
    """``path``, or the previous checkpoint left as .NAME.old-XXXX by a crash mid-swap."""
    if os.path.exists(path):
        return path
    olds = _old_copies(path)
    if olds:
        return olds[-1]
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")


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


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r}")
        out[k] = v
    return out


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
        try:
            header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except CheckpointError as e:
            raise CheckpointError(f"{path!r}: damaged safetensors header ({e})") from None
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(f"{path!r} is not a safetensors file (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path!r}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
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


# ================================================================================================
# The neutral form every format converts through: a GPTConfig and gptcore-named arrays
# (wte unpadded (vocab_size, C), linear weights (out, in)); arrays may be views into a mapping.
# ================================================================================================


def _expected_shapes(cfg: GPTConfig) -> Dict[str, Tuple[int, ...]]:
    C = cfg.n_embd
    out: Dict[str, Tuple[int, ...]] = {"wte": (cfg.vocab_size, C), "wpe": (cfg.block_size, C)}

    def ln(p):
        out[p + ".weight"] = (C,)
        if cfg.bias:
            out[p + ".bias"] = (C,)

    def lin(p, o, i):
        out[p + ".weight"] = (o, i)
        if cfg.bias:
            out[p + ".bias"] = (o,)

    for i in range(cfg.n_layer):
        h = f"h.{i}"
        ln(h + ".ln_1")
        lin(h + ".attn.c_attn", 3 * C, C)
        lin(h + ".attn.c_proj", C, C)
        ln(h + ".ln_2")
        lin(h + ".mlp.c_fc", 4 * C, C)
        lin(h + ".mlp.c_proj", C, 4 * C)
    if cfg.prenorm:
        ln("ln_f")
    return out


def _model_state(model) -> Dict[str, np.ndarray]:
    """gptcore-named float arrays of a GPT, wte unpadded; CPU float32 parameters are not copied."""
    V = model.config.vocab_size
    out = {}
    for name, p in model.parameters().items():
        arr = np.asarray(p.numpy())
        if name == "wte":
            arr = arr[:V]
        out[name] = arr
    return out


def _gpt_class():
    from .model import GPT
    return GPT


def _host_view(p) -> Optional[np.ndarray]:
    """A writable NumPy view of a CPU float32 parameter's own memory, or None."""
    if p.device != "cpu" or p.dtype != "float32":
        return None
    view = p.numpy()
    if isinstance(view, np.ndarray) and view.flags.writeable and view.ctypes.data == p.data_ptr():
        return view
    return None


def _build_model(cfg: GPTConfig, state: Mapping[str, np.ndarray], device: str, dtype: str):
    """A GPT holding ``state`` (already validated against ``cfg``).

    CPU float32 parameters receive each tensor with one copy, straight from the file's mapping;
    other devices and dtypes go through one float32 host buffer per tensor.
    """
    GPT = _gpt_class()
    kwargs = {}
    try:  # skip the random initialisation when the model offers that (it would be overwritten)
        if "init" in inspect.signature(GPT.__init__).parameters:
            kwargs["init"] = False
    except (TypeError, ValueError):
        pass
    model = GPT(cfg, device=device, dtype=dtype, **kwargs)
    _copy_weights(model, state)
    return model


def _copy_weights(model, state: Mapping[str, np.ndarray]) -> None:
    """Copy validated gptcore-named arrays into ``model``'s parameters."""
    from .tensor import from_numpy
    V = model.config.vocab_size
    direct, staged = [], []
    for name, p in model.parameters().items():
        dst = _host_view(p)
        if dst is None:
            staged.append((name, p))
            continue
        if name == "wte":
            dst[V:] = 0.0  # padding rows
            dst = dst[:V]
        direct.append((dst, state[name]))
    _parallel_copy(direct)
    for name, p in staged:
        host = np.zeros(tuple(p.shape), np.float32)
        _parallel_copy([(host[:V] if name == "wte" else host, state[name])])
        p.copy_(from_numpy(host, name).to(device=p.device, dtype=p.dtype))


# ================================================================================================
# Hugging Face GPT-2 (GPT2LMHeadModel) and GPT-1 (OpenAIGPTLMHeadModel) directories
# ================================================================================================

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# transformers' names for the activations gptcore computes (the tanh approximation of GELU)
_TANH_GELU_GPT2 = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# OpenAIGPT's `afn` table maps "gelu" to the tanh approximation (gelu_new), as the original GPT-1
_TANH_GELU_GPT1 = ("gelu", "gelu_new")
GPTCORE_FORMAT_VERSION = 1


def _hf_key(name: str, prenorm: bool) -> str:
    """gptcore name -> transformers key (with the 'transformer.' prefix)."""
    if not prenorm:
        name = {"wte": "tokens_embed", "wpe": "positions_embed"}.get(name, name)
    if name in ("wte", "wpe", "tokens_embed", "positions_embed"):
        name += ".weight"
    return "transformer." + name


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def _hf_config(cfg: GPTConfig, dtype: str, eot: Optional[int]) -> Dict[str, Any]:
    common = {
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.ln_eps,
        "initializer_range": 0.02, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "tie_word_embeddings": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if cfg.prenorm:
        d = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": cfg.block_size,
             "n_inner": None, "activation_function": "gelu_new", "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
             "use_cache": True, **common}
    else:
        d = {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", "afn": "gelu",
             "n_ctx": cfg.block_size, **common}
    if eot is not None and 0 <= eot < cfg.vocab_size:
        d["bos_token_id"] = d["eos_token_id"] = int(eot)
    d["gptcore"] = {"format_version": GPTCORE_FORMAT_VERSION, "attn_window": list(cfg.attn_window),
                    "bias": cfg.bias, "prenorm": cfg.prenorm}
    return d


def _int_field(d: Mapping, key: str, where: str, *fallbacks: str) -> int:
    for k in (key,) + fallbacks:
        v = d.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CheckpointError(f"{where}: {k} must be a positive integer, got {v!r}")
            return v
    raise CheckpointError(f"{where}: missing field {key!r}")


def _config_from_hf(d: Any, where: str) -> GPTConfig:
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    mtype = d.get("model_type")
    if mtype not in ("gpt2", "openai-gpt"):
        raise CheckpointError(f"{where}: model_type {mtype!r} is not supported (gptcore reads 'gpt2' "
                              "and 'openai-gpt' checkpoints)")
    prenorm = mtype == "gpt2"
    n_embd = _int_field(d, "n_embd", where)
    if prenorm:
        act = d.get("activation_function", "gelu_new")
        if act not in _TANH_GELU_GPT2:
            raise CheckpointError(f"{where}: activation_function {act!r} is not supported (gptcore "
                                  f"computes the tanh GELU: {', '.join(_TANH_GELU_GPT2)})")
        if d.get("n_inner") not in (None, 4 * n_embd):
            raise CheckpointError(f"{where}: n_inner {d.get('n_inner')!r} is not supported (gptcore's "
                                  f"MLP is 4 * n_embd = {4 * n_embd} wide)")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if key in d and bool(d[key]) != ok:
                raise CheckpointError(f"{where}: {key}={d[key]!r} is not supported (gptcore needs {ok})")
    else:
        act = d.get("afn", "gelu")
        if act not in _TANH_GELU_GPT1:
            raise CheckpointError(f"{where}: afn {act!r} is not supported (gptcore computes the tanh "
                                  "GELU, which OpenAIGPT calls 'gelu')")
    if d.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{where}: tie_word_embeddings is false; gptcore's LM head is always tied")
    extra = d.get("gptcore") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: the 'gptcore' section must be an object")
    if extra.get("format_version", GPTCORE_FORMAT_VERSION) > GPTCORE_FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by a newer gptcore (format_version "
                              f"{extra.get('format_version')}); upgrade gptcore to read it")
    if "prenorm" in extra and bool(extra["prenorm"]) != prenorm:
        raise CheckpointError(f"{where}: gptcore.prenorm={extra['prenorm']!r} contradicts "
                              f"model_type {mtype!r}")
    eps = d.get("layer_norm_epsilon", 1e-5)
    try:
        return GPTConfig(n_layer=_int_field(d, "n_layer", where), n_head=_int_field(d, "n_head", where),
                         n_embd=n_embd, block_size=_int_field(d, "n_positions", where, "n_ctx"),
                         vocab_size=_int_field(d, "vocab_size", where), prenorm=prenorm,
                         attn_window=extra.get("attn_window"), bias=bool(extra.get("bias", True)),
                         ln_eps=eps)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path!r} is not valid JSON ({e})") from None


def _open_hf_tensors(directory: str) -> Dict[str, Tuple[SafetensorsFile, str]]:
    """key -> (file, key) over model.safetensors or a sharded model.safetensors.index.json."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        f = SafetensorsFile(single, prefetch=True)
        return {k: (f, k) for k in f.keys()}
    if os.path.isfile(index):
        idx = _read_json(index)
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict):
            raise CheckpointError(f"{index!r}: missing weight_map")
        files: Dict[str, SafetensorsFile] = {}
        out = {}
        for key, fname in wmap.items():
            if not isinstance(fname, str) or os.path.basename(fname) != fname:
                raise CheckpointError(f"{index!r}: bad shard name {fname!r} for {key!r}")
            if fname not in files:
                files[fname] = SafetensorsFile(os.path.join(directory, fname), prefetch=True)
            if key not in files[fname]:
                raise CheckpointError(f"{index!r} places {key!r} in {fname!r}, which does not hold it")
            out[key] = (files[fname], key)
        return out
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        raise CheckpointError(f"{directory!r} holds only pytorch_model.bin (a pickle); gptcore reads "
                              "safetensors. Re-save it with transformers: "
                              "model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"checkpoint {directory!r} has no model.safetensors")


def _read_hf_dir(directory: str) -> Tuple[GPTConfig, Dict[str, np.ndarray], str]:
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"checkpoint {directory!r} has no config.json")
    cfg = _config_from_hf(_read_json(cfg_path), cfg_path)
    tensors = _open_hf_tensors(directory)
    where = os.path.join(directory, "model.safetensors")
    # accept keys with or without the 'transformer.' prefix
    by_name: Dict[str, str] = {}
    lm_head = None
    for key in tensors:
        short = key[len("transformer."):] if key.startswith("transformer.") else key
        if key == "lm_head.weight":
            lm_head = key
            continue
        if short.endswith((".attn.bias", ".attn.masked_bias")) or short == "position_ids":
            continue  # causal-mask buffers of older transformers
        if short in by_name:
            raise CheckpointError(f"{where}: tensor {short!r} appears twice (with and without the "
                                  "'transformer.' prefix)")
        by_name[short] = key
    expected = _expected_shapes(cfg)
    rename = {}  # transformers' short name -> gptcore name
    for name in expected:
        hf = _hf_key(name, cfg.prenorm)[len("transformer."):]
        rename[hf] = name
    if not cfg.bias:  # written by gptcore as zeros (transformers' models always have biases)
        for k in [k for k in by_name if k.endswith(".bias") and k[:-5] + ".weight" in rename]:
            f, key = tensors[by_name.pop(k)]
            if np.any(f.get(key)):
                raise CheckpointError(f"{where}: config.json says the model has no biases, but "
                                      f"{key!r} is not zero")
    unknown = sorted(k for k in by_name if k not in rename)
    if unknown:
        names = ", ".join(repr(by_name[k]) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        arch = "GPT2LMHeadModel" if cfg.prenorm else "OpenAIGPTLMHeadModel"
        raise CheckpointError(f"{where}: unexpected tensor(s) {names} (not a {arch} checkpoint "
                              "matching config.json?)")
    missing = [hf for hf in rename if hf not in by_name]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {'transformer.' + missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    state: Dict[str, np.ndarray] = {}
    stored = set()
    for hf, name in rename.items():
        f, key = tensors[by_name[hf]]
        shape = f.shape(key)
        want = expected[name]
        if _is_conv1d(name):
            want = (want[1], want[0])  # Conv1D stores (in, out)
        if shape != want:
            layout = " (Conv1D layout (in, out))" if _is_conv1d(name) else ""
            raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, expected {want}{layout}")
        dt = f.dtype(key)
        if dt not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {dt}; expected a floating type")
        stored.add(dt)
        arr = f.get(key)
        state[name] = arr.T if _is_conv1d(name) else arr
    if lm_head is not None:
        f, key = tensors[lm_head]
        if f.shape(key) != expected["wte"] or not np.array_equal(f.get(key), state["wte"]):
            raise CheckpointError(f"{where}: lm_head.weight differs from the token embedding; gptcore's "
                                  "LM head is tied to it (untied heads are not supported)")
    dtype = "bfloat16" if stored == {"BF16"} else "float32"
    return cfg, state, dtype


def _check_state(cfg: GPTConfig, state: Mapping[str, Any], where: str) -> None:
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    for k, want in expected.items():
        got = tuple(np.shape(state[k]))
        if got != want:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {got}, expected {want}")


def _write_hf_dir(directory: str, cfg: GPTConfig, state: Mapping[str, np.ndarray], dtype: str,
                  eot: Optional[int]) -> None:
    """Write config.json + model.safetensors into ``directory`` (which must exist)."""
    fmt = _float_format(dtype)
    items = []
    C = cfg.n_embd
    for name in _expected_shapes(cfg):
        arr = state[name]
        if _is_conv1d(name):
            arr = np.asarray(arr).T  # (out, in) -> Conv1D (in, out); made contiguous while writing
        items.append((_hf_key(name, cfg.prenorm), arr, fmt))
    if not cfg.bias:  # transformers' GPT-2/GPT-1 always have biases: zeros are the same model
        for i in range(cfg.n_layer):
            for sub, width in (("ln_1", C), ("attn.c_attn", 3 * C), ("attn.c_proj", C), ("ln_2", C),
                               ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)):
                items.append((f"transformer.h.{i}.{sub}.bias", np.zeros(width, np.float32), fmt))
        if cfg.prenorm:
            items.append(("transformer.ln_f.bias", np.zeros(C, np.float32), fmt))
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        _write_safetensors(f, items, {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_hf_config(cfg, dtype, eot), f, indent=2)
        f.write("\n")


# ================================================================================================
# llm.c model .bin
#
#   header  256 x int32: [0] 20240326, [1] version (3: fp32, 5: bf16), [2] maxT, [3] V, [4] L,
#           [5] NH, [6] C, [7] Vp (V padded, llm.c pads to a multiple of 128)
#   params  in this order, each row-major, linear weights (out, in) like gptcore's:
#           wte (Vp, C), wpe (maxT, C), ln1w (L, C), ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
#           attprojw (L, C, C), attprojb (L, C), ln2w (L, C), ln2b (L, C), fcw (L, 4C, C),
#           fcb (L, 4C), fcprojw (L, C, 4C), fcprojb (L, C), lnfw (C), lnfb (C)
# ================================================================================================

LLMC_MODEL_MAGIC = 20240326
LLMC_TOKENIZER_MAGIC = 20240328
LLMC_SHARD_MAGIC = 20240520
_LLMC_VERSIONS = {3: "float32", 5: "bfloat16"}


def _llmc_layout(L: int, C: int, maxT: int, Vp: int):
    """(llm.c name, shape, gptcore name pattern or None for wte) in file order."""
    return [
        ("wte", (Vp, C), "wte"), ("wpe", (maxT, C), "wpe"),
        ("ln1w", (L, C), "h.{}.ln_1.weight"), ("ln1b", (L, C), "h.{}.ln_1.bias"),
        ("qkvw", (L, 3 * C, C), "h.{}.attn.c_attn.weight"), ("qkvb", (L, 3 * C), "h.{}.attn.c_attn.bias"),
        ("attprojw", (L, C, C), "h.{}.attn.c_proj.weight"), ("attprojb", (L, C), "h.{}.attn.c_proj.bias"),
        ("ln2w", (L, C), "h.{}.ln_2.weight"), ("ln2b", (L, C), "h.{}.ln_2.bias"),
        ("fcw", (L, 4 * C, C), "h.{}.mlp.c_fc.weight"), ("fcb", (L, 4 * C), "h.{}.mlp.c_fc.bias"),
        ("fcprojw", (L, C, 4 * C), "h.{}.mlp.c_proj.weight"), ("fcprojb", (L, C), "h.{}.mlp.c_proj.bias"),
        ("lnfw", (C,), "ln_f.weight"), ("lnfb", (C,), "ln_f.bias"),
    ]


def _read_header(path: str, what: str) -> Tuple[np.ndarray, int]:
    return read_llmc_header(path, what, error=CheckpointError)


def read_llmc_model(path: PathLike) -> Tuple[GPTConfig, Dict[str, np.ndarray], str]:
    """(config, gptcore-named arrays, 'float32'|'bfloat16') from an llm.c model .bin.

    fp32 files are memory-mapped (the arrays are views); bf16 ones are converted to float32.
    """
    path = _p(path)
    h, size = _read_header(path, "llm.c model file")
    if int(h[0]) != LLMC_MODEL_MAGIC:
        raise CheckpointError(f"{path!r} is not an llm.c model file: magic {int(h[0])}, expected "
                              f"{LLMC_MODEL_MAGIC}")
    version = int(h[1])
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    if version not in _LLMC_VERSIONS or Vp == 0:
        raise CheckpointError(f"{path!r}: llm.c model version {version}"
                              f"{' without a padded vocabulary size' if Vp == 0 else ''} is not supported "
                              "(gptcore reads version 3 = fp32 and 5 = bf16 with a padded vocabulary; "
                              "re-export it with llm.c's current train_gpt2.py)")
    for name, v in (("max_seq_len", maxT), ("vocab_size", V), ("num_layers", L), ("num_heads", NH),
                    ("channels", C), ("padded_vocab_size", Vp)):
        if v < 1:
            raise CheckpointError(f"{path!r}: damaged header, {name} = {v}")
    if Vp < V:
        raise CheckpointError(f"{path!r}: damaged header, padded_vocab_size {Vp} < vocab_size {V}")
    if C % NH:
        raise CheckpointError(f"{path!r}: damaged header, {NH} heads do not divide {C} channels")
    dtype = _LLMC_VERSIONS[version]
    item = 4 if dtype == "float32" else 2
    layout = _llmc_layout(L, C, maxT, Vp)
    n_params = sum(math.prod(s) for _, s, _ in layout)
    expected = _LLMC_HEADER_BYTES + n_params * item
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"{path!r} is {what}: the header (L={L}, C={C}, maxT={maxT}, Vp={Vp}, "
                              f"{dtype}) needs {expected} bytes, the file has {size}")
    flat = _map_file(path, _LLMC_HEADER_BYTES, n_params * item, prefetch=True).view(
        "<f4" if item == 4 else "<u2")
    try:
        cfg = GPTConfig(n_layer=L, n_head=NH, n_embd=C, block_size=maxT, vocab_size=V)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r}: {e}") from None
    state: Dict[str, np.ndarray] = {}
    pos = 0
    for lname, shape, pattern in layout:
        n = math.prod(shape)
        block = flat[pos:pos + n].reshape(shape)
        pos += n
        if item == 2:
            block = bf16_bits_to_float32(block)
        if lname == "wte":
            state["wte"] = block[:V]
        elif "{}" in pattern:
            for i in range(L):
                state[pattern.format(i)] = block[i]
        else:
            state[pattern] = block
    return cfg, state, dtype


def _llmc_compatible(cfg: GPTConfig, where: str) -> None:
    why = None
    if not cfg.prenorm:
        why = "it holds pre-LN GPT-2 models only (this is a post-LN GPT-1)"
    elif any(w is not None for w in cfg.attn_window):
        why = "llm.c's attention is dense (this model has banded layers)"
    elif cfg.ln_eps != 1e-5:
        why = f"llm.c's LayerNorm epsilon is 1e-5 (this model's is {cfg.ln_eps})"
    if why:
        raise ValueError(f"{where}: cannot write this model in llm.c's format: {why}")


def _write_llmc(f, cfg: GPTConfig, state: Mapping[str, np.ndarray], dtype: str) -> None:
    version = {v: k for k, v in _LLMC_VERSIONS.items()}[dtype]
    L, C, V, Vp, maxT = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size, cfg.block_size
    header = np.zeros(_LLMC_HEADER_INTS, dtype="<i4")
    header[:8] = [LLMC_MODEL_MAGIC, version, maxT, V, L, cfg.n_head, C, Vp]
    f.write(header.tobytes())

    def put(arr):
        if dtype == "bfloat16":
            data = float32_to_bf16_bits(np.asarray(arr, dtype=np.float32))
        else:
            data = np.ascontiguousarray(arr, dtype="<f4")
        f.write(memoryview(data.reshape(-1)).cast("B"))

    for lname, shape, pattern in _llmc_layout(L, C, maxT, Vp):
        if lname == "wte":
            put(state["wte"])
            if Vp > V:
                put(np.zeros((Vp - V, C), np.float32))
        elif "{}" in pattern:
            for i in range(L):
                key = pattern.format(i)
                put(state[key] if key in state else np.zeros(shape[1:], np.float32))  # bias-free
        else:
            put(state[pattern] if pattern in state else np.zeros(shape, np.float32))


def write_llmc_model(path: PathLike, cfg: GPTConfig, state: Mapping[str, Any],
                     dtype: str = "float32") -> None:
    """Write gptcore-named arrays as an llm.c model .bin (version 3 fp32 or 5 bf16), atomically."""
    dt = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype: llm.c model files are 'float32' or 'bfloat16', got {dtype!r}")
    _llmc_compatible(cfg, _p(path))
    _check_state(cfg, state, "state")
    with _atomic_file(path) as f:
        _write_llmc(f, cfg, state, dt)


# ================================================================================================
# Vocabularies: llm.c's tokenizer .bin, and GPT-2's vocab.json + merges.txt
#
#   tokenizer .bin: header 256 x int32: [0] 20240328, [1] version (1, or 2 with [3] = eot token),
#                   [2] number of tokens; then per token a uint8 length and that many bytes.
# ================================================================================================


@dataclass
class LlmcTokenizer:
    """A byte-level vocabulary: ``tokens[i]`` are the bytes token i decodes to."""

    tokens: List[bytes]
    eot_token: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.tokens[int(i)] for i in ids)


def read_llmc_tokenizer(path: PathLike) -> LlmcTokenizer:
    path = _p(path)
    h, size = _read_header(path, "llm.c tokenizer file")
    if int(h[0]) != LLMC_TOKENIZER_MAGIC:
        raise CheckpointError(f"{path!r} is not an llm.c tokenizer file: magic {int(h[0])}, expected "
                              f"{LLMC_TOKENIZER_MAGIC}")
    version, n = int(h[1]), int(h[2])
    if version not in (1, 2):
        raise CheckpointError(f"{path!r}: llm.c tokenizer version {version} is not supported (1 or 2)")
    if n < 1:
        raise CheckpointError(f"{path!r}: damaged header, {n} tokens")
    eot = int(h[3]) if version == 2 else (50256 if n == 50257 else None)
    if eot is not None and not 0 <= eot < n:
        raise CheckpointError(f"{path!r}: end-of-text token {eot} is outside the vocabulary of {n}")
    with open(path, "rb") as f:
        f.seek(_LLMC_HEADER_BYTES)
        body = f.read()
    tokens: List[bytes] = []
    pos = 0
    for i in range(n):
        if pos >= len(body):
            raise CheckpointError(f"{path!r} is truncated: it ends before token {i} of {n}")
        length = body[pos]
        if length == 0:
            raise CheckpointError(f"{path!r}: token {i} has length 0 (damaged file)")
        if pos + 1 + length > len(body):
            raise CheckpointError(f"{path!r} is truncated: token {i} of {n} needs {length} bytes, "
                                  f"{len(body) - pos - 1} remain")
        tokens.append(body[pos + 1:pos + 1 + length])
        pos += 1 + length
    if pos != len(body):
        raise CheckpointError(f"{path!r} has {len(body) - pos} bytes after its last token (damaged file)")
    return LlmcTokenizer(tokens, eot)


def _tokenizer_vocab(tokenizer) -> LlmcTokenizer:
    """The per-id bytes of any tokenizer object (gptcore's, tiktoken's, an LlmcTokenizer)."""
    if isinstance(tokenizer, LlmcTokenizer):
        return tokenizer
    n = getattr(tokenizer, "vocab_size", None) or getattr(tokenizer, "n_vocab", None)
    if not isinstance(n, int) or n < 1:
        raise TypeError(f"tokenizer: expected a tokenizer with vocab_size and decode_bytes, got "
                        f"{type(tokenizer).__name__}")
    if hasattr(tokenizer, "token_bytes"):
        tokens = [bytes(tokenizer.token_bytes(i)) for i in range(n)]
    elif hasattr(tokenizer, "decode_bytes"):
        tokens = [bytes(tokenizer.decode_bytes([i])) for i in range(n)]
    else:
        raise TypeError(f"tokenizer: {type(tokenizer).__name__} has no decode_bytes")
    eot = getattr(tokenizer, "eot_token", None)
    return LlmcTokenizer(tokens, int(eot) if eot is not None else None)


def write_llmc_tokenizer(path: PathLike, tokenizer, eot_token: Optional[int] = None) -> None:
    """Write a vocabulary (LlmcTokenizer, gptcore/tiktoken tokenizer) as llm.c's tokenizer .bin v2."""
    vocab = _tokenizer_vocab(tokenizer)
    eot = vocab.eot_token if eot_token is None else int(eot_token)
    if eot is None:
        raise ValueError("eot_token: the vocabulary has no end-of-text token; pass eot_token=")
    if not 0 <= eot < vocab.vocab_size:
        raise ValueError(f"eot_token: {eot} is outside the vocabulary of {vocab.vocab_size}")
    for i, b in enumerate(vocab.tokens):
        if not 1 <= len(b) <= 255:
            raise ValueError(f"tokenizer: token {i} is {len(b)} bytes; llm.c stores 1 to 255")
    header = np.zeros(_LLMC_HEADER_INTS, dtype="<i4")
    header[:4] = [LLMC_TOKENIZER_MAGIC, 2, vocab.vocab_size, eot]
    body = b"".join(bytes([len(b)]) + b for b in vocab.tokens)
    with _atomic_file(path) as f:
        f.write(header.tobytes())
        f.write(body)


def _byte_unicode_table() -> List[str]:
    """GPT-2's byte -> printable character table used in vocab.json and merges.txt.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (controls,
    space, soft hyphen...) are given the characters 256, 257, ... in byte order.
    """
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


_B2U = _byte_unicode_table()
_U2B = {c: b for b, c in enumerate(_B2U)}


def _bytes_to_vocab_str(b: bytes) -> str:
    return "".join(_B2U[x] for x in b)


def _vocab_str_to_bytes(s: str) -> bytes:
    try:
        return bytes(_U2B[c] for c in s)
    except KeyError:  # an added token written as plain text
        return s.encode("utf-8")


def _recover_merges(vocab: LlmcTokenizer) -> List[Tuple[bytes, bytes]]:
    """The BPE merges of a byte-level vocabulary whose ids are merge ranks (GPT-2, tiktoken).

    Token t (beyond the single bytes) is the merge that running BPE on its own bytes with every
    earlier merge stops one step short of: those two parts are t's merge.
    """
    rank: Dict[bytes, int] = {}
    specials = {vocab.eot_token} if vocab.eot_token is not None else set()
    for i, b in enumerate(vocab.tokens):
        if i in specials:
            continue
        if b in rank:
            raise CheckpointError(f"vocabulary: tokens {rank[b]} and {i} are the same bytes {b!r}")
        rank[b] = i
    singles = [bytes([x]) for x in range(256)]
    missing = [s for s in singles if s not in rank]
    if missing:
        raise CheckpointError(f"vocabulary: not byte-level BPE, byte {missing[0]!r} has no token")
    merges = []
    for t, tb in enumerate(vocab.tokens):
        if t in specials or len(tb) == 1:
            continue
        parts = [tb[k:k + 1] for k in range(len(tb))]
        while len(parts) > 2:
            best, at = t, -1
            for k in range(len(parts) - 1):
                r = rank.get(parts[k] + parts[k + 1])
                if r is not None and r < best:
                    best, at = r, k
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2 or rank.get(parts[0], t) >= t or rank.get(parts[1], t) >= t:
            raise CheckpointError(f"vocabulary: token {t} ({tb!r}) is not the merge of two earlier tokens "
                                  "(ids are not BPE merge ranks)")
        merges.append((parts[0], parts[1]))
    return merges


def write_gpt2_vocab(directory: PathLike, tokenizer) -> None:
    """Write ``vocab.json`` + ``merges.txt`` (transformers' names) and the same files as
    ``encoder.json`` + ``vocab.bpe`` (OpenAI's, read by gptcore.Tokenizer.load) into ``directory``.

    ``tokenizer`` is an LlmcTokenizer or any tokenizer with ``vocab_size`` and ``decode_bytes``;
    the merges are recovered from the token order. Not atomic on its own (used inside a
    checkpoint's temporary directory).
    """
    vocab = _tokenizer_vocab(tokenizer)
    merges = _recover_merges(vocab)
    directory = _p(directory)
    os.makedirs(directory, exist_ok=True)
    table = {_bytes_to_vocab_str(b) if i != vocab.eot_token else b.decode("utf-8", "replace"): i
             for i, b in enumerate(vocab.tokens)}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{_bytes_to_vocab_str(a)} {_bytes_to_vocab_str(b)}\n")
    if vocab.eot_token is not None:
        with open(os.path.join(directory, "special_tokens.json"), "w", encoding="utf-8") as f:
            json.dump({vocab.tokens[vocab.eot_token].decode("utf-8", "replace"): vocab.eot_token}, f,
                      ensure_ascii=False)
    _mirror_vocab_files(directory)


def read_gpt2_vocab(path: PathLike) -> LlmcTokenizer:
    """Per-id bytes from GPT-2 style files: a directory (or file) with vocab.json / encoder.json,
    or a transformers tokenizer.json."""
    path = _p(path)
    if os.path.isdir(path):
        for name in ("vocab.json", "encoder.json", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path!r} holds no vocab.json, encoder.json or tokenizer.json")
    data = _read_json(path)
    added: Dict[int, str] = {}
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # tokenizer.json
        model = data["model"]
        if model.get("type") not in (None, "BPE") or not isinstance(model.get("vocab"), dict):
            raise CheckpointError(f"{path!r}: not a BPE tokenizer.json")
        for tok in data.get("added_tokens") or []:
            if (isinstance(tok, dict) and isinstance(tok.get("id"), int)
                    and isinstance(tok.get("content"), str)):
                added[tok["id"]] = tok["content"]
        data = model["vocab"]
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise CheckpointError(f"{path!r}: expected a JSON object mapping token strings to ids")
    by_id: Dict[int, bytes] = {}
    for s, i in data.items():
        by_id[i] = _vocab_str_to_bytes(s)
    for i, s in added.items():
        by_id.setdefault(i, s.encode("utf-8"))
    n = len(by_id)
    if sorted(by_id) != list(range(n)):
        raise CheckpointError(f"{path!r}: token ids are not 0..{n - 1} without gaps")
    eot = None
    for i, b in by_id.items():
        if b == b"<|endoftext|>":
            eot = i
    return LlmcTokenizer([by_id[i] for i in range(n)], eot)


# ================================================================================================
# Reading and writing model weights in any format
# ================================================================================================


def _peek(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def detect_format(path: PathLike) -> str:
    """What ``path`` holds: 'hf-gpt2', 'hf-openai-gpt', 'llmc-model', 'llmc-tokenizer',
    'llmc-shard', 'gpt2-vocab' (vocab.json/merges.txt or tokenizer.json), 'safetensors', 'npy'.

    Raises FileNotFoundError, or CheckpointError for a file gptcore does not recognise.
    """
    path = _p(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            d = _read_json(cfg)
            mtype = d.get("model_type") if isinstance(d, dict) else None
            if mtype == "gpt2":
                return "hf-gpt2"
            if mtype == "openai-gpt":
                return "hf-openai-gpt"
            raise CheckpointError(f"{cfg!r}: model_type {mtype!r} is not supported (gptcore reads "
                                  "'gpt2' and 'openai-gpt')")
        if any(os.path.isfile(os.path.join(path, n))
               for n in ("vocab.json", "encoder.json", "tokenizer.json")):
            return "gpt2-vocab"
        raise CheckpointError(f"{path!r}: a directory with neither a config.json nor a vocabulary")
    head = _peek(path, 16)
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little", signed=True)
        if magic == LLMC_MODEL_MAGIC:
            return "llmc-model"
        if magic == LLMC_TOKENIZER_MAGIC:
            return "llmc-tokenizer"
        if magic == LLMC_SHARD_MAGIC:
            return "llmc-shard"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= _ST_MAX_HEADER:
        return "safetensors"
    if path.endswith(".json") and head.lstrip()[:1] == b"{":
        return "gpt2-vocab"
    raise CheckpointError(f"{path!r}: unrecognised file (not a checkpoint directory, safetensors, an llm.c "
                          "model/tokenizer/shard or a .npy array)")


def read_weights(path: PathLike) -> Tuple[GPTConfig, Dict[str, np.ndarray], str]:
    """(config, gptcore-named arrays, stored dtype) from any model format, fully validated.

    ``path`` is a transformers/gptcore directory (GPT-2 or GPT-1), its model.safetensors, or an
    llm.c model .bin. Arrays are read-only views into memory-mapped files where possible
    (wte unpadded, linear weights (out, in)); nothing is copied until they are used.
    """
    path = _p(path)
    if not os.path.exists(path):
        path = _resolve_checkpoint_dir(path)
    fmt = detect_format(path)
    if fmt in ("hf-gpt2", "hf-openai-gpt"):
        return _read_hf_dir(path)
    if fmt == "safetensors":
        d = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) == "model.safetensors" and os.path.isfile(os.path.join(d, "config.json")):
            return _read_hf_dir(d)
        raise CheckpointError(f"{path!r}: a bare safetensors file has no model configuration; pass the "
                              "directory holding it and its config.json")
    if fmt == "llmc-model":
        return read_llmc_model(path)
    raise CheckpointError(f"{path!r} holds {fmt}, not model weights")


def write_weights(path: PathLike, cfg: GPTConfig, state: Mapping[str, Any], dtype: str = "float32",
                  tokenizer=None) -> None:
    """Write gptcore-named arrays in the format ``path`` names: ``*.bin`` -> llm.c model file,
    anything else -> a transformers directory (GPT-2, or GPT-1 for a post-LN config)."""
    path = _p(path)
    _check_state(cfg, state, "state")
    if path.endswith(".bin"):
        write_llmc_model(path, cfg, state, dtype)
        return
    fmt = _float_format(dtype)
    if fmt not in ("F32", "BF16", "F16"):
        raise ValueError(f"dtype: expected 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    eot = _eot_of(tokenizer, cfg)
    _check_tokenizer(tokenizer)
    with _atomic_directory(path) as tmp:
        _write_hf_dir(tmp, cfg, state, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[fmt], eot)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)


def _eot_of(tokenizer, cfg: GPTConfig) -> Optional[int]:
    eot = getattr(tokenizer, "eot_token", None) if tokenizer is not None else None
    if eot is None and cfg.vocab_size == 50257:
        eot = 50256  # GPT-2's <|endoftext|>
    return None if eot is None else int(eot)


# The same two files under OpenAI's names (gptcore.Tokenizer.save/load) and transformers' names.
_VOCAB_ALIASES = (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt"))


def _mirror_vocab_files(directory: str) -> None:
    """Give encoder.json/vocab.bpe and vocab.json/merges.txt each other's content where one of a
    pair is missing, so both gptcore.Tokenizer.load and transformers' GPT2Tokenizer open it."""
    for a, b in _VOCAB_ALIASES:
        pa, pb = os.path.join(directory, a), os.path.join(directory, b)
        if os.path.isfile(pa) and not os.path.exists(pb):
            shutil.copyfile(pa, pb)
        elif os.path.isfile(pb) and not os.path.exists(pa):
            shutil.copyfile(pb, pa)


def _check_tokenizer(tokenizer) -> None:
    """Refuse, before anything is written, a tokenizer whose files cannot be produced."""
    if tokenizer is None or isinstance(tokenizer, LlmcTokenizer):
        return
    if any(callable(getattr(tokenizer, m, None)) for m in ("save_pretrained", "save", "token_bytes",
                                                           "decode_bytes")):
        return
    raise TypeError(f"tokenizer: {type(tokenizer).__name__} has none of save(), save_pretrained(), "
                    "token_bytes() or decode_bytes(); gptcore cannot write its files")


def _save_tokenizer(tokenizer, directory: str) -> None:
    """Write a tokenizer's files into ``directory``: gptcore.Tokenizer.save (or a transformers
    tokenizer's save_pretrained) when it has one, else GPT-2's files from its per-id bytes."""
    fn = getattr(tokenizer, "save_pretrained", None) or getattr(tokenizer, "save", None)
    if callable(fn):
        fn(directory)
    else:
        write_gpt2_vocab(directory, tokenizer)
    _mirror_vocab_files(directory)


def load_tokenizer(path: PathLike):
    """The gptcore.Tokenizer saved in a checkpoint directory, or None when it holds none."""
    from .tokenizer import Tokenizer
    path = _resolve_checkpoint_dir(_p(path))
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    if has("encoder.json") and has("vocab.bpe"):
        return Tokenizer.load(path)
    if has("vocab.json") and has("merges.txt"):
        return Tokenizer.from_files(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    if has("tokenizer.json"):
        return Tokenizer.from_hf(os.path.join(path, "tokenizer.json"))
    return None


# ================================================================================================
# The model-level API: save_pretrained / load_pretrained / training state
# ================================================================================================

TRAINER_STATE_FORMAT = "gptcore-trainer-1"


def _json_default(x):
    """NumPy scalars and arrays in trainer state -> plain JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def save_pretrained(model, path: PathLike, optimizer=None, tokenizer=None, step: Optional[int] = None,
                    state: Optional[Mapping[str, Any]] = None, dtype: Optional[str] = None) -> None:
    """Save ``model`` as a transformers-compatible checkpoint directory, atomically.

    Writes config.json + model.safetensors (GPT2LMHeadModel layout, or OpenAIGPTLMHeadModel for a
    post-LN GPT-1), the tokenizer's files when ``tokenizer`` is given, and when ``optimizer``,
    ``step`` or ``state`` is given, optimizer.safetensors + trainer_state.json for resuming.
    ``state`` is any JSON-serialisable dict (data-loader position, run settings...).
    ``dtype`` ('float32' or 'bfloat16') defaults to the model's own. An existing checkpoint at
    ``path`` is replaced only once the new one is complete.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig) or not hasattr(model, "parameters"):
        raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if state is not None and not isinstance(state, Mapping):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    dt = dtype or getattr(model, "dtype", "float32")
    fmt = _float_format(dt)
    if fmt not in ("F32", "BF16"):
        raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
    dt = "float32" if fmt == "F32" else "bfloat16"
    trainer = None
    if optimizer is not None or step is not None or state is not None:
        trainer = {"format": TRAINER_STATE_FORMAT, "step": None if step is None else int(step),
                   "optimizer": None, "state": dict(state) if state is not None else {}}
        try:
            json.dumps(trainer["state"], default=_json_default)
        except (TypeError, ValueError) as e:
            raise TypeError(f"state: not JSON-serialisable ({e})") from None
    _check_tokenizer(tokenizer)
    params = _model_state(model)
    with _atomic_directory(path) as tmp:
        _write_hf_dir(tmp, cfg, params, dt, _eot_of(tokenizer, cfg))
        if optimizer is not None:
            sd = dict(optimizer.state_dict())
            arrays = []
            for group in ("m", "v", "master"):
                for name, arr in (sd.pop(group, None) or {}).items():
                    arrays.append((f"{group}/{name}", np.asarray(arr, dtype=np.float32), "F32"))
            with open(os.path.join(tmp, "optimizer.safetensors"), "wb") as f:
                _write_safetensors(f, arrays, {"format": "gptcore-adamw"})
            trainer["optimizer"] = sd  # the hyper-parameters and step count
        if trainer is not None:
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump(trainer, f, indent=2, default=_json_default)
                f.write("\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)


def load_pretrained(path: PathLike, device: str = "cpu", dtype: str = "float32"):
    """A gptcore.GPT from a checkpoint directory (gptcore's, or transformers' GPT-2 / GPT-1) or an
    llm.c model .bin. Everything is validated before the model is built."""
    cfg, state, _ = read_weights(path)
    return _build_model(cfg, state, device, dtype)


def load_weights(model, path: PathLike) -> None:
    """Load a checkpoint's weights (any format :func:`load_pretrained` reads) into an existing
    GPT whose config matches it. Everything is validated before the first parameter changes.
    (An AdamW built on a bfloat16 model keeps fp32 master weights: call its sync_master() after.)"""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig) or not hasattr(model, "parameters"):
        raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
    saved, state, _ = read_weights(path)
    if saved != cfg:
        diff = [f"{k}: checkpoint {v!r}, model {getattr(cfg, k)!r}"
                for k, v in saved.to_dict().items() if getattr(cfg, k) != v]
        raise CheckpointError(f"{_p(path)!r} does not fit this model ({'; '.join(diff)})")
    _copy_weights(model, state)


def load_training_state(path: PathLike) -> Optional[Dict[str, Any]]:
    """What :func:`save_pretrained` kept for resuming, or None when the checkpoint has none:
    ``{"step": int|None, "state": {...}, "optimizer": dict for AdamW.load_state_dict or None}``."""
    path = _resolve_checkpoint_dir(_p(path))
    ts = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(ts):
        return None
    d = _read_json(ts)
    if not isinstance(d, dict) or d.get("format") != TRAINER_STATE_FORMAT:
        raise CheckpointError(f"{ts!r}: unknown format {d.get('format') if isinstance(d, dict) else d!r}")
    opt = d.get("optimizer")
    if opt is not None:
        op = os.path.join(path, "optimizer.safetensors")
        if not os.path.isfile(op):
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: optimizer.safetensors is missing")
        f = SafetensorsFile(op)
        opt = dict(opt)
        for key in f.keys():
            group, _, name = key.partition("/")
            if group not in ("m", "v", "master") or not name:
                raise CheckpointError(f"{op!r}: unexpected tensor {key!r}")
            opt.setdefault(group, {})[name] = np.array(f.get(key), dtype=np.float32)
    return {"step": d.get("step"), "state": d.get("state") or {}, "optimizer": opt}


# ================================================================================================
# convert: any format -> any format
# ================================================================================================

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "special_tokens.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert(src: PathLike, dst: PathLike, dtype: Optional[str] = None, overwrite: bool = False) -> str:
    """Convert ``src`` to the format ``dst`` names; returns a one-line description.

    models      a transformers/gptcore directory (GPT-2 or GPT-1) or an llm.c model ``.bin`` ->
                ``DST.bin`` (llm.c model; ``dtype`` float32 or bfloat16) or a directory
                (transformers layout). The dtype defaults to the source's.
    vocabulary  llm.c tokenizer ``.bin`` -> a directory with vocab.json + merges.txt;
                vocab.json / encoder.json / tokenizer.json (or their directory) -> ``DST.bin``.
    tokens      llm.c shard -> ``DST.npy`` (uint16) or another shard; ``.npy`` -> shard ``.bin``.

    An existing ``dst`` is replaced only with ``overwrite=True`` (atomically).
    """
    src, dst = _p(src), _p(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"dst: {dst!r} exists (pass overwrite=True / --force to replace it)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("dst: must differ from src")
    fmt = detect_format(src)
    if fmt in ("hf-gpt2", "hf-openai-gpt", "llmc-model", "safetensors"):
        cfg, state, src_dtype = read_weights(src)
        dt = dtype or src_dtype
        if dst.endswith(".bin"):
            write_llmc_model(dst, cfg, state, dt)
            kind = f"llm.c model ({dt})"
        else:
            _float_format(dt)
            srcdir = src if os.path.isdir(src) else None
            with _atomic_directory(dst) as tmp:
                _write_hf_dir(tmp, cfg, state, dt, _eot_of(None, cfg))
                for name in _TOKENIZER_FILES if srcdir else ():
                    full = os.path.join(srcdir, name)
                    if os.path.isfile(full):
                        shutil.copyfile(full, os.path.join(tmp, name))
            kind = f"{'GPT-2' if cfg.prenorm else 'GPT-1'} transformers directory ({dt})"
        return f"{src} ({fmt}) -> {dst}: {kind}, {cfg.n_layer} layers, {cfg.n_embd} wide"
    if dtype is not None:
        raise ValueError(f"dtype: only model conversions take a dtype ({src!r} holds {fmt})")
    if fmt == "llmc-tokenizer":
        vocab = read_llmc_tokenizer(src)
        if dst.endswith(".bin"):
            write_llmc_tokenizer(dst, vocab)
        else:
            with _atomic_directory(dst) as tmp:
                write_gpt2_vocab(tmp, vocab)
        return f"{src} (llm.c tokenizer) -> {dst}: {vocab.vocab_size} tokens"
    if fmt == "gpt2-vocab":
        if not dst.endswith(".bin"):
            raise ValueError(f"dst: a vocabulary converts to an llm.c tokenizer file ending in .bin, "
                             f"got {dst!r}")
        vocab = read_gpt2_vocab(src)
        write_llmc_tokenizer(dst, vocab)
        return f"{src} (vocabulary) -> {dst}: llm.c tokenizer, {vocab.vocab_size} tokens"
    if fmt in ("llmc-shard", "npy"):
        from .data import read_shard, write_shard
        if fmt == "llmc-shard":
            tokens = read_shard(src)
        else:
            try:
                tokens = np.load(src, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise CheckpointError(f"{src!r}: unreadable .npy ({e})") from None
            if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
                raise CheckpointError(f"{src!r}: expected a 1-D integer array of token ids, got "
                                      f"{tokens.dtype} {tokens.shape}")
        if dst.endswith(".npy"):
            arr = np.asarray(tokens, dtype=np.uint16)
            with _atomic_file(dst) as f:
                np.save(f, arr, allow_pickle=False)
            kind = ".npy (uint16)"
        elif dst.endswith(".bin"):
            write_shard(dst, tokens)
            kind = "llm.c shard"
        else:
            raise ValueError(f"dst: tokens convert to a .bin shard or a .npy array, got {dst!r}")
        return f"{src} ({fmt}) -> {dst}: {kind}, {int(np.size(tokens))} tokens"
    raise CheckpointError(f"{src!r}: nothing to convert ({fmt})")
