"""Turning text files into train/val token shards (`gptcore prepare`), and the tokenizers it
knows by name."""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Sequence

import numpy as np

from .._fileio import write_atomic as _atomic_write_bytes
from ..tokenizer import Tokenizer
from .shards import META_NAME, write_shard

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
            return _GPT2Adapter(Tokenizer.gpt2())
        except (OSError, RuntimeError, ValueError) as e:  # GPT-2's vocabulary files are missing
            if name == "gpt2":
                raise ValueError(f"tokenizer: 'gpt2' is not available here ({e})") from None
            return ByteTokenizer()
    raise ValueError(f"tokenizer: expected 'byte', 'gpt2' or 'auto', got {name!r}")


# ---- preparing text ---------------------------------------------------------------------


def read_text(path: str) -> str:
    """The UTF-8 text of ``path``; a binary file (NUL bytes) or one that is not UTF-8 is refused
    with the file and the offset of the first bad byte."""
    with open(path, "rb") as fh:
        data = fh.read()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"text file {path!r} is binary (a NUL byte at offset {nul}); expected "
                         "UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path!r} is not UTF-8 (byte {data[e.start]:#04x} at offset "
                         f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8") from None


def expand_text_files(paths: Sequence[str]) -> tuple:
    """(files, skipped): each file as given, and for a directory every file under it (sorted,
    hidden entries left out) that :func:`read_text` accepts; ``skipped`` lists the directories'
    files that are binary or not UTF-8."""
    files: List[str] = []
    skipped: List[str] = []
    for p in (os.fspath(x) for x in paths):
        if os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
            for f in found:
                try:
                    read_text(f)
                except (ValueError, OSError):
                    skipped.append(f)
                else:
                    files.append(f)
            if not any(f.startswith(os.path.join(p, "")) for f in files):
                raise ValueError(f"text directory {p!r} holds no UTF-8 text files"
                                 f"{f' ({len(skipped)} binary or non-UTF-8 skipped)' if skipped else ''}")
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"text file {p!r} does not exist")
    return files, skipped


def prepare(text_files: Sequence[str], out_dir: str, val_fraction: float = 0.05,
            tokenizer="auto", shard_tokens: int = 100_000_000, progress: bool = True) -> Dict:
    """Tokenize text files into train/val shards in ``out_dir`` and write ``meta.json``.

    ``text_files`` are UTF-8 text files or directories (every text file under them; binary and
    non-UTF-8 files there are skipped and counted in the metadata, while a named file that is not
    UTF-8 text is an error, raised before anything is written). Each file is one document, followed by the end-of-text token. The last ``val_fraction``
    of each document's tokens go to validation, the rest to training, so both splits see every
    file. Returns the metadata written.
    """
    from .._progress import Progress

    if isinstance(text_files, (str, os.PathLike)):
        text_files = [text_files]
    if not text_files:
        raise ValueError("text_files: expected at least one file")
    files, skipped = expand_text_files(text_files)
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens: expected a positive int, got {shard_tokens!r}")
    texts, kept = {}, 0
    for f in files:  # every file checked before a shard is touched; the first 256 MB kept
        text = read_text(f)
        if kept + len(text) <= 256 << 20:
            texts[f] = text
            kept += len(text)
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
        text = texts.pop(f) if f in texts else read_text(f)
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
        "skipped_files": len(skipped),
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


