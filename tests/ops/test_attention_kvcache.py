"""ops.attention_kvcache (decoding attention over a KV cache) against the NumPy reference.

Fresh random inputs each run (seed printed; replay with GPTCORE_TEST_SEED=<seed>). Cases cover
one new token (decoding) and several (prefill, also at pos > 0), odd head sizes, windows of 1,
a few positions and wider than the context, and the cache's untouched tail. The output is
compared by relative L2 error with the float64 reference; the caches must hold exactly the
new keys and values at pos..pos+Tn-1 and be unchanged everywhere else.
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref
from tests.helpers import BACKENDS, check, host


CASES = [
    # B, Tn, H, D, Tmax, pos, window
    (1, 1, 1, 1, 1, 0, None),         # the smallest: one key, one dim
    (2, 1, 3, 5, 9, 4, None),         # decode step, odd head size
    (1, 1, 12, 64, 300, 257, None),   # GPT-2 heads, long context
    (3, 7, 2, 16, 20, 0, None),       # prefill from 0
    (2, 5, 4, 7, 23, 11, None),       # prefill at pos > 0 (a second chunk of a prompt)
    (2, 1, 2, 8, 40, 30, 1),          # window 1: each query sees only itself
    (1, 6, 3, 10, 50, 17, 4),         # banded prefill
    (2, 1, 2, 32, 70, 65, 256),       # window wider than the context: dense
    (1, 3, 2, 80, 12, 9, 5),          # fills the cache to the last slot
]


# Longer caches and the CUDA kernel's special paths (run on every backend).
CASES += [
    (1, 1, 12, 64, 1024, 1000, None),  # many keys per query: CUDA splits into ranges + combine kernel
    (4, 1, 4, 128, 700, 600, 256),     # 128-dim heads, banded, split
    (2, 33, 2, 64, 200, 150, None),    # prefill of 33 at pos > 0, split for the longer queries
    (1, 1, 3, 6, 300, 290, None),      # head size that is not a 16-byte multiple: generic path
    (1, 1, 2, 200, 260, 250, None),    # large odd head size: generic path
]

# pos as an int, as a 1-element int32 tensor on the backend's device (the form a decode step
# captured in a CUDA graph reads from device memory; the CUDA launch is then sized for Tmax keys
# and the kernel splits the real ones), or, on the CPU, as a 1-element int32 NumPy array.
BACKEND_POS = [pytest.param(be.values[0], kind, marks=be.marks, id=f"{be.id}-{kind}")
               for be in BACKENDS for kind in ("int", "array", "tensor")
               if kind != "array" or be.values[0].device == "cpu"]


@pytest.mark.parametrize("B, Tn, H, D, Tmax, pos, window", CASES)
@pytest.mark.parametrize("be, pos_kind", BACKEND_POS)
def test_kvcache_matches_reference(rng, be, B, Tn, H, D, Tmax, pos, window, pos_kind):
    C = H * D
    qkv = be.rounded(rng.randn(B, Tn, 3 * C))
    k0, v0 = be.rounded(rng.randn(B, H, Tmax, D)), be.rounded(rng.randn(B, H, Tmax, D))
    # the reference sees exactly the (bf16-rounded) values the kernel sees
    out_r, k_r, v_r = ref.attention_kvcache(qkv, k0, v0, pos, H, window)
    kc = gptcore.tensor(k0, device=be.device, dtype=be.dtype)
    vc = gptcore.tensor(v0, device=be.device, dtype=be.dtype)
    p = {"int": pos, "array": np.array([pos], np.int32),
         "tensor": gptcore.tensor(np.array([pos], np.int32), device=be.device)}[pos_kind]
    out = ops.attention_kvcache(be.put(qkv), kc, vc, p, H, window)
    assert out.shape == (B, Tn, C) and out.dtype == be.dtype and out.device.startswith(be.device)
    check(f"{be} out ({pos_kind} pos)", host(out), out_r, rng, be.tol)
    # The caches: exactly the new k, v in their slots, every other slot untouched.
    np.testing.assert_array_equal(host(kc), k_r, err_msg=str(rng))
    np.testing.assert_array_equal(host(vc), v_r, err_msg=str(rng))


def test_reference_pos0_equals_full_attention(rng):
    """The reference itself: a prefill from 0 is plain causal attention (banded or not)."""
    B, T, H, D = 2, 9, 3, 4
    qkv = rng.randn(B, T, 3 * H * D)
    for window in (None, 2):
        out_r, _, _ = ref.attention_kvcache(qkv, np.zeros((B, H, T, D)), np.zeros((B, H, T, D)),
                                            0, H, window)
        full, _ = ref.attention_forward(qkv, H, window=window)
        np.testing.assert_allclose(out_r, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [None, 3])
def test_incremental_decoding_equals_full_attention(rng, window):
    """Prefill a prefix, then one token per call: every output row equals full attention's."""
    B, T, H, D, P = 2, 13, 2, 12, 5
    C = H * D
    qkv = rng.randn(B, T, 3 * C)
    full, _ = ops.attention_forward(qkv, H, window=window)
    full = np.asarray(full)
    kc = gptcore.zeros([B, H, T, D])
    vc = gptcore.zeros([B, H, T, D])
    outs = [np.asarray(ops.attention_kvcache(np.ascontiguousarray(qkv[:, :P]), kc, vc, 0, H, window))]
    for t in range(P, T):
        outs.append(np.asarray(ops.attention_kvcache(np.ascontiguousarray(qkv[:, t:t + 1]), kc, vc,
                                                     t, H, window)))
    got = np.concatenate(outs, axis=1)
    check("incremental vs full", got, full.astype(np.float64), rng)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
def test_prefill_then_decode_matches_reference(rng, be, window):
    """A prompt into empty caches, then one token per call, each against the reference."""
    B, H, D, Tmax = 2, 3, 16, 40
    C = H * D
    prompt = be.rounded(rng.randn(B, 11, 3 * C))
    kc = gptcore.zeros([B, H, Tmax, D], dtype=be.dtype, device=be.device)
    vc = gptcore.zeros([B, H, Tmax, D], dtype=be.dtype, device=be.device)
    rk, rv = np.zeros((B, H, Tmax, D)), np.zeros((B, H, Tmax, D))
    out = ops.attention_kvcache(be.put(prompt), kc, vc, 0, H, window=window)
    ro, rk, rv = ref.attention_kvcache(prompt, rk, rv, 0, H, window=window)
    check("prefill out", host(out), ro, rng, be.tol)
    pos = 11
    for step in range(3):  # then one token at a time
        tok = be.rounded(rng.randn(B, 1, 3 * C))
        out = ops.attention_kvcache(be.put(tok), kc, vc, pos, H, window=window)
        ro, rk, rv = ref.attention_kvcache(tok, rk, rv, pos, H, window=window)
        check(f"decode out step {step}", host(out), ro, rng, be.tol)
        pos += 1
    check("k_cache", host(kc)[:, :, :pos], rk[:, :, :pos], rng, 1e-7)
    check("v_cache", host(vc)[:, :, :pos], rv[:, :, :pos], rng, 1e-7)


def test_numpy_caches_are_updated_in_place(rng):
    B, H, D, Tmax = 1, 2, 4, 6
    qkv = rng.randn(B, 1, 3 * H * D)
    kc = np.zeros((B, H, Tmax, D), np.float32)
    vc = np.zeros((B, H, Tmax, D), np.float32)
    ops.attention_kvcache(qkv, kc, vc, 2, H)
    C = H * D
    np.testing.assert_array_equal(kc[0, :, 2], qkv[0, 0, C:2 * C].reshape(H, D))
    np.testing.assert_array_equal(vc[0, :, 2], qkv[0, 0, 2 * C:].reshape(H, D))
    assert not kc[:, :, [0, 1, 3, 4, 5]].any() and not vc[:, :, [0, 1, 3, 4, 5]].any()


def test_peaked_scores(rng):
    B, Tn, H, D, Tmax, pos = 1, 2, 2, 64, 40, 31
    qkv = rng.randn(B, Tn, 3 * H * D) * 3.5
    k0, v0 = rng.randn(B, H, Tmax, D) * 3.5, rng.randn(B, H, Tmax, D)
    out_r, _, _ = ref.attention_kvcache(qkv, k0, v0, pos, H)
    out = ops.attention_kvcache(qkv, gptcore.tensor(k0), gptcore.tensor(v0), pos, H)
    check("out (peaked)", out, out_r, rng, tol=1e-4)


# ---- bad input --------------------------------------------------------------------------------


def _args(B=2, Tn=1, H=2, D=4, Tmax=8):
    qkv = np.zeros((B, Tn, 3 * H * D), np.float32)
    return qkv, gptcore.zeros([B, H, Tmax, D]), gptcore.zeros([B, H, Tmax, D])


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: dict(a, pos=-1), ValueError, "pos"),
    (lambda a: dict(a, pos=8), ValueError, "pos"),            # pos + Tn > Tmax
    (lambda a: dict(a, window=0), ValueError, "window"),
    (lambda a: dict(a, n_head=3), ValueError, "n_head"),
    (lambda a: dict(a, n_head=0), ValueError, "n_head"),
    (lambda a: dict(a, k_cache=gptcore.zeros([2, 2, 8, 5])), ValueError, "k_cache"),
    (lambda a: dict(a, k_cache=gptcore.zeros([2, 2, 8])), ValueError, "k_cache"),
    (lambda a: dict(a, v_cache=gptcore.zeros([2, 2, 7, 4])), ValueError, "v_cache"),
    (lambda a: dict(a, k_cache=gptcore.zeros([1, 2, 8, 4])), ValueError, "k_cache"),
    (lambda a: dict(a, k_cache=gptcore.zeros([2, 2, 8, 4], dtype="int32")), TypeError, "k_cache"),
    (lambda a: dict(a, v_cache=a["k_cache"]), ValueError, "v_cache"),
    (lambda a: dict(a, qkv=np.zeros((2, 1, 25), np.float32)), ValueError, "qkv"),
    (lambda a: dict(a, qkv=np.zeros((2, 24), np.float32)), ValueError, "qkv"),
    (lambda a: dict(a, qkv=np.zeros((2, 1, 24), np.int32)), TypeError, "qkv"),
    (lambda a: dict(a, qkv=np.zeros((2, 0, 24), np.float32)), ValueError, "qkv"),
])
def test_bad_input(change, exc, match):
    qkv, kc, vc = _args()
    a = change(dict(qkv=qkv, k_cache=kc, v_cache=vc, pos=3, n_head=2, window=None))
    with pytest.raises(exc, match=match):
        ops.attention_kvcache(a["qkv"], a["k_cache"], a["v_cache"], a["pos"], a["n_head"], a["window"])


def test_pos_plus_tn_may_reach_tmax_exactly():
    qkv, kc, vc = _args(Tn=3)
    out = ops.attention_kvcache(np.zeros((2, 3, 24), np.float32), kc, vc, 5, 2)
    assert out.shape == (2, 3, 8)
    with pytest.raises(ValueError, match="pos"):
        ops.attention_kvcache(np.zeros((2, 3, 24), np.float32), kc, vc, 6, 2)


# ---- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_kvcache_cuda_device_mismatch():
    qkv = gptcore.zeros([1, 1, 24], device="cuda")
    with pytest.raises(ValueError, match="k_cache"):
        ops.attention_kvcache(qkv, gptcore.zeros([1, 2, 4, 4]), gptcore.zeros([1, 2, 4, 4], device="cuda"), 0, 2)


# ---- the position as a tensor (decode steps captured in a CUDA graph) --------------------------


def test_kvcache_tensor_pos_is_read_at_every_call(rng):
    """One position tensor advanced in place: incremental decoding equals full attention."""
    B, T, H, D = 2, 11, 3, 8
    C = H * D
    qkv = rng.randn(B, T, 3 * C)
    full = np.asarray(ops.attention_forward(qkv, H)[0], np.float64)
    kc, vc = gptcore.zeros([B, H, T, D]), gptcore.zeros([B, H, T, D])
    p = gptcore.tensor(np.array([0], np.int32))
    step, out = gptcore.empty([B, 1, 3 * C]), gptcore.empty([B, 1, C])
    rows = []
    for t in range(T):
        step.copy_(gptcore.tensor(np.ascontiguousarray(qkv[:, t:t + 1])))
        p.copy_(gptcore.tensor(np.array([t], np.int32)))
        ops.attention_kvcache(step, kc, vc, p, H, out=out)
        rows.append(np.array(out))
    check("tensor-pos decoding vs full", np.concatenate(rows, axis=1), full, rng)


@pytest.mark.parametrize("pos, exc, match", [
    (np.array([-1], np.int32), ValueError, "pos"),
    (np.array([8], np.int32), ValueError, "pos"),             # pos + Tn > Tmax
    (np.array([2**31 - 1], np.int32), ValueError, "pos"),
    (np.array([3], np.int64), TypeError, "pos"),              # int32 only
    (np.array([3.0], np.float32), TypeError, "pos"),
    (np.array([3, 4, 5], np.int32), ValueError, "pos"),       # one element, or one per row (B = 2)
    (np.array([[3]], np.int32), ValueError, "pos"),
    (np.zeros((0,), np.int32), ValueError, "pos"),
    (None, TypeError, "pos"),
    (True, TypeError, "pos"),
    (3.0, TypeError, "pos"),
])
def test_kvcache_bad_tensor_pos(pos, exc, match):
    qkv, kc, vc = _args()
    with pytest.raises(exc, match=match):
        ops.attention_kvcache(qkv, kc, vc, pos, 2)


def test_kvcache_pos_tensor_overlapping_outputs_is_refused():
    qkv, kc, vc = _args()
    out = np.zeros((2, 1, 8), np.float32)
    with pytest.raises(ValueError, match="pos"):
        ops.attention_kvcache(qkv, kc, vc, out.reshape(-1)[:1].view(np.int32), 2, out=out)
    k_np = np.zeros((2, 2, 8, 4), np.float32)
    with pytest.raises(ValueError, match="pos"):
        ops.attention_kvcache(qkv, k_np, vc, k_np.reshape(-1)[:1].view(np.int32), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5, 300])
def test_kvcache_cuda_device_pos_decoding(rng, window):
    """Every position of a long cache through one device position tensor (one split at first,
    several later): each step equals the int-position result of the same inputs."""
    B, H, D, Tmax = 1, 4, 64, 600
    C = H * D
    qkv = rng.randn(B, Tmax, 3 * C)
    kc, vc = gptcore.zeros([B, H, Tmax, D], device="cuda"), gptcore.zeros([B, H, Tmax, D], device="cuda")
    kc2, vc2 = gptcore.zeros([B, H, Tmax, D], device="cuda"), gptcore.zeros([B, H, Tmax, D], device="cuda")
    p = gptcore.tensor(np.array([0], np.int32), device="cuda")
    step = gptcore.empty([B, 1, 3 * C], device="cuda")
    for t in range(0, Tmax, 7):
        step.copy_(gptcore.tensor(np.ascontiguousarray(qkv[:, t:t + 1])))
        p.copy_(gptcore.tensor(np.array([t], np.int32)))
        got = ops.attention_kvcache(step, kc, vc, p, H, window)
        want = ops.attention_kvcache(step, kc2, vc2, t, H, window)
        check(f"device pos {t}", got.numpy(), np.asarray(want.numpy(), np.float64), rng)
    np.testing.assert_array_equal(np.asarray(kc.numpy()), np.asarray(kc2.numpy()))


@pytest.mark.gpu
@pytest.mark.parametrize("Tmax", [8, 1024])  # one key range, and several + the combine kernel
@pytest.mark.parametrize("bad", [-1, "end", 2**31 - 1])
def test_kvcache_cuda_device_pos_out_of_range(rng, Tmax, bad):
    """The host cannot check a device position: the caches stay untouched and out is NaN."""
    B, Tn, H, D = 1, 2, 2, 64
    bad = Tmax - Tn + 1 if bad == "end" else bad
    qkv = gptcore.tensor(rng.randn(B, Tn, 3 * H * D), device="cuda")
    k0, v0 = rng.randn(B, H, Tmax, D), rng.randn(B, H, Tmax, D)
    kc, vc = gptcore.tensor(k0, device="cuda"), gptcore.tensor(v0, device="cuda")
    p = gptcore.tensor(np.array([bad], np.int32), device="cuda")
    out = np.asarray(ops.attention_kvcache(qkv, kc, vc, p, H).numpy())
    assert np.isnan(out).all(), f"pos={bad}: expected NaN output"
    np.testing.assert_array_equal(np.asarray(kc.numpy()), k0)
    np.testing.assert_array_equal(np.asarray(vc.numpy()), v0)


@pytest.mark.gpu
def test_kvcache_cuda_pos_tensor_on_wrong_device():
    qkv = gptcore.zeros([1, 1, 24], device="cuda")
    kc, vc = gptcore.zeros([1, 2, 4, 4], device="cuda"), gptcore.zeros([1, 2, 4, 4], device="cuda")
    with pytest.raises(ValueError, match="pos"):
        ops.attention_kvcache(qkv, kc, vc, np.array([0], np.int32), 2)
    with pytest.raises(ValueError, match="pos"):
        ops.attention_kvcache(np.zeros((1, 1, 24), np.float32), gptcore.zeros([1, 2, 4, 4]),
                              gptcore.zeros([1, 2, 4, 4]),
                              gptcore.zeros([1], dtype="int32", device="cuda"), 2)
    with pytest.raises(ValueError, match="qkv"):  # Tn > Tmax is visible without the value
        ops.attention_kvcache(gptcore.zeros([1, 5, 24], device="cuda"), kc, vc,
                              gptcore.zeros([1], dtype="int32", device="cuda"), 2)
