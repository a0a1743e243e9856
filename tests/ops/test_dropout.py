"""Dropout: the counter-based generator (csrc/core/hash.h), the dropout op and the dropout fused
into attention, into the residual add + LayerNorm and into the embedding, on the CPU (and CUDA,
``gpu`` marker) against the float64 NumPy reference.

The mask is a pure function of (p, seed, stream, element index), so it is compared bit for bit:
CPU and CUDA against ``reference.dropout_mask``, the reference against an independent
pure-Python splitmix64, and backward against forward. Values are compared exactly where the
arithmetic is one float32 product (x * float32(1/(1-p))), by relative L2 error elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gptcore
from gptcore import ops

from gptcore import reference as ref
from tests.helpers import BACKENDS, check, f64, host

TOL = 1e-5
M64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


def scale_of(p):
    return np.float32(1.0 / (1.0 - p))


# ---- the generator --------------------------------------------------------------------------


def _mix(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _keep_py(i, p, seed, stream):
    """The documented formula in plain Python integers (independent of the NumPy reference)."""
    key = _mix((_mix((seed + G) & M64) + G * (stream + 1)) & M64)
    bits = _mix((key + G * (i + 1)) & M64)
    return (bits >> 32) >= math.floor(p * 2 ** 32)


def test_splitmix_known_value():
    # splitmix64 seeded with 0 returns mix(G) first: the generator is the published one
    assert _mix(G) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
@pytest.mark.parametrize("seed, stream", [(0, 0), (1, 0), (0, 1), (12345, 678), (M64, M64)])
def test_reference_mask_matches_formula(p, seed, stream):
    idx = [0, 1, 2, 63, 64, 1000, 99991]
    mask = ref.dropout_mask((100000,), p, seed, stream)
    assert [bool(mask[i]) for i in idx] == [_keep_py(i, p, seed, stream) for i in idx]


# ---- the dropout op -------------------------------------------------------------------------

SHAPES = [(1,), (7,), (3, 5, 7), (129, 65), (2, 3, 4097)]
SEEDS = [(0, 0), (7, 3), (2 ** 63 + 5, 11), (M64, M64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed, stream", SEEDS)
def test_cpu_mask_equals_reference(rng, shape, p, seed, stream):
    x = rng.uniform(1.0, 2.0, size=shape).astype(np.float32)  # never 0: kept <=> nonzero
    out = ops.dropout_forward(x, p, seed, stream).numpy()
    mask = ref.dropout_mask(shape, p, seed, stream)
    np.testing.assert_array_equal(out != 0, mask)
    # kept values scaled exactly by float32(1/(1-p)), dropped ones exactly 0
    np.testing.assert_array_equal(out, np.where(mask, x * scale_of(p), np.float32(0)))
    np.testing.assert_array_equal(out, ref.dropout_forward(x, p, seed, stream).astype(np.float32))


@pytest.mark.parametrize("p", [1e-3, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_keep_rate_within_binomial_bounds(p):
    n = 1_000_003
    for seed, stream in [(0, 0), (1, 5)]:
        kept = int((ops.dropout_forward(np.ones(n, np.float32), p, seed, stream).numpy() != 0).sum())
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) <= 5 * sigma, (p, seed, stream, kept)


def test_seed_and_stream_select_the_mask(rng):
    x = np.ones(4096, np.float32)
    m = lambda s, st: ops.dropout_forward(x, 0.5, s, st).numpy() != 0  # noqa: E731
    base = m(3, 4)
    np.testing.assert_array_equal(base, m(3, 4))  # same seed and stream: same mask
    for other in [m(4, 4), m(3, 5), m(4, 3)]:  # any change: a different mask (~half differ)
        assert 1500 < (other != base).sum() < 2600


def test_mask_independent_of_thread_count():
    x = np.ones((513, 257), np.float32)
    n0 = gptcore.get_num_threads()
    try:
        gptcore.set_num_threads(1)
        one = ops.dropout_forward(x, 0.3, 9, 1).numpy()
        gptcore.set_num_threads(max(2, n0))
        many = ops.dropout_forward(x, 0.3, 9, 1).numpy()
    finally:
        gptcore.set_num_threads(n0)
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("shape", [(1,), (37, 5), (4, 1029)])
def test_backward_uses_forwards_mask(rng, shape):
    p, seed, stream = 0.37, 123, 4
    x = rng.uniform(1.0, 2.0, size=shape).astype(np.float32)
    dout = rng.randn(*shape)
    y = ops.dropout_forward(x, p, seed, stream).numpy()
    dx = ops.dropout_backward(dout, p, seed, stream).numpy()
    np.testing.assert_array_equal(dx, np.where(y != 0, dout * scale_of(p), np.float32(0)))
    np.testing.assert_array_equal(dx, ref.dropout_backward(dout, p, seed, stream).astype(np.float32))


def test_dropped_inf_and_nan_become_zero():
    x = np.full(256, np.inf, np.float32)
    x[::2] = np.nan
    out = ops.dropout_forward(x, 0.5, 1, 2).numpy()
    mask = ref.dropout_mask(x.shape, 0.5, 1, 2)
    assert (out[~mask] == 0).all()


def test_p_zero_is_the_identity(rng):
    x = rng.randn(5, 33)
    out = ops.dropout_forward(x, 0.0, 1, 2)
    np.testing.assert_array_equal(out.numpy(), x)
    assert out.numpy().ctypes.data != x.ctypes.data  # a copy, not x itself
    np.testing.assert_array_equal(ops.dropout_backward(x, 0.0, 1, 2).numpy(), x)
    t = gptcore.tensor(x)
    same = ops.dropout_forward(t, 0.0, 1, 2, inplace=True)
    assert same.data_ptr() == t.data_ptr()
    np.testing.assert_array_equal(t.numpy(), x)
    np.testing.assert_array_equal(ref.dropout_forward(x, 0.0, 1, 2), x)


def test_inplace_and_out(rng):
    p, seed, stream = 0.25, 5, 6
    x = rng.randn(17, 19)
    want = ops.dropout_forward(x, p, seed, stream).numpy()
    t = gptcore.tensor(x)
    r = ops.dropout_forward(t, p, seed, stream, inplace=True)
    assert r.data_ptr() == t.data_ptr()
    np.testing.assert_array_equal(t.numpy(), want)
    a = x.copy()  # a writable NumPy array is updated in place too
    ops.dropout_backward(a, p, seed, stream, inplace=True)
    np.testing.assert_array_equal(a, want)
    buf = gptcore.empty([17, 19])
    r = ops.dropout_forward(x, p, seed, stream, out=buf)
    assert r.data_ptr() == buf.data_ptr()
    np.testing.assert_array_equal(buf.numpy(), want)


def test_empty_tensor():
    out = ops.dropout_forward(np.zeros((0, 3), np.float32), 0.5, 0, 0)
    assert out.shape == (0, 3)


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_bad_p(p):
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="p"):
        ops.dropout_forward(x, p, 0, 0)
    with pytest.raises(ValueError, match="p"):
        ops.dropout_backward(x, p, 0, 0)
    qkv = np.ones((1, 3, 6), np.float32)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention_forward(qkv, 1, dropout_p=p)
    out, lse = ops.attention_forward(qkv, 1)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention_backward(np.ones((1, 3, 2), np.float32), qkv, out, lse, 1, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p"):
        ref.attention_forward(qkv, 1, dropout_p=p)
    with pytest.raises(ValueError, match="p"):
        ref.dropout_mask((4,), p, 0, 0)


def test_bad_arguments():
    x = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="x"):
        ops.dropout_forward(np.ones(8, np.int32), 0.5, 0, 0)
    with pytest.raises(TypeError, match="dout"):
        ops.dropout_backward(np.ones(8, np.int64), 0.5, 0, 0)
    with pytest.raises(TypeError, match="p"):
        ops.dropout_forward(x, "0.5", 0, 0)
    with pytest.raises(TypeError, match="seed"):
        ops.dropout_forward(x, 0.5, 1.5, 0)
    with pytest.raises(TypeError, match="stream"):
        ops.dropout_forward(x, 0.5, 0, True)
    with pytest.raises(ValueError, match="seed"):
        ops.dropout_forward(x, 0.5, -1, 0)
    with pytest.raises(ValueError, match="stream"):
        ops.dropout_forward(x, 0.5, 0, 2 ** 64)
    with pytest.raises(ValueError, match="seed"):
        ops.attention_forward(np.ones((1, 2, 6), np.float32), 1, dropout_p=0.1, seed=-3)
    ro = np.ones(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ops.dropout_forward(ro, 0.5, 0, 0, inplace=True)
    with pytest.raises(ValueError, match="read-only"):
        ops.dropout_backward(ro, 0.5, 0, 0, inplace=True)
    ops.dropout_forward(ro, 0.5, 0, 0)  # reading a read-only array is fine
    with pytest.raises(ValueError, match="out"):
        ops.dropout_forward(gptcore.tensor(x), 0.5, 0, 0, inplace=True, out=gptcore.empty([8]))
    with pytest.raises(ValueError, match="out"):
        ops.dropout_forward(x, 0.5, 0, 0, out=gptcore.empty([9]))
    with pytest.raises(TypeError, match="out"):
        ops.dropout_forward(x, 0.5, 0, 0, out=gptcore.empty([8], dtype="int32"))
    t = gptcore.tensor(x)
    with pytest.raises(ValueError, match="overlaps"):
        ops.dropout_forward(t, 0.5, 0, 0, out=t)


# ---- attention with dropout -----------------------------------------------------------------

ATTN_DROP_CASES = [
    # B, T, n_head, D, window, p
    (1, 1, 1, 16, None, 0.5),
    (2, 37, 3, 16, None, 0.1),
    (1, 65, 2, 64, None, 0.3),
    (2, 70, 2, 8, 5, 0.5),
    (1, 129, 1, 24, 50, 0.2),
    (1, 67, 4, 16, 1, 0.4),
    (2, 33, 2, 13, 100, 0.9),
]


def _explicit_attention(qkv, H, window, p, seed, stream):
    """out from an explicit (B, H, T, T) softmax and ref.dropout_mask over the whole probability
    tensor: checks the element index ((b*H + h)*T + t)*T + s independently of the reference."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // H
    q, k, v = (f64(qkv[:, :, i * C:(i + 1) * C]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
               for i in range(3))
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (s <= t) & ((s > t - window) if window else True)
    sc = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / math.sqrt(D), -np.inf)
    P = np.exp(sc - sc.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    Z = np.where(ref.dropout_mask((B, H, T, T), p, seed, stream), float(scale_of(p)), 0.0)
    return ((P * Z) @ v).transpose(0, 2, 1, 3).reshape(B, T, C)


@pytest.mark.parametrize("B, T, H, D, window, p", ATTN_DROP_CASES)
def test_attention_dropout_cpu(rng, B, T, H, D, window, p):
    C = H * D
    seed, stream = int(rng.integers(0, 2 ** 63)), int(rng.integers(0, 1000))
    kw = dict(dropout_p=p, seed=seed, stream=stream)
    qkv = rng.randn(B, T, 3 * C)
    out, lse = ops.attention_forward(qkv, H, window, **kw)
    out_r, lse_r = ref.attention_forward(f64(qkv), H, window, **kw)
    check("attention out (dropout)", out, out_r, rng)
    check("attention out (explicit mask)", out, _explicit_attention(qkv, H, window, p, seed, stream), rng)
    # lse is that of the un-dropped softmax; floor: with T = 1 it is one score, which may be ~0
    check("attention lse (dropout)", lse, ref.attention_forward(f64(qkv), H, window)[1], rng,
          floor=math.sqrt(lse.numpy().size))
    dout = rng.randn(B, T, C)
    dqkv = ops.attention_backward(dout, qkv, out, lse, H, window, **kw)
    dqkv_r = ref.attention_backward(f64(dout), f64(qkv), out_r, lse_r, H, window, **kw)
    check("attention dqkv (dropout)", dqkv, dqkv_r, rng, tol=2e-5)
    # another stream is another mask
    other = ops.attention_forward(qkv, H, window, dropout_p=p, seed=seed, stream=stream + 1)[0]
    if T * T * B * H > 200:
        assert not np.array_equal(other.numpy(), out.numpy())


@pytest.mark.parametrize("B, T, H, D, window", [(2, 37, 3, 16, None), (1, 65, 2, 24, 5)])
def test_attention_dropout_zero_is_exactly_no_dropout(rng, B, T, H, D, window):
    qkv = rng.randn(B, T, 3 * H * D)
    out, lse = ops.attention_forward(qkv, H, window)
    out0, lse0 = ops.attention_forward(qkv, H, window, dropout_p=0.0, seed=5, stream=7)
    np.testing.assert_array_equal(out0.numpy(), out.numpy())
    np.testing.assert_array_equal(lse0.numpy(), lse.numpy())
    dout = rng.randn(B, T, H * D)
    d = ops.attention_backward(dout, qkv, out, lse, H, window)
    d0 = ops.attention_backward(dout, qkv, out, lse, H, window, dropout_p=0.0, seed=5, stream=7)
    np.testing.assert_array_equal(d0.numpy(), d.numpy())
    ro, rl = ref.attention_forward(f64(qkv), H, window)
    ro0, _ = ref.attention_forward(f64(qkv), H, window, dropout_p=0.0, seed=5, stream=7)
    np.testing.assert_array_equal(ro0, ro)


@pytest.mark.parametrize("window", [None, 2])
def test_attention_dropout_reference_gradient(window):
    """Central differences of the reference (mask fixed by seed/stream) against its backward."""
    rng = np.random.default_rng(0)
    B, T, H, D, p = 2, 5, 2, 3, 0.4
    kw = dict(dropout_p=p, seed=77, stream=3)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    g = rng.standard_normal((B, T, H * D))
    loss = lambda a: float((ref.attention_forward(a, H, window, **kw)[0] * g).sum())  # noqa: E731
    out, lse = ref.attention_forward(qkv, H, window, **kw)
    assert (ref.dropout_mask((B, H, T, T), p, 77, 3) == 0).any()  # the mask drops something
    dqkv = ref.attention_backward(g, qkv, out, lse, H, window, **kw)
    num = np.empty_like(qkv)
    eps = 1e-6
    for i in range(qkv.size):
        a, b = qkv.copy(), qkv.copy()
        a.flat[i] += eps
        b.flat[i] -= eps
        num.flat[i] = (loss(a) - loss(b)) / (2 * eps)
    err = np.linalg.norm(dqkv - num) / np.linalg.norm(num)
    assert err < 1e-7, err


# ---- dropout fused into residual + LayerNorm and into the embedding ----------------------------
# Written once over the backends (CPU; CUDA float32 and bfloat16 with the gpu marker). The fused
# forms must draw dropout_forward's mask exactly: their results are compared bit for bit with the
# unfused pair (dropout_forward, then the dropout-free op), and with the reference by tolerance.

FUSED_LN_SHAPES = [(1, 1), (1, 8), (37, 8), (3, 7, 8), (5, 37), (129, 33), (2, 65, 768),
                   (2, 9, 768), (3, 1600)]


def _seed_stream(rng):
    return int(rng.integers(0, 2 ** 63)) * 2 + 1, int(rng.integers(0, 1000))


@pytest.fixture
def _poison(monkeypatch):
    monkeypatch.setenv("GPTCORE_POISON_ALLOC", "1")


@pytest.mark.usefixtures("_poison")
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", FUSED_LN_SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_residual_layernorm_dropout(rng, be, shape, p):
    C = shape[-1]
    seed, stream = _seed_stream(rng)
    kw = dict(dropout_p=p, seed=seed, stream=stream)
    x, r = be.rounded(rng.randn(*shape)), be.rounded(rng.randn(*shape))
    w, b = be.rounded(rng.randn(C)), be.rounded(rng.randn(C))
    s, out, mean, rstd = ops.residual_layernorm_forward(be.put(x), be.put(r), be.put(w), be.put(b),
                                                        1e-5, **kw)
    # sum = x * mask * scale + residual: the explicit formula, and the reference
    mask = ref.dropout_mask(shape, p, seed, stream)
    explicit = np.where(mask, x * float(scale_of(p)), 0.0) + r
    s_r, out_r, mean_r, rstd_r = ref.residual_layernorm_forward(x, r, w, b, 1e-5, **kw)
    np.testing.assert_array_equal(s_r, explicit)
    check("fused dropout sum", host(s), explicit, rng, be.tol / 2)  # bf16: two roundings
    check("fused dropout out", host(out), out_r, rng, be.tol)
    # the kernel normalises the stored (rounded) sum, as backward will see it
    out_s, mean_s, rstd_s = ref.layernorm_forward(host(s), w, b, 1e-5)
    check("fused dropout out (of sum)", host(out), out_s, rng, be.tol)
    check("fused dropout mean", host(mean), mean_s, rng)
    check("fused dropout rstd", host(rstd), rstd_s, rng)
    # bit for bit the unfused pair: dropout_forward, then the dropout-free op
    xd = ops.dropout_forward(be.put(x), p, seed, stream)
    unfused = ops.residual_layernorm_forward(xd, be.put(r), be.put(w), be.put(b), 1e-5)
    for name, got, want in zip(("sum", "out", "mean", "rstd"), (s, out, mean, rstd), unfused):
        np.testing.assert_array_equal(host(got), host(want), err_msg=f"{name} ({rng})")


@pytest.mark.usefixtures("_poison")
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 5, 768), (129, 65)])
@pytest.mark.parametrize("seed, stream", SEEDS)
def test_residual_layernorm_dropout_mask_is_dropout_forwards(rng, be, shape, seed, stream):
    """With a zero residual the fused sum is exactly dropout_forward(x): the same mask, the same
    scaled values, for the same (p, seed, stream)."""
    p = 0.3
    x = be.rounded(rng.uniform(1.0, 2.0, size=shape))  # never 0: kept <=> nonzero
    C = shape[-1]
    s = ops.residual_layernorm_forward(be.put(x), be.put(np.zeros(shape)), be.put(np.ones(C)),
                                       be.put(np.zeros(C)), dropout_p=p, seed=seed, stream=stream)[0]
    d = ops.dropout_forward(be.put(x), p, seed, stream)
    np.testing.assert_array_equal(host(s), host(d))
    np.testing.assert_array_equal(host(s) != 0, ref.dropout_mask(shape, p, seed, stream))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 8), (2, 9, 768), (5, 37)])
def test_residual_layernorm_dropout_zero_is_unfused(rng, be, shape):
    C = shape[-1]
    args = [be.put(a) for a in (rng.randn(*shape), rng.randn(*shape), rng.randn(C), rng.randn(C))]
    plain = ops.residual_layernorm_forward(*args, 1e-5)
    zero = ops.residual_layernorm_forward(*args, 1e-5, dropout_p=0.0, seed=5, stream=7)
    for got, want in zip(zero, plain):
        np.testing.assert_array_equal(host(got), host(want))
    x, r, w, b = (host(a) for a in args)
    for got, want in zip(ref.residual_layernorm_forward(x, r, w, b, dropout_p=0.0, seed=5, stream=7),
                         ref.residual_layernorm_forward(x, r, w, b)):
        np.testing.assert_array_equal(got, want)


def test_residual_layernorm_dropout_independent_of_thread_count(rng):
    x, r = rng.randn(513, 257), rng.randn(513, 257)
    w, b = rng.randn(257), rng.randn(257)
    n0 = gptcore.get_num_threads()
    try:
        gptcore.set_num_threads(1)
        one = ops.residual_layernorm_forward(x, r, w, b, dropout_p=0.3, seed=9, stream=1)[0].numpy()
        gptcore.set_num_threads(max(2, n0))
        many = ops.residual_layernorm_forward(x, r, w, b, dropout_p=0.3, seed=9, stream=1)[0].numpy()
    finally:
        gptcore.set_num_threads(n0)
    np.testing.assert_array_equal(one, many)


EMB_CASES = [  # B, T, C, pos ("dev": a 1-element int32 tensor holding 3)
    (1, 1, 1, None), (2, 37, 65, 3), (3, 17, 768, 0), (2, 5, 13, "dev"), (1, 9, 64, "dev")]


@pytest.mark.usefixtures("_poison")
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("B, T, C, pos", EMB_CASES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_embedding_dropout(rng, be, B, T, C, pos, p):
    V, maxT = 11, T + 5
    seed, stream = _seed_stream(rng)
    kw = dict(dropout_p=p, seed=seed, stream=stream)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = be.rounded(rng.randn(V, C)), be.rounded(rng.randn(maxT, C))
    p0 = 3 if pos == "dev" else pos
    pos_arg = be.put(np.array([3], np.int32)) if pos == "dev" else pos
    args = (be.put(idx), be.put(wte), be.put(wpe), pos_arg)
    out = ops.embedding_forward(*args, **kw)
    plain = ops.embedding_forward(*args)
    # bit for bit dropout_forward of the plain embedding (the same mask, the same rounding)
    np.testing.assert_array_equal(host(out), host(ops.dropout_forward(plain, p, seed, stream)))
    # against the reference, and the explicit formula
    want = ref.embedding_forward(idx, wte, wpe, p0, **kw)
    check("fused embedding dropout", host(out), want, rng, be.tol / 2)  # bf16: two roundings
    s = 0 if p0 is None else p0
    mask = ref.dropout_mask((B, T, C), p, seed, stream)
    np.testing.assert_array_equal(
        want, np.where(mask, (wte[idx] + wpe[s:s + T]) * float(scale_of(p)), 0.0))
    # p = 0: the dropout-free kernel, bit for bit
    zero = ops.embedding_forward(*args, dropout_p=0.0, seed=seed, stream=stream)
    np.testing.assert_array_equal(host(zero), host(plain))


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_fused_bad_p(p):
    x, w, b = np.ones((2, 4), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32)
    idx, wte, wpe = np.zeros((1, 2), np.int32), np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.residual_layernorm_forward(x, x, w, b, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p"):
        ref.residual_layernorm_forward(x, x, w, b, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.embedding_forward(idx, wte, wpe, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p"):
        ref.embedding_forward(idx, wte, wpe, dropout_p=p)


def test_fused_bad_seed_and_stream():
    x, w, b = np.ones((2, 4), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32)
    idx, wte, wpe = np.zeros((1, 2), np.int32), np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)
    for call in (lambda dropout_p=0.1, **k: ops.residual_layernorm_forward(x, x, w, b,
                                                                           dropout_p=dropout_p, **k),
                 lambda dropout_p=0.1, **k: ops.embedding_forward(idx, wte, wpe,
                                                                  dropout_p=dropout_p, **k)):
        with pytest.raises(ValueError, match="seed"):
            call(seed=-1)
        with pytest.raises(ValueError, match="stream"):
            call(stream=2 ** 64)
        with pytest.raises(TypeError, match="seed"):
            call(seed=1.5)
        with pytest.raises(TypeError, match="dropout_p"):
            call(dropout_p="0.1")
        call(seed=2 ** 64 - 1, stream=2 ** 64 - 1)  # the full range is accepted


# ---- CUDA -----------------------------------------------------------------------------------

def _dev(x, dtype="float32"):
    return gptcore.tensor(np.ascontiguousarray(x, dtype=np.float32), device="cuda", dtype=dtype)


def _host(t):
    return np.asarray(t.numpy(), dtype=np.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (129, 65), (2, 3, 4097)])
@pytest.mark.parametrize("seed, stream", SEEDS)
def test_cuda_dropout_mask_equals_reference(rng, monkeypatch, dtype, shape, seed, stream):
    monkeypatch.setenv("GPTCORE_POISON_ALLOC", "1")
    p = 0.3
    x = _host(_dev(rng.uniform(1.0, 2.0, size=shape), dtype))  # bf16-rounded when bf16
    mask = ref.dropout_mask(shape, p, seed, stream)
    out = _host(ops.dropout_forward(_dev(x, dtype), p, seed, stream))
    np.testing.assert_array_equal(out != 0, mask)
    want = np.where(mask, (x.astype(np.float32) * scale_of(p)).astype(np.float64), 0.0)
    if dtype == "float32":
        np.testing.assert_array_equal(out, want)
    else:
        np.testing.assert_allclose(out, want, rtol=2 ** -8)
    dx = _host(ops.dropout_backward(_dev(x, dtype), p, seed, stream))
    np.testing.assert_array_equal(dx, out)
    # in place
    t = _dev(x, dtype)
    ops.dropout_forward(t, p, seed, stream, inplace=True)
    np.testing.assert_array_equal(_host(t), out)
    # a view one element into a buffer: not 16-byte aligned, the kernel's scalar path
    view = _dev(np.concatenate([[1.0], x.ravel()]), dtype).narrow(1, x.size)
    got = _host(ops.dropout_forward(view, p, seed, stream)).reshape(shape)
    np.testing.assert_array_equal(got, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape, window", [((2, 37, 3, 16), None), ((1, 130, 2, 64), None),
                                           ((2, 70, 1, 128), 5), ((1, 65, 2, 24), 64),
                                           ((1, 1, 2, 64), None)])
def test_cuda_attention_dropout(rng, monkeypatch, dtype, shape, window):
    monkeypatch.setenv("GPTCORE_POISON_ALLOC", "1")
    B, T, H, D = shape
    kw = dict(dropout_p=0.2, seed=int(rng.integers(0, 2 ** 63)), stream=11)
    qkv = _host(_dev(rng.randn(B, T, 3 * H * D), dtype))
    dout = _host(_dev(rng.randn(B, T, H * D), dtype))
    q = _dev(qkv, dtype)
    out, lse = ops.attention_forward(q, H, window, **kw)
    ro, rl = ref.attention_forward(qkv, H, window, **kw)
    ftol = 1e-5 if dtype == "float32" else 1e-2
    check("cuda attention out (dropout)", _host(out), ro, rng, tol=ftol)
    check("cuda attention lse (dropout)", _host(lse), rl, rng, tol=1e-5 if dtype == "float32" else 1e-3)
    dqkv = ops.attention_backward(_dev(dout, dtype), q, out, lse, H, window, **kw)
    rd = ref.attention_backward(dout, qkv, _host(out), _host(lse), H, window, **kw)
    check("cuda attention dqkv (dropout)", _host(dqkv), rd, rng,
          tol=2e-5 if dtype == "float32" else 2e-2)
    again = ops.attention_backward(_dev(dout, dtype), q, out, lse, H, window, **kw)
    np.testing.assert_array_equal(again.numpy(), dqkv.numpy())


@pytest.mark.gpu
def test_cuda_attention_dropout_matches_cpu_mask(rng):
    """CPU and CUDA draw the same mask: with V = identity-like values the outputs agree."""
    B, T, H, D = 1, 40, 2, 16
    kw = dict(dropout_p=0.5, seed=3, stream=4)
    qkv = rng.randn(B, T, 3 * H * D)
    cpu = ops.attention_forward(qkv, H, None, **kw)[0].numpy()
    gpu = ops.attention_forward(_dev(qkv), H, None, **kw)[0].numpy()
    check("cuda vs cpu attention (dropout)", gpu, cpu, rng)
