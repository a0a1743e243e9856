"""Vocabularies: llm.c's tokenizer .bin, and GPT-2's vocab.json + merges.txt."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from .._fileio import atomic_file as _atomic_file
from ..data.shards import HEADER_BYTES as _LLMC_HEADER_BYTES
from ..data.shards import HEADER_INTS as _LLMC_HEADER_INTS
from .hf import _read_json
from .llmc import LLMC_TOKENIZER_MAGIC, _read_header
from .safetensors import CheckpointError, PathLike, _p

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
