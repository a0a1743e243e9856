"""Token data: llm.c-format shards, text preparation, and a seeded random-window batch loader.

Shard format (the same as llm.c's, so either project reads the other's data):

    header   256 x int32 (little-endian): [0] magic 20240520, [1] version 1, [2] token count
    tokens   token count x uint16

A prepared data directory holds ``train_NNNNNN.bin`` and ``val_NNNNNN.bin`` shards and a
``meta.json`` naming the tokenizer and vocabulary size (the shards record neither).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "SHARD_MAGIC", "SHARD_VERSION", "write_shard", "read_shard", "ByteTokenizer", "get_tokenizer",
    "prepare", "load_meta", "shard_paths", "TokenData", "BatchLoader",
]

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
META_NAME = "meta.json"


# ---- shards -----------------------------------------------------------------------------


from ._fileio import write_atomic as _atomic_write_bytes  # noqa: E402


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


# ---- tokenizers -------------------------------------------------------------------------


class ByteTokenizer:
    """The fallback tokenizer: UTF-8 bytes are tokens 0..255, token 256 ends a document."""

    name = "byte"

    def __init__(self):
        self.vocab_size = 257
        self.eot_token = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class _GPT2Adapter:
    """Wraps gptcore.tokenizer.Tokenizer.gpt2() with the small interface data.py needs.

    Text is encoded as ordinary text: a literal "<|endoftext|>" inside a file is not special.
    """

    name = "gpt2"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = int(tok.vocab_size)
        self.eot_token = int(tok.eot_token) if tok.eot_token is not None else 50256

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode_ordinary(text))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode_ordinary(text), dtype=np.uint16)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def get_tokenizer(name: str = "auto"):
    """``"byte"``, ``"gpt2"``, or ``"auto"`` (GPT-2 when its vocabulary is installed, else byte)."""
    if not isinstance(name, str):
        raise TypeError(f"tokenizer: expected a name, got {type(name).__name__}")
    name = name.lower()
    if name == "byte":
        return ByteTokenizer()
    if name in ("gpt2", "auto"):
        try:
            from .tokenizer import Tokenizer  # issue 5

            return _GPT2Adapter(Tokenizer.gpt2())
        except (ImportError, AttributeError, OSError, RuntimeError) as e:
            if name == "gpt2":
                raise ValueError(f"tokenizer: 'gpt2' is not available here ({e})") from None
            return ByteTokenizer()
    raise ValueError(f"tokenizer: expected 'byte', 'gpt2' or 'auto', got {name!r}")


# ---- preparing text ---------------------------------------------------------------------


def prepare(text_files: Sequence[str], out_dir: str, val_fraction: float = 0.05,
            tokenizer="auto", shard_tokens: int = 100_000_000, progress: bool = True) -> Dict:
    """Tokenize text files into train/val shards in ``out_dir`` and write ``meta.json``.

    Each file is one document, followed by the end-of-text token. The last ``val_fraction``
    of each document's tokens go to validation, the rest to training, so both splits see every
    file. Returns the metadata written.
    """
    from ._progress import Progress

    files = [os.fspath(f) for f in text_files]
    if not files:
        raise ValueError("text_files: expected at least one file")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"text file {f!r} does not exist")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens: expected a positive int, got {shard_tokens!r}")
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if tok.vocab_size > 65536:
        raise ValueError(f"tokenizer: vocabulary of {tok.vocab_size} does not fit uint16 shards")
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "train_*.bin")) + glob.glob(os.path.join(out_dir, "val_*.bin")):
        os.unlink(old)  # a re-run replaces the old split entirely

    writers = {s: _ShardWriter(out_dir, s, shard_tokens) for s in ("train", "val")}
    total_bytes = sum(os.path.getsize(f) for f in files)
    bar = Progress(total=total_bytes, desc="prepare", unit="B", enabled=progress)
    n_docs = 0
    for f in files:
        with open(f, "r", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        ids = np.append(tok.encode_array(text), np.uint16(tok.eot_token))
        n_val = int(round(len(ids) * val_fraction))
        writers["train"].add(ids[: len(ids) - n_val])
        writers["val"].add(ids[len(ids) - n_val:])
        n_docs += 1
        bar.update(os.path.getsize(f), postfix=f"{writers['train'].total + writers['val'].total:,} tokens")
    bar.close()
    for w in writers.values():
        w.close()
    meta = {
        "format": "llm.c shards (magic 20240520, version 1, uint16 tokens)",
        "tokenizer": tok.name,
        "vocab_size": int(tok.vocab_size),
        "eot_token": int(tok.eot_token),
        "documents": n_docs,
        "train_tokens": writers["train"].total,
        "val_tokens": writers["val"].total,
        "train_shards": writers["train"].count,
        "val_shards": writers["val"].count,
    }
    _atomic_write_bytes(os.path.join(out_dir, META_NAME), [json.dumps(meta, indent=2).encode()])
    return meta


class _ShardWriter:
    """Buffers tokens and writes shards of at most ``shard_tokens`` tokens."""

    def __init__(self, out_dir: str, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.parts: List[np.ndarray] = []
        self.buffered = 0
        self.total = 0
        self.count = 0

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.buffered += len(ids)
        self.total += len(ids)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        buf = np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint16)
        write_shard(os.path.join(self.out_dir, f"{self.split}_{self.count:06d}.bin"), buf[:n])
        rest = buf[n:]
        self.parts = [rest] if len(rest) else []
        self.buffered = len(rest)
        self.count += 1

    def close(self) -> None:
        if self.buffered or self.count == 0:
            self._flush(self.buffered)


def load_meta(data_dir: str) -> Dict:
    """Read and check ``meta.json`` of a prepared data directory."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist "
                                "(create one with `gptcore prepare TEXT_FILES... --out DIR`)")
    path = os.path.join(data_dir, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing: prepare the directory with `gptcore prepare`")
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise ValueError(f"{path!r}: expected an object with a positive integer 'vocab_size'")
    meta.setdefault("tokenizer", "byte" if meta["vocab_size"] <= 257 else "gpt2")
    return meta


def shard_paths(data_dir: str, split: str) -> List[str]:
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))


# ---- batches ----------------------------------------------------------------------------


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


class BatchLoader:
    """Random windows of ``seq_len + 1`` tokens: inputs x = w[:-1], targets y = w[1:].

    Batch number ``k`` depends only on (seed, k), so the loader's whole state is
    ``{"seed": seed, "step": k}``: a resumed run draws exactly the batches it would have.
    ``next()`` returns (x, y) as int32 arrays of shape (batch_size, seq_len).
    """

    def __init__(self, data: TokenData, batch_size: int, seq_len: int, seed: int = 0, step: int = 0):
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.data, self.batch_size, self.seq_len = data, int(batch_size), int(seq_len)
        self.seed, self.step = int(seed), int(step)
        avail = data.windows_available(self.seq_len)
        if avail.sum() <= 0:
            raise ValueError(f"data: no shard holds more than seq_len = {seq_len} tokens "
                             f"(largest has {int(data.sizes.max())}); use a shorter --seq-len or more text")
        self._cum = np.cumsum(avail)

    def batch(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Batch number k (does not move the loader)."""
        rng = np.random.default_rng([self.seed, int(k)])
        starts = rng.integers(0, int(self._cum[-1]), size=self.batch_size)
        T = self.seq_len
        x = np.empty((self.batch_size, T), np.int32)
        y = np.empty((self.batch_size, T), np.int32)
        shard_ids = np.searchsorted(self._cum, starts, side="right")
        for b, (s, start) in enumerate(zip(shard_ids, starts)):
            off = int(start - (self._cum[s - 1] if s else 0))
            w = np.asarray(self.data.shards[s][off: off + T + 1], dtype=np.int32)
            x[b], y[b] = w[:-1], w[1:]
        return x, y

    def next(self) -> Tuple[np.ndarray, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(data: TokenData, batch_size: int, seq_len: int, max_batches: int):
    """Deterministic validation batches: consecutive non-overlapping windows from the start."""
    T = seq_len
    rows_x, rows_y = [], []
    for shard in data.shards:
        n = (len(shard) - 1) // T
        for i in range(n):
            w = np.asarray(shard[i * T: i * T + T + 1], dtype=np.int32)
            rows_x.append(w[:-1])
            rows_y.append(w[1:])
            if len(rows_x) == batch_size:
                yield np.stack(rows_x), np.stack(rows_y)
                rows_x, rows_y = [], []
                max_batches -= 1
                if max_batches <= 0:
                    return
    if rows_x:
        yield np.stack(rows_x), np.stack(rows_y)
