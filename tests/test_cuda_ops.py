"""Every op of the table on a CUDA GPU against the NumPy reference (float64).

Tolerances (relative error ||out - ref|| / ||ref||):
  * float32: 1e-5. Every float32 CUDA kernel computes in fp32 arithmetic (the GEMM and attention
    take SIMT paths, not TF32), so only rounding of long sums remains.
  * bfloat16: 1e-2, with the reference fed the same bf16-rounded inputs; attention backward gets
    2e-2 because P and dS are rounded to bf16 before the tensor-core products (as in
    FlashAttention).
Every test draws fresh random inputs (the ``rng`` fixture prints its seed), includes odd sizes
(tails of every tile and vector width), and runs with GPTCORE_POISON_ALLOC=1 so every buffer
the CUDA allocator hands out starts as NaN: an output element a kernel forgets to write fails.

All tests carry the ``gpu`` marker and are skipped where ``gptcore.cuda.is_available()`` is
False (conftest.py).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref

pytestmark = pytest.mark.gpu

DTYPES = ["float32", "bfloat16"]
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Read by the CUDA allocator on every allocation: new and reused blocks start as NaN.
    monkeypatch.setenv("GPTCORE_POISON_ALLOC", "1")
    yield


# ---- helpers ----------------------------------------------------------------------------------


def dev(x, dtype="float32"):
    """A CUDA tensor holding x (floats converted to `dtype`; index arrays keep theirs)."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        return gptcore.tensor(np.ascontiguousarray(x, dtype=np.float32), device="cuda", dtype=dtype)
    return gptcore.tensor(np.ascontiguousarray(x), device="cuda")


def host(t) -> np.ndarray:
    """A gptcore tensor back on the host as float64 (bf16 widens exactly)."""
    return np.asarray(t.numpy(), dtype=np.float64)


def rounded(x, dtype):
    """x as the GPU sees it after upload in `dtype` (the reference gets the same values)."""
    return host(dev(x, dtype))


def check(out, want, tol, what, rng=None):
    out = np.asarray(out, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert out.shape == want.shape, f"{what}: shape {out.shape} != {want.shape}"
    bad = ~np.isfinite(out)
    assert not bad.any(), (f"{what}: {bad.sum()} non-finite elements (unwritten?) first at "
                           f"{np.argwhere(bad)[0].tolist()} [{rng}]")
    denom = max(np.linalg.norm(want), 1e-30)
    err = np.linalg.norm(out - want) / denom
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} [{rng}]"


# ---- runtime ------------------------------------------------------------------------------------


def test_poisoned_allocation_is_nan():
    t = gptcore.empty([1000], dtype="float32", device="cuda")
    assert np.isnan(t.numpy()).all()
    t = gptcore.empty([1000], dtype="bfloat16", device="cuda")
    assert np.isnan(t.numpy()).all()


@pytest.mark.parametrize("n", [1, 1023, 70001])
def test_copy_and_cast_round_trip(rng, n):
    x = rng.randn(n, scale=100.0)
    t = gptcore.tensor(x, device="cuda")
    np.testing.assert_array_equal(t.numpy(), x)
    # float32 -> bfloat16 on the device rounds to nearest even like the host conversion
    on_dev = t.to(dtype="bfloat16").numpy()
    on_host = gptcore.tensor(x, dtype="bfloat16").numpy()
    np.testing.assert_array_equal(on_dev, on_host)
    # integers <-> floats truncate as C does
    ints = rng.integers(-50000, 50000, size=n).astype(np.int64)
    ti = gptcore.tensor(ints, device="cuda")
    np.testing.assert_array_equal(ti.to(dtype="int32").numpy(), ints.astype(np.int32))
    np.testing.assert_array_equal(ti.to(dtype="float32").numpy(), ints.astype(np.float32))
    np.testing.assert_array_equal(t.to(dtype="int64").numpy(), x.astype(np.int64))
    # device to device copy
    u = gptcore.tensor(t, device="cuda")
    np.testing.assert_array_equal(u.numpy(), x)


def test_stream_setting():
    s0 = gptcore.cuda.current_stream()
    gptcore.cuda.set_stream(0)
    assert gptcore.cuda.current_stream() == 0
    gptcore.cuda.synchronize()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        gptcore.cuda.set_stream(s0)
        return
    s = torch.cuda.Stream()
    gptcore.cuda.set_stream(s.cuda_stream)
    try:
        assert gptcore.cuda.current_stream() == s.cuda_stream
        x = np.arange(4096, dtype=np.float32)
        t = gptcore.tensor(x, device="cuda")
        out, _, _ = ops.layernorm_forward(t, dev(np.ones(4096, np.float32)),
                                          dev(np.zeros(4096, np.float32)))
        gptcore.cuda.synchronize()
        assert np.isfinite(out.numpy()).all()
    finally:
        gptcore.cuda.set_stream(s0)


def test_cached_allocator_reuses_blocks():
    gptcore.cuda.empty_cache()
    a = gptcore.empty([1 << 20], dtype="float32", device="cuda")
    ptr = a.data_ptr()
    del a
    assert gptcore._C.cuda.cached_bytes() >= 4 << 20
    b = gptcore.empty([1 << 20], dtype="float32", device="cuda")
    assert b.data_ptr() == ptr  # the freed block comes back, no cudaMalloc


def test_dlpack_export_of_a_cuda_tensor(rng):
    # The array-API stream values: None (legacy default), 1 (legacy), 2 (per-thread), -1 (no
    # synchronisation) all hand back a zero-copy capsule of finished data; asking for another
    # device than the tensor's is refused with BufferError (gptcore does not copy there).
    x = rng.randn(1000)
    t = gptcore.tensor(x, device="cuda")
    assert t.__dlpack_device__() == (2, 0)
    for stream in (None, 1, 2, -1):
        u = gptcore.from_dlpack(t.__dlpack__(stream=stream, dl_device=(2, 0)))
        assert u.data_ptr() == t.data_ptr() and u.device == "cuda:0"
        np.testing.assert_array_equal(u.numpy(), x)
    with pytest.raises(BufferError, match="another device"):
        t.__dlpack__(dl_device=(1, 0))


# ---- embedding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [37, 64])
def test_embedding_forward(rng, dtype, C):
    B, T, V, maxT = 3, 17, 101, 20
    idx = rng.integers(0, V, size=(B, T)).astype(np.int32)
    wte, wpe = rounded(rng.randn(V, C), dtype), rounded(rng.randn(maxT, C), dtype)
    out = ops.embedding_forward(dev(idx), dev(wte, dtype), dev(wpe, dtype))
    check(host(out), ref.embedding_forward(idx, wte, wpe), TOL[dtype], "embedding out", rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [37, 64])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_embedding_backward(rng, dtype, C, idx_dtype):
    B, T, V, maxT = 4, 53, 97, 60
    idx = rng.integers(0, V, size=(B, T))
    idx[rng.random((B, T)) < 0.5] = 7  # one token > 64 times: the frequent-token path
    idx[0, :3] = 11                    # and a small repeated bucket
    idx = idx.astype(idx_dtype)
    dout = rounded(rng.randn(B, T, C), dtype)
    dwte0, dwpe0 = rounded(rng.randn(V, C), dtype), rounded(rng.randn(maxT, C), dtype)
    dwte, dwpe = dev(dwte0, dtype), dev(dwpe0, dtype)
    ops.embedding_backward(dev(dout, dtype), dev(idx), dwte, dwpe)
    gte, gpe = ref.embedding_backward(dout, idx, V, maxT)
    check(host(dwte), dwte0 + gte, TOL[dtype], "dwte", rng)
    check(host(dwpe), dwpe0 + gpe, TOL[dtype], "dwpe", rng)
    # deterministic: the same inputs give the same bits
    again = dev(dwte0, dtype)
    ops.embedding_backward(dev(dout, dtype), dev(idx), again, dev(dwpe0, dtype))
    np.testing.assert_array_equal(again.numpy(), dwte.numpy())


# ---- layernorm ---------------------------------------------------------------------------------

LN_SHAPES = [(3, 7, 8), (5, 37), (2, 9, 768), (4, 2304), (3, 1600)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layernorm_forward(rng, dtype, shape):
    C = shape[-1]
    x = rounded(rng.randn(*shape) * 2 + 0.5, dtype)
    w, b = rounded(rng.randn(C), dtype), rounded(rng.randn(C), dtype)
    out, mean, rstd = ops.layernorm_forward(dev(x, dtype), dev(w, dtype), dev(b, dtype))
    ro, rm, rr = ref.layernorm_forward(x, w, b)
    check(host(out), ro, TOL[dtype], "out", rng)
    check(host(mean), rm, 1e-5, "mean", rng)
    check(host(rstd), rr, 1e-5, "rstd", rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_residual_layernorm_forward(rng, dtype, shape):
    C = shape[-1]
    x, r = rounded(rng.randn(*shape), dtype), rounded(rng.randn(*shape), dtype)
    w, b = rounded(rng.randn(C), dtype), rounded(rng.randn(C), dtype)
    s, out, mean, rstd = ops.residual_layernorm_forward(dev(x, dtype), dev(r, dtype),
                                                        dev(w, dtype), dev(b, dtype))
    rs, ro, rm, rr = ref.residual_layernorm_forward(x, r, w, b)
    check(host(s), rs, TOL[dtype] / 4, "sum", rng)
    # the kernel normalises the stored (rounded) sum, as backward will see it
    ro2, rm2, rr2 = ref.layernorm_forward(host(s), w, b)
    check(host(out), ro2, TOL[dtype], "out", rng)
    check(host(mean), rm2, 1e-5, "mean", rng)
    check(host(rstd), rr2, 1e-5, "rstd", rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_backward(rng, dtype, shape, with_residual):
    C = shape[-1]
    x = rounded(rng.randn(*shape), dtype)
    w, b = rounded(rng.randn(C), dtype), rounded(rng.randn(C), dtype)
    dout = rounded(rng.randn(*shape), dtype)
    dres = rounded(rng.randn(*shape), dtype) if with_residual else None
    _, mean, rstd = ops.layernorm_forward(dev(x, dtype), dev(w, dtype), dev(b, dtype))
    dw0, db0 = rng.randn(C), rng.randn(C)
    dw, db = dev(dw0), dev(db0)
    dx = ops.layernorm_backward(dev(dout, dtype), dev(x, dtype), mean, rstd,
                                dresidual=None if dres is None else dev(dres, dtype),
                                weight=dev(w, dtype), dweight=dw, dbias=db)
    rdx, rdw, rdb = ref.layernorm_backward(dout, x, host(mean), host(rstd), dresidual=dres, weight=w)
    check(host(dx), rdx, TOL[dtype], "dx", rng)
    check(host(dw), dw0 + rdw, TOL[dtype] if dtype == "bfloat16" else 2e-5, "dweight", rng)
    check(host(db), db0 + rdb, TOL[dtype] if dtype == "bfloat16" else 2e-5, "dbias", rng)


# ---- linear ------------------------------------------------------------------------------------

# (rows, K, M): tails of every tile, misaligned K (element-wise loads), aligned shapes
# (cp.async), and one shape with enough 128x128 tiles to take the big-tile kernel. Up to 32
# rows take the few-rows (decode) kernel: 1, 2, 3, 5, 8, 13, 32 rows cover its 1/2/4/8/16/32-row
# variants, with vector loads (K % 8 == 0) and without; 33 rows is the first tile-kernel size.
LINEAR_SHAPES = [(1, 8, 8), (5, 37, 29), (130, 64, 72), (67, 200, 136), (1536, 96, 1536),
                 (1, 768, 2304), (2, 200, 33), (3, 37, 70), (8, 1024, 129), (13, 64, 40),
                 (32, 768, 200), (33, 64, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward(rng, dtype, shape, gelu, bias):
    N, K, M = shape
    x = rounded(rng.randn(N, K), dtype)
    w = rounded(rng.randn(M, K, scale=1 / math.sqrt(K)), dtype)
    b = rounded(rng.randn(M), dtype) if bias else None
    out, pre = ops.linear_forward(dev(x, dtype), dev(w, dtype), None if b is None else dev(b, dtype),
                                  gelu=gelu)
    ro, rp = ref.linear_forward(x, w, b, gelu=gelu)
    check(host(out), ro, TOL[dtype], "out", rng)
    if gelu:
        check(host(pre), rp, TOL[dtype], "pre", rng)
    else:
        assert pre is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_backward(rng, dtype, shape, gelu, bias):
    N, K, M = shape
    x = rounded(rng.randn(N, K), dtype)
    w = rounded(rng.randn(M, K, scale=1 / math.sqrt(K)), dtype)
    dout = rounded(rng.randn(N, M), dtype)
    pre = rounded(rng.randn(N, M), dtype) if gelu else None
    dw0 = rng.randn(M, K)
    db0 = rng.randn(M) if bias else None
    dw = dev(dw0)
    db = dev(db0) if bias else None
    dx = ops.linear_backward(dev(dout, dtype), dev(x, dtype),
                             pre=None if pre is None else dev(pre, dtype), weight=dev(w, dtype),
                             dweight=dw, dbias=db)
    rdx, rdw, rdb = ref.linear_backward(dout, x, pre=pre, weight=w, has_bias=bias)
    check(host(dx), rdx, TOL[dtype], "dx", rng)
    check(host(dw), dw0 + rdw, TOL[dtype], "dweight", rng)
    if bias:
        check(host(db), db0 + rdb, TOL[dtype], "dbias", rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_backward_without_dx(rng, dtype):
    N, K, M = 33, 40, 24
    x, w, dout = (rounded(rng.randn(*s), dtype) for s in [(N, K), (M, K), (N, M)])
    dw = dev(np.zeros((M, K), np.float32))
    assert ops.linear_backward(dev(dout, dtype), dev(x, dtype), weight=dev(w, dtype),
                               need_dx=False, dweight=dw) is None
    check(host(dw), ref.linear_backward(dout, x, weight=w, has_bias=False)[1], TOL[dtype],
          "dweight", rng)


# ---- attention ---------------------------------------------------------------------------------

# (B, T, H, D): the tensor-core kernels take bf16 with D = 64 or 128; everything else (and all
# float32) takes the SIMT kernels. T values leave partial tiles of 16, 32 and 64.
ATTN_SHAPES = [(2, 1, 2, 16), (2, 37, 3, 16), (1, 130, 2, 64), (2, 70, 1, 128), (1, 65, 2, 24)]
WINDOWS = [None, 1, 5, 64]


def _attn_tol(dtype, backward=False):
    if dtype == "float32":
        return 2e-5 if backward else 1e-5
    return 2e-2 if backward else 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_attention_forward(rng, dtype, shape, window):
    B, T, H, D = shape
    qkv = rounded(rng.randn(B, T, 3 * H * D), dtype)
    out, lse = ops.attention_forward(dev(qkv, dtype), H, window=window)
    ro, rl = ref.attention_forward(qkv, H, window=window)
    check(host(out), ro, _attn_tol(dtype), "out", rng)
    check(host(lse), rl, 1e-5 if dtype == "float32" else 1e-3, "lse", rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_attention_backward(rng, dtype, shape, window):
    B, T, H, D = shape
    qkv = rounded(rng.randn(B, T, 3 * H * D), dtype)
    dout = rounded(rng.randn(B, T, H * D), dtype)
    q = dev(qkv, dtype)
    out, lse = ops.attention_forward(q, H, window=window)
    dqkv = ops.attention_backward(dev(dout, dtype), q, out, lse, H, window=window)
    # reference backward from the GPU's own out and lse (rounded like the kernel saw them)
    rdqkv = ref.attention_backward(dout, qkv, host(out), host(lse), H, window=window)
    check(host(dqkv), rdqkv, _attn_tol(dtype, backward=True), "dqkv", rng)
    # deterministic
    again = ops.attention_backward(dev(dout, dtype), q, out, lse, H, window=window)
    np.testing.assert_array_equal(again.numpy(), dqkv.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
def test_attention_kvcache(rng, dtype, window):
    B, H, D, Tmax = 2, 3, 16, 40
    C = H * D
    prompt = rounded(rng.randn(B, 11, 3 * C), dtype)
    kc = gptcore.zeros([B, H, Tmax, D], dtype=dtype, device="cuda")
    vc = gptcore.zeros([B, H, Tmax, D], dtype=dtype, device="cuda")
    rk, rv = np.zeros((B, H, Tmax, D)), np.zeros((B, H, Tmax, D))
    out = ops.attention_kvcache(dev(prompt, dtype), kc, vc, 0, H, window=window)
    ro, rk, rv = ref.attention_kvcache(prompt, rk, rv, 0, H, window=window)
    check(host(out), ro, TOL[dtype], "prefill out", rng)
    pos = 11
    for step in range(3):  # then one token at a time
        tok = rounded(rng.randn(B, 1, 3 * C), dtype)
        out = ops.attention_kvcache(dev(tok, dtype), kc, vc, pos, H, window=window)
        ro, rk, rv = ref.attention_kvcache(tok, rk, rv, pos, H, window=window)
        check(host(out), ro, TOL[dtype], f"decode out step {step}", rng)
        pos += 1
    check(host(kc)[:, :, :pos], rk[:, :, :pos], 1e-7, "k_cache", rng)
    check(host(vc)[:, :, :pos], rv[:, :, :pos], 1e-7, "v_cache", rng)


# ---- cross-entropy -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 130, 136), (2, 5, 3, 37, 37), (4, 50257, 50304)])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy(rng, dtype, shape, inplace):
    *lead, V, Vp = shape
    logits = rounded(rng.randn(*lead, Vp, scale=3.0), dtype)
    targets = rng.integers(0, V, size=tuple(lead)).astype(np.int64)
    targets.reshape(-1)[::4] = -1  # ignored positions
    scale = 1.0 / 7.0
    lg = dev(logits, dtype)
    losses, dlogits = ops.cross_entropy_forward_backward(lg, dev(targets), vocab_size=V,
                                                         ignore_index=-1, grad_scale=scale,
                                                         inplace=inplace)
    rl = ref.cross_entropy_forward(logits, targets, vocab_size=V, ignore_index=-1)
    rd = ref.cross_entropy_backward(logits, targets, vocab_size=V, ignore_index=-1,
                                    grad_scale=scale)
    check(host(losses), rl, 1e-5, "losses", rng)
    check(host(dlogits), rd, TOL[dtype], "dlogits", rng)
    if inplace:
        assert dlogits.data_ptr() == lg.data_ptr()
    # forward only
    l2 = ops.cross_entropy_forward(dev(logits, dtype), dev(targets.astype(np.int32)), V)
    check(host(l2), rl, 1e-5, "losses (forward only)", rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_with_banned_logits(rng, dtype):
    """-inf logits take no probability; a thread whose first values are all -inf must not turn
    the row's sum into NaN (-inf - -inf)."""
    N, V = 4, 5000
    logits = rounded(rng.randn(N, V, scale=2.0), dtype)
    logits[0, :4096] = -np.inf
    logits[1, rng.choice(V, 2500, replace=False)] = -np.inf
    targets = np.array([4500, 0, 3, 1])
    logits[1, 0] = 0.5
    losses, dlogits = ops.cross_entropy_forward_backward(dev(logits, dtype), dev(targets),
                                                         grad_scale=1.0)
    check(host(losses), ref.cross_entropy_forward(logits, targets), 1e-5 if dtype == "float32" else 1e-2,
          "losses with -inf", rng)
    check(host(dlogits), ref.cross_entropy_backward(logits, targets, grad_scale=1.0), TOL[dtype],
          "dlogits with -inf", rng)
    assert np.isfinite(host(dlogits)).all()


# ---- optimiser ---------------------------------------------------------------------------------

ADAM_SIZES = [(1,), (37,), (16, 33), (40001,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def test_adamw_float32(rng):
    params = [rng.randn(*s) for s in ADAM_SIZES]
    grads = [rng.randn(*s) for s in ADAM_SIZES]
    ms = [rng.randn(*s, scale=0.1) for s in ADAM_SIZES]
    vs = [np.abs(rng.randn(*s, scale=0.1)) for s in ADAM_SIZES]
    decay = [True, False, True, False]
    P, G, M, V = ([dev(a) for a in lst] for lst in (params, grads, ms, vs))
    ops.adamw_step(P, G, M, V, step=3, decay=decay, grad_scale=0.5, **HYPER)
    for i in range(len(params)):
        rp, rm, rv = ref.adamw_step(params[i], grads[i], ms[i], vs[i], step=3, decay=decay[i],
                                    grad_scale=0.5, **HYPER)
        check(host(P[i]), rp, 1e-6, f"param {i}", rng)
        check(host(M[i]), rm, 1e-6, f"m {i}", rng)
        check(host(V[i]), rv, 1e-6, f"v {i}", rng)


@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_adamw_bf16_master(rng, grad_dtype):
    master0 = [rng.randn(*s) for s in ADAM_SIZES]
    grads = [rounded(rng.randn(*s), grad_dtype) for s in ADAM_SIZES]
    ms = [np.zeros(s) for s in ADAM_SIZES]
    vs = [np.zeros(s) for s in ADAM_SIZES]
    P = [dev(a, "bfloat16") for a in master0]
    W = [dev(a) for a in master0]
    G = [dev(g, grad_dtype) for g in grads]
    M, V = [dev(a) for a in ms], [dev(a) for a in vs]
    ops.adamw_step(P, G, M, V, step=1, master=W, seed=1234, **HYPER)
    for i in range(len(master0)):
        rp, rm, rv = ref.adamw_step(master0[i], grads[i], ms[i], vs[i], step=1, **HYPER)
        check(host(W[i]), rp, 1e-6, f"master {i}", rng)
        check(host(M[i]), rm, 1e-6, f"m {i}", rng)
        # the bf16 parameter is the master rounded up or down: within one bf16 ulp
        w, p = host(W[i]), host(P[i])
        ulp = np.exp2(np.floor(np.log2(np.abs(w))) - 7)
        assert np.all(np.abs(p - w) <= ulp * (1 + 1e-6)), f"param {i} not a rounding of master"
    # reproducible with the same seed
    P2 = [dev(a, "bfloat16") for a in master0]
    W2 = [dev(a) for a in master0]
    ops.adamw_step(P2, [dev(g, grad_dtype) for g in grads], [dev(a) for a in ms],
                   [dev(a) for a in vs], step=1, master=W2, seed=1234, **HYPER)
    for a, b in zip(P, P2):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_stochastic_rounding_is_unbiased(rng):
    # lr = 0 leaves the master unchanged, so the bf16 parameter is a pure rounding of it.
    n = 200_000
    w = (1.0 + rng.random(n)).astype(np.float32)  # in [1, 2): bf16 ulp 2^-7
    P, W = dev(np.zeros(n, np.float32), "bfloat16"), dev(w)
    ops.adamw_step([P], [dev(np.zeros(n, np.float32))], [dev(np.zeros(n, np.float32))],
                   [dev(np.zeros(n, np.float32))], lr=0.0, step=1, master=[W], seed=7)
    p = host(P)
    err = (p - w) / 2.0 ** -7
    assert np.all(np.abs(err) < 1.0)
    assert abs(err.mean()) < 0.01, f"mean rounding error {err.mean():.4f} ulp: biased"
    nearest = host(dev(w, "bfloat16"))
    assert (p != nearest).mean() > 0.1, "looks like round-to-nearest, not stochastic"


def test_global_norm(rng):
    arrays = [rng.randn(*s) for s in [(3,), (40001,), (17, 19), (1,)]]
    tensors = [dev(arrays[0]), dev(arrays[1], "bfloat16"), dev(arrays[2]), dev(arrays[3], "bfloat16")]
    want = ref.global_norm([host(t) for t in tensors])
    got = ops.global_norm(tensors)
    assert abs(got - want) <= 1e-6 * want, f"{got} vs {want} [{rng}]"
    assert ops.global_norm(tensors) == got  # deterministic


# ---- training ----------------------------------------------------------------------------------


def test_gpu_training_tracks_cpu(rng):
    GPT = getattr(gptcore, "GPT", None)
    AdamW = getattr(gptcore, "AdamW", None)
    GPTConfig = getattr(gptcore, "GPTConfig", None)
    if GPT is None or AdamW is None or GPTConfig is None:
        pytest.skip("gptcore.GPT / AdamW not available in this build")
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=300)
    data = np.random.default_rng(0).integers(0, 300, size=(8, 65))
    x, y = data[:, :-1], data[:, 1:]

    def run(device, dtype, steps=30):
        model = GPT(cfg, device=device, dtype=dtype, seed=0)
        opt = AdamW(model, lr=3e-3, weight_decay=0.0)
        losses = []
        for _ in range(steps):
            model.zero_grad()
            losses.append(model.forward(x, y))
            model.backward()
            opt.step(grad_clip=1.0)
        return np.array(losses)

    cpu = run("cpu", "float32")
    gpu32 = run("cuda", "float32")
    gpu16 = run("cuda", "bfloat16")
    assert np.all(np.isfinite(gpu16)) and np.all(np.isfinite(gpu32))
    # fp32 on the GPU follows the CPU run closely; bf16 mixed precision tracks it
    assert np.max(np.abs(gpu32 - cpu)) < 1e-2, f"fp32 GPU {gpu32} vs CPU {cpu}"
    assert np.max(np.abs(gpu16 - cpu)) < 0.15, f"bf16 GPU {gpu16} vs CPU {cpu}"
    assert gpu16[-1] < gpu16[0] - 1.0, "bf16 training did not reduce the loss"
