"""ops.embedding_forward's position argument (``pos``) against the NumPy reference.

A decode step embeds its tokens at positions p .. p+T-1. ``pos`` is None (p = 0), an int, or a
1-element int32 tensor on idx's device; the tensor form lets a CUDA graph captured once read the
current position at every replay (tests/test_cuda_graph.py). On the CPU every form is checked
(ValueError / TypeError naming ``pos``); on CUDA the kernel reads a device value and answers an
out-of-range one with NaN rows instead of reading outside wpe. Fresh random inputs each run
(seed printed; replay with GPTCORE_TEST_SEED=<seed>).
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref

CASES = [
    # B, T, V, C, maxT, pos
    (1, 1, 7, 5, 9, 0),      # one token at position 0
    (2, 1, 11, 8, 16, 15),   # a decode step at the last position
    (3, 4, 13, 3, 20, 9),    # a prefill chunk in the middle, odd width
    (2, 7, 50, 32, 7, 0),    # the whole table
    (1, 5, 9, 17, 40, 35),   # ends exactly at maxT
]


def _inputs(rng, B, T, V, C, maxT, idx_dtype=np.int32):
    idx = rng.integers(0, V, size=(B, T)).astype(idx_dtype)
    return idx, rng.randn(V, C), rng.randn(maxT, C)


def _pos_forms(pos):
    """The same position as an int, a NumPy int, a (1,) int32 array and a gptcore Tensor."""
    return [pos, np.int64(pos), np.array([pos], np.int32),
            gptcore.tensor(np.array([pos], np.int32))]


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("B, T, V, C, maxT, pos", CASES)
def test_embedding_pos_matches_reference(rng, idx_dtype, B, T, V, C, maxT, pos):
    idx, wte, wpe = _inputs(rng, B, T, V, C, maxT, idx_dtype)
    want = ref.embedding_forward(idx, wte, wpe, pos)
    # the reference itself: rows p.. of wpe
    np.testing.assert_allclose(want, wte[idx].astype(np.float64) + wpe[pos:pos + T], rtol=0, atol=0)
    for p in _pos_forms(pos):
        got = np.asarray(ops.embedding_forward(idx, wte, wpe, p))
        assert got.shape == (B, T, C)
        # a gather and one float32 add: exact
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"pos={p!r} ({rng})")


def test_embedding_pos_none_is_zero(rng):
    idx, wte, wpe = _inputs(rng, 2, 3, 10, 6, 8)
    a = np.asarray(ops.embedding_forward(idx, wte, wpe))
    b = np.asarray(ops.embedding_forward(idx, wte, wpe, None))
    c = np.asarray(ops.embedding_forward(idx, wte, wpe, 0))
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(ref.embedding_forward(idx, wte, wpe),
                                  ref.embedding_forward(idx, wte, wpe, 0))


def test_embedding_pos_with_out_buffer(rng):
    B, T, V, C, maxT, pos = 2, 3, 12, 7, 10, 4
    idx, wte, wpe = _inputs(rng, B, T, V, C, maxT)
    buf = gptcore.empty([B, T, C])
    p = gptcore.tensor(np.array([pos], np.int32))
    got = ops.embedding_forward(idx, wte, wpe, p, out=buf)
    assert got is buf or np.shares_memory(np.asarray(got), np.asarray(buf))
    np.testing.assert_array_equal(np.asarray(buf),
                                  ref.embedding_forward(idx, wte, wpe, pos).astype(np.float32))
    # the position tensor is read at every call: change it in place
    p.copy_(gptcore.tensor(np.array([pos + 3], np.int32)))
    ops.embedding_forward(idx, wte, wpe, p, out=buf)
    np.testing.assert_array_equal(np.asarray(buf),
                                  ref.embedding_forward(idx, wte, wpe, pos + 3).astype(np.float32))


@pytest.mark.parametrize("pos, exc, match", [
    (-1, ValueError, "pos"),
    (7, ValueError, "pos"),                                   # 7 + 2 > 8
    (100, ValueError, "pos"),
    (np.array([-1], np.int32), ValueError, "pos"),
    (np.array([7], np.int32), ValueError, "pos"),
    (np.array([2], np.int64), TypeError, "pos"),              # int32 only
    (np.array([2.0], np.float32), TypeError, "pos"),
    (np.array([2, 3], np.int32), ValueError, "pos"),          # one element only
    (np.array([[2]], np.int32), ValueError, "pos"),
    (np.zeros((0,), np.int32), ValueError, "pos"),
    (True, TypeError, "pos"),
    (2.0, TypeError, "pos"),
    ("2", TypeError, "pos"),
])
def test_embedding_bad_pos(pos, exc, match):
    idx = np.zeros((1, 2), np.int32)
    wte, wpe = np.zeros((5, 4), np.float32), np.zeros((8, 4), np.float32)
    with pytest.raises(exc, match=match):
        ops.embedding_forward(idx, wte, wpe, pos)


def test_embedding_pos_reaches_last_row_exactly(rng):
    idx, wte, wpe = _inputs(rng, 1, 2, 5, 4, 8)
    ops.embedding_forward(idx, wte, wpe, 6)
    ops.embedding_forward(idx, wte, wpe, np.array([6], np.int32))
    with pytest.raises(ValueError, match="pos"):
        ops.embedding_forward(idx, wte, wpe, np.array([7], np.int32))


def test_embedding_pos_overlapping_out_is_refused():
    idx = np.zeros((1, 1), np.int32)
    wte, wpe = np.zeros((5, 4), np.float32), np.zeros((8, 4), np.float32)
    out = np.zeros((1, 1, 4), np.float32)
    pos = out.reshape(-1)[:1].view(np.int32)  # the same 4 bytes as out[0, 0, 0] (value 0)
    with pytest.raises(ValueError, match="pos"):
        ops.embedding_forward(idx, wte, wpe, pos, out=out)


def test_reference_bad_pos():
    idx = np.zeros((1, 2), np.int64)
    wte, wpe = np.zeros((5, 4)), np.zeros((8, 4))
    for p in (-1, 7):
        with pytest.raises(ValueError, match="pos"):
            ref.embedding_forward(idx, wte, wpe, p)


# ---- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B, T, V, C, maxT, pos", CASES + [(4, 1, 1000, 768, 1024, 1000)])
def test_embedding_pos_cuda(rng, dtype, B, T, V, C, maxT, pos):
    idx, wte, wpe = _inputs(rng, B, T, V, C, maxT)
    wte_d = gptcore.tensor(wte, device="cuda", dtype=dtype)
    wpe_d = gptcore.tensor(wpe, device="cuda", dtype=dtype)
    idx_d = gptcore.tensor(idx, device="cuda")
    # the reference sees the (bf16-rounded) tables the kernel sees; the sum is rounded once
    want = ref.embedding_forward(idx, np.asarray(wte_d.numpy()), np.asarray(wpe_d.numpy()), pos)
    want = np.asarray(gptcore.tensor(want.astype(np.float32), dtype=dtype).numpy(), np.float64)
    pos_d = gptcore.tensor(np.array([pos], np.int32), device="cuda")
    for p in (pos, pos_d):
        got = np.asarray(ops.embedding_forward(idx_d, wte_d, wpe_d, p).numpy(), np.float64)
        tol = 0 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 0.1,
                                   err_msg=f"{dtype} pos={type(p).__name__} ({rng})")


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [-1, 7, 8, 2**31 - 1, -2**31])
def test_embedding_device_pos_out_of_range_gives_nan(rng, bad):
    """The host cannot check a device position: the kernel writes NaN rows, reads nothing outside
    wpe, and the next call with a valid position is exact again."""
    idx, wte, wpe = _inputs(rng, 2, 2, 6, 8, 8)
    idx_d, wte_d, wpe_d = (gptcore.tensor(a, device="cuda") for a in (idx, wte, wpe))
    p = gptcore.tensor(np.array([bad], np.int32), device="cuda")
    got = np.asarray(ops.embedding_forward(idx_d, wte_d, wpe_d, p).numpy())
    assert np.isnan(got).all(), f"pos={bad}: expected NaN rows"
    p.copy_(gptcore.tensor(np.array([6], np.int32)))
    got = np.asarray(ops.embedding_forward(idx_d, wte_d, wpe_d, p).numpy())
    np.testing.assert_array_equal(got, ref.embedding_forward(idx, wte, wpe, 6).astype(np.float32))


@pytest.mark.gpu
def test_embedding_cuda_pos_on_wrong_device():
    idx = gptcore.zeros([1, 1], dtype="int32", device="cuda")
    wte, wpe = gptcore.zeros([5, 4], device="cuda"), gptcore.zeros([8, 4], device="cuda")
    with pytest.raises(ValueError, match="pos"):
        ops.embedding_forward(idx, wte, wpe, np.array([1], np.int32))  # a CPU tensor
    with pytest.raises(ValueError, match="pos"):
        ops.embedding_forward(np.zeros((1, 1), np.int32), np.zeros((5, 4), np.float32),
                              np.zeros((8, 4), np.float32),
                              gptcore.zeros([1], dtype="int32", device="cuda"))
    with pytest.raises(ValueError, match="pos"):  # an int is still checked on the host
        ops.embedding_forward(idx, wte, wpe, 8)
    with pytest.raises(TypeError, match="pos"):
        ops.embedding_forward(idx, wte, wpe, gptcore.zeros([1], dtype="int64", device="cuda"))
