"""Per-row positions (continuous batching): ``pos`` as a (B,) int32 tensor in
ops.embedding_forward and ops.attention_kvcache, row b at its own position pos[b], against the
NumPy reference (itself checked here against one int-position reference call per row).

Fresh random inputs each run (seed printed; replay with GPTCORE_TEST_SEED=<seed>), odd sizes,
every row at a different position (0 and the cache's last slot included), banded windows, the
CUDA kernel's split path. Out-of-range rows: ValueError naming the row on the CPU; on CUDA (the
host never reads device positions) NaN output for that row only and its caches untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref
from tests.helpers import BACKENDS, check, host


def row_positions(rng, B, Tn, Tmax):
    """B different first positions in [0, Tmax - Tn] (as many as fit), 0 and the end included."""
    top = Tmax - Tn
    pick = rng.choice(top + 1, size=min(B, top + 1), replace=False)
    pos = np.resize(pick, B).astype(np.int32)
    pos[0] = 0
    if B > 1:
        pos[-1] = top
    return pos


KV_CASES = [
    # B, Tn, H, D, Tmax, window
    (2, 1, 1, 1, 3, None),        # tiny
    (5, 1, 3, 5, 17, None),       # decode step, odd head size, five rows
    (3, 4, 2, 7, 19, None),       # several new tokens per row (chunked prefill at row offsets)
    (4, 1, 2, 8, 30, 3),          # banded
    (3, 2, 3, 10, 25, 1),         # window 1
    (8, 1, 4, 64, 700, None),     # long cache: CUDA splits into ranges + the combine kernel
    (4, 1, 2, 128, 400, 256),     # 128-dim heads, banded, split
    (3, 1, 2, 6, 90, None),       # head size not a 16-byte multiple: CUDA's generic path
]


def test_reference_rows_equal_one_call_per_row(rng):
    """The reference's per-row form is the int-position form applied to each row."""
    B, Tn, H, D, Tmax = 4, 2, 2, 3, 11
    qkv = rng.randn(B, Tn, 3 * H * D)
    k0, v0 = rng.randn(B, H, Tmax, D), rng.randn(B, H, Tmax, D)
    pos = row_positions(rng, B, Tn, Tmax)
    out, kc, vc = ref.attention_kvcache(qkv, k0, v0, pos, H, 3)
    for b in range(B):
        o, k, v = ref.attention_kvcache(qkv[b:b + 1], k0[b:b + 1], v0[b:b + 1], int(pos[b]), H, 3)
        np.testing.assert_array_equal(out[b:b + 1], o)
        np.testing.assert_array_equal(kc[b:b + 1], k)
        np.testing.assert_array_equal(vc[b:b + 1], v)
    wte, wpe = rng.randn(13, 6), rng.randn(Tmax, 6)
    idx = rng.integers(0, 13, (B, Tn))
    emb = ref.embedding_forward(idx, wte, wpe, pos)
    for b in range(B):
        np.testing.assert_array_equal(emb[b:b + 1], ref.embedding_forward(idx[b:b + 1], wte, wpe,
                                                                           int(pos[b])))


@pytest.mark.parametrize("B, Tn, H, D, Tmax, window", KV_CASES)
@pytest.mark.parametrize("be", BACKENDS)
def test_kvcache_per_row_positions_match_reference(rng, be, B, Tn, H, D, Tmax, window):
    C = H * D
    qkv = be.rounded(rng.randn(B, Tn, 3 * C))
    k0, v0 = be.rounded(rng.randn(B, H, Tmax, D)), be.rounded(rng.randn(B, H, Tmax, D))
    pos = row_positions(rng, B, Tn, Tmax)
    out_r, k_r, v_r = ref.attention_kvcache(qkv, k0, v0, pos, H, window)
    kc = gptcore.tensor(k0, device=be.device, dtype=be.dtype)
    vc = gptcore.tensor(v0, device=be.device, dtype=be.dtype)
    out = gptcore.tensor(np.full((B, Tn, C), np.nan, np.float32), device=be.device, dtype=be.dtype)
    ops.attention_kvcache(be.put(qkv), kc, vc, gptcore.tensor(pos, device=be.device), H, window,
                          out=out)
    check(f"{be} out (per-row pos {pos.tolist()})", host(out), out_r, rng, be.tol)
    np.testing.assert_array_equal(host(kc), k_r, err_msg=str(rng))
    np.testing.assert_array_equal(host(vc), v_r, err_msg=str(rng))


@pytest.mark.parametrize("B, T, V, C, maxT, dropout_p", [
    (1, 1, 5, 3, 4, 0.0),
    (5, 1, 37, 24, 50, 0.0),      # decode step, 16-byte-multiple width (CUDA's vector path)
    (3, 4, 29, 7, 13, 0.0),       # several positions per row, odd width (scalar path)
    (4, 2, 50, 16, 31, 0.3),      # with embedding dropout fused
])
@pytest.mark.parametrize("be", BACKENDS)
def test_embedding_per_row_positions_match_reference(rng, be, B, T, V, C, maxT, dropout_p):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = be.rounded(rng.randn(V, C)), be.rounded(rng.randn(maxT, C))
    pos = row_positions(rng, B, T, maxT)
    seed, stream = int(rng.integers(1 << 62)), int(rng.integers(1 << 20))
    want = ref.embedding_forward(idx, wte, wpe, pos, dropout_p=dropout_p, seed=seed, stream=stream)
    got = ops.embedding_forward(be.put(idx), be.put(wte), be.put(wpe),
                                gptcore.tensor(pos, device=be.device), dropout_p=dropout_p,
                                seed=seed, stream=stream)
    # the sum rounds to the backend's dtype: its error is that rounding
    check(f"{be} embedding (per-row pos {pos.tolist()})", host(got), want, rng, be.tol)


def test_per_row_positions_bad_input_names_the_row():
    B, H, D, Tmax = 3, 2, 4, 8
    qkv = np.zeros((B, 1, 3 * H * D), np.float32)
    kc, vc = gptcore.zeros([B, H, Tmax, D]), gptcore.zeros([B, H, Tmax, D])
    k_before = np.array(kc)
    for pos, exc, match in [
        (np.array([0, 8, 1], np.int32), ValueError, r"^pos\[1\]: 8 \+ 1 new tokens exceeds"),
        (np.array([0, 1, -2], np.int32), ValueError, r"^pos\[2\]: expected >= 0, got -2"),
        (np.array([0, 1], np.int32), ValueError, r"^pos: .*one per row \(shape \(3,\)\)"),
        (np.array([0, 1, 2, 3], np.int32), ValueError, r"^pos: .*one per row"),
        (np.zeros((3, 1), np.int32), ValueError, r"^pos: .*one per row"),
        (np.array([0, 1, 2], np.int64), TypeError, "^pos: a position tensor must be int32"),
    ]:
        with pytest.raises(exc, match=match):
            ops.attention_kvcache(qkv, kc, vc, pos, H)
    np.testing.assert_array_equal(np.array(kc), k_before)  # nothing was written
    wte, wpe = np.zeros((5, 4), np.float32), np.zeros((6, 4), np.float32)
    idx = np.zeros((3, 2), np.int32)
    with pytest.raises(ValueError, match=r"^pos\[2\]: 5 \+ 2 positions exceed the 6 positions"):
        ops.embedding_forward(idx, wte, wpe, np.array([0, 4, 5], np.int32))
    with pytest.raises(ValueError, match=r"^pos: .*one per row \(shape \(3,\)\)"):
        ops.embedding_forward(idx, wte, wpe, np.array([0, 4], np.int32))


# ---- CUDA: the host never reads device positions -------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("Tmax", [8, 1024])  # one key range, and several + the combine kernel
def test_kvcache_cuda_out_of_range_row_is_nan_and_untouched(rng, Tmax):
    B, Tn, H, D = 3, 1, 2, 64
    qkv = rng.randn(B, Tn, 3 * H * D)
    k0, v0 = rng.randn(B, H, Tmax, D), rng.randn(B, H, Tmax, D)
    pos = np.array([Tmax - 1, Tmax, 2], np.int32)  # row 1 is past the end
    kc, vc = gptcore.tensor(k0, device="cuda"), gptcore.tensor(v0, device="cuda")
    out = host(ops.attention_kvcache(gptcore.tensor(qkv, device="cuda"), kc, vc,
                                     gptcore.tensor(pos, device="cuda"), H))
    assert np.isnan(out[1]).all()
    good = [0, 2]
    out_r, k_r, v_r = ref.attention_kvcache(qkv[good], k0[good], v0[good], pos[good], H)
    check("good rows", out[good], out_r, rng)
    np.testing.assert_array_equal(host(kc)[good], k_r)
    np.testing.assert_array_equal(host(kc)[1], k0[1].astype(np.float32))
    np.testing.assert_array_equal(host(vc)[1], v0[1].astype(np.float32))
    emb = host(ops.embedding_forward(gptcore.tensor(np.zeros((B, 1), np.int32), device="cuda"),
                                     gptcore.tensor(rng.randn(4, 16), device="cuda"),
                                     gptcore.tensor(rng.randn(Tmax, 16), device="cuda"),
                                     gptcore.tensor(pos, device="cuda")))
    assert np.isnan(emb[1]).all() and np.isfinite(emb[good]).all()


@pytest.mark.gpu
def test_kvcache_cuda_graph_replays_per_row_positions(rng):
    """A step captured once with a (B,) position tensor serves new per-row positions."""
    B, H, D, Tmax = 4, 2, 32, 300
    C = H * D
    kc = gptcore.zeros([B, H, Tmax, D], device="cuda")
    vc = gptcore.zeros([B, H, Tmax, D], device="cuda")
    rk, rv = np.zeros((B, H, Tmax, D)), np.zeros((B, H, Tmax, D))
    step = gptcore.empty([B, 1, 3 * C], device="cuda")
    out = gptcore.empty([B, 1, C], device="cuda")
    p = gptcore.tensor(np.zeros(B, np.int32), device="cuda")
    step.zero_()
    ops.attention_kvcache(step, kc, vc, p, H, out=out)  # warm-up (scratch memory), then start over
    kc.zero_()
    vc.zero_()
    g = gptcore.cuda.Graph()
    with g.capture():
        ops.attention_kvcache(step, kc, vc, p, H, out=out)
    pos = np.array([0, 5, 70, 200], np.int32)
    for _ in range(3):
        x = rng.randn(B, 1, 3 * C)
        step.copy_(gptcore.tensor(x, device="cuda"))
        p.copy_(gptcore.tensor(pos, device="cuda"))
        g.replay()
        out_r, rk, rv = ref.attention_kvcache(x, rk, rv, pos, H)
        check(f"replay at {pos.tolist()}", host(out), out_r, rng)
        pos = pos + np.array([1, 3, 1, 40], np.int32)
