"""Token shards in llm.c's format and the prepared data directory around them.

Shard format (the same as llm.c's, so either project reads the other's data):

    header   256 x int32 (little-endian): [0] magic 20240520, [1] version 1, [2] token count
    tokens   token count x uint16

A prepared data directory holds ``train_NNNNNN.bin`` and ``val_NNNNNN.bin`` shards and a
``meta.json`` naming the tokenizer and vocabulary size (the shards record neither).
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
META_NAME = "meta.json"


# ---- shards -----------------------------------------------------------------------------


from .._fileio import parse_json  # noqa: E402
from .._fileio import write_atomic as _atomic_write_bytes  # noqa: E402


def write_shard(path: str, tokens) -> None:
    """Write ``tokens`` (integers in [0, 65536)) as an llm.c shard, atomically."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens: expected integer token ids, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ValueError("tokens: shards store uint16 ids; got ids outside [0, 65535]")
    if arr.size >= 2**31:
        raise ValueError(f"tokens: {arr.size} tokens do not fit one shard (int32 count)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    body = np.ascontiguousarray(arr, dtype="<u2")
    _atomic_write_bytes(path, [header.tobytes(), memoryview(body).cast("B")])


def read_llmc_header(path: str, what: str, error=ValueError) -> Tuple[np.ndarray, int]:
    """(the 256 little-endian int32 header every llm.c file starts with, file size in bytes).

    A missing file raises FileNotFoundError; a directory or a file shorter than the header
    raises ``error`` (a ValueError subclass) naming ``what`` and the path.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise error(f"{what} {path!r} is not a regular file")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise error(f"{what} {path!r} is {size} bytes, shorter than llm.c's {HEADER_BYTES}-byte "
                    "header (truncated, or not an llm.c file)")
    return np.fromfile(path, dtype="<i4", count=HEADER_INTS), size


def read_shard(path: str) -> np.ndarray:
    """The tokens of an llm.c shard as a read-only uint16 memmap, after validating the file.

    A missing file raises FileNotFoundError; a foreign, truncated or oversized one ValueError.
    """
    path = os.fspath(path)
    header, size = read_llmc_header(path, "data file")
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"data file {path!r} is not a token shard: magic {int(header[0])}, "
                         f"expected {SHARD_MAGIC} (llm.c format)")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"data file {path!r}: shard version {int(header[1])} is not supported "
                         f"(expected {SHARD_VERSION}: uint16 tokens)")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"data file {path!r} is {what}: header promises {n} tokens "
                         f"({expected} bytes), file has {size} bytes")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def load_meta(data_dir: str) -> Dict:
    """Read and check ``meta.json`` of a prepared data directory."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist "
                                "(create one with `gptcore prepare TEXT_FILES... --out DIR`)")
    path = os.path.join(data_dir, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing: prepare the directory with `gptcore prepare`")
    with open(path, "rb") as f:
        meta = parse_json(f.read(), repr(path))
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise ValueError(f"{path!r}: expected an object with a positive integer 'vocab_size'")
    meta.setdefault("tokenizer", "byte" if meta["vocab_size"] <= 257 else "gpt2")
    return meta


def shard_paths(data_dir: str, split: str) -> List[str]:
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))


class TokenData:
    """All shards of one split, validated, as one logical token stream (memory-mapped)."""

    def __init__(self, paths: Sequence[str], vocab_size: Optional[int] = None):
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise FileNotFoundError("no token shards given (expected train_*.bin / val_*.bin files)")
        self.paths = paths
        self.shards = [read_shard(p) for p in paths]
        self.sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.total = int(self.sizes.sum())
        if vocab_size is not None:
            for p, s in zip(paths, self.shards):
                if len(s) and int(s.max()) >= vocab_size:
                    raise ValueError(f"data file {p!r} holds token id {int(s.max())}, outside the "
                                     f"model's vocabulary [0, {vocab_size}): wrong tokenizer?")

    def windows_available(self, seq_len: int) -> np.ndarray:
        """Per shard, how many windows of seq_len + 1 tokens start in it."""
        return np.maximum(self.sizes - seq_len, 0)

