"""Every op, forward and backward, on every backend against the float64 NumPy reference
(gptcore.reference): the CPU in float32, CUDA in float32 and bfloat16 (``gpu``-marked: skipped
where ``gptcore.cuda.is_available()`` is False, conftest.py).

Inputs are fresh random arrays each run (the seed is printed and named in every failure message:
replay with GPTCORE_TEST_SEED=<seed>); on bfloat16 the reference is fed the same bf16-rounded
inputs the kernel sees. Sizes are chosen to hit the edges: T = 1, T not a multiple of any tile
(37, 65, 129), C = 8 and 768, heads of 16, 24, 64 and 128 dims, GPT-2's vocabulary 50257 padded
to 50304, attention windows 1, 3 and >= T, rows and columns that leave tails of every CUDA tile
and vector width.

Agreement is the relative error ||out - ref|| / ||ref|| (tests/helpers.py):
  * float32: 1e-5. float32 kernels land near 1e-7; the bound leaves room for the longest
    float32 reductions (768-wide dot products, 50257-wide softmax sums). The CUDA kernels compute
    in fp32 arithmetic (SIMT GEMM and attention, not TF32).
  * bfloat16: 1e-2; attention backward 2e-2, because P and dS are rounded to bf16 before the
    tensor-core products (as in FlashAttention).
On CUDA every test runs with GPTCORE_POISON_ALLOC=1, so every buffer the allocator hands out
starts as NaN: an output element a kernel forgets to write fails the finiteness check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref
from tests.helpers import BACKENDS, FP32_BACKENDS, check, f64, host, to_cuda


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Read by the CUDA allocator on every allocation: new and reused blocks start as NaN.
    monkeypatch.setenv("GPTCORE_POISON_ALLOC", "1")


backends = pytest.mark.parametrize("be", BACKENDS)
fp32_backends = pytest.mark.parametrize("be", FP32_BACKENDS)


# ---- embedding ------------------------------------------------------------------------------

EMB_CASES = [
    # B, T, C, V, maxT, idx_dtype, frequent
    (1, 1, 8, 50257, 1, np.int32, False),
    (2, 37, 8, 11, 40, np.int64, False),      # tiny vocabulary: many repeated ids in the scatter-add
    (3, 65, 768, 300, 128, np.int32, False),
    (3, 17, 37, 101, 20, np.int32, False),    # C not a multiple of the vector width
    (3, 17, 64, 101, 20, np.int32, False),
    # one token > 64 times (the CUDA backward's frequent-token path) and a small repeated bucket
    (4, 53, 37, 97, 60, np.int32, True),
    (4, 53, 37, 97, 60, np.int64, True),
    (4, 53, 64, 97, 60, np.int32, True),
    (4, 53, 64, 97, 60, np.int64, True),
]


@backends
@pytest.mark.parametrize("B, T, C, V, maxT, idx_dtype, frequent", EMB_CASES)
def test_embedding(rng, be, B, T, C, V, maxT, idx_dtype, frequent):
    idx = rng.integers(0, V, size=(B, T))
    idx.flat[0] = V - 1  # the last row of wte is reachable
    if frequent:
        idx[rng.random((B, T)) < 0.5] = 7
        idx[0, :3] = 11
    idx = idx.astype(idx_dtype)
    wte, wpe = be.rounded(rng.randn(V, C)), be.rounded(rng.randn(maxT, C))
    out = ops.embedding_forward(be.put(idx), be.put(wte), be.put(wpe))
    assert out.shape == (B, T, C) and out.dtype == be.dtype
    check("embedding out", host(out), ref.embedding_forward(idx, wte, wpe), rng, be.tol)

    dout = be.rounded(rng.randn(B, T, C))
    dwte_ref, dwpe_ref = ref.embedding_backward(dout, idx, V, maxT)
    dwte0, dwpe0 = be.rounded(rng.randn(V, C)), be.rounded(rng.randn(maxT, C))  # gradients accumulate into these
    dwte, dwpe = be.put(dwte0), be.put(dwpe0)
    assert ops.embedding_backward(be.put(dout), be.put(idx), dwte, dwpe) is None
    check("dwte", host(dwte), dwte0 + dwte_ref, rng, be.tol)
    check("dwpe", host(dwpe), dwpe0 + dwpe_ref, rng, be.tol)
    # deterministic: the same inputs give the same bits
    again = be.put(dwte0)
    ops.embedding_backward(be.put(dout), be.put(idx), again, be.put(dwpe0))
    np.testing.assert_array_equal(host(again), host(dwte))
    ops.embedding_backward(be.put(dout), be.put(idx), dwte, dwpe)  # a second micro-batch: 2x
    check("dwte (accumulated twice)", host(dwte), dwte0 + 2 * dwte_ref, rng, be.tol)
    check("dwpe (accumulated twice)", host(dwpe), dwpe0 + 2 * dwpe_ref, rng, be.tol)


@backends
def test_embedding_backward_deterministic(rng, be):
    B, T, C, V = 4, 33, 96, 5
    idx = rng.integers(0, V, size=(B, T)).astype(np.int32)
    dout = be.put(rng.randn(B, T, C))
    runs = []
    for _ in range(3):
        dwte, dwpe = be.put(np.zeros((V, C))), be.put(np.zeros((T, C)))
        ops.embedding_backward(dout, be.put(idx), dwte, dwpe)
        runs.append((host(dwte), host(dwpe)))
    for dwte, dwpe in runs[1:]:
        np.testing.assert_array_equal(dwte, runs[0][0])
        np.testing.assert_array_equal(dwpe, runs[0][1])


# ---- layernorm ------------------------------------------------------------------------------

LN_SHAPES = [(1, 8), (37, 8), (2, 65, 768), (129, 768),
             (3, 7, 8), (5, 37), (2, 9, 768), (4, 2304), (3, 1600)]


def _ln_param_tol(be):
    """Tolerance of LayerNorm's float32 dweight/dbias (accumulated across rows by CUDA in
    a different order than the reference)."""
    return be.tol if be.bf16 else (2e-5 if be.cuda else 1e-5)


@backends
@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("with_dresidual", [False, True])
def test_layernorm(rng, be, shape, with_dresidual):
    C = shape[-1]
    x = be.rounded(rng.randn(*shape) * 2 + 3)  # an offset mean: the variance must not cancel badly
    w, b = be.rounded(rng.randn(C)), be.rounded(rng.randn(C))
    out, mean, rstd = ops.layernorm_forward(be.put(x), be.put(w), be.put(b), eps=1e-5)
    out_r, mean_r, rstd_r = ref.layernorm_forward(x, w, b, 1e-5)
    assert out.shape == shape and mean.shape == shape[:-1] and rstd.shape == shape[:-1]
    assert mean.dtype == "float32" and rstd.dtype == "float32"  # statistics stay float32
    check("layernorm out", host(out), out_r, rng, be.tol)
    check("layernorm mean", host(mean), mean_r, rng)
    check("layernorm rstd", host(rstd), rstd_r, rng)

    dout = be.rounded(rng.randn(*shape))
    dres = be.rounded(rng.randn(*shape)) if with_dresidual else None
    dx_r, dw_r, db_r = ref.layernorm_backward(dout, x, mean_r, rstd_r, dresidual=dres, weight=w)
    dw0, db0 = rng.randn(C), rng.randn(C)
    dw, db = be.put(dw0, "float32"), be.put(db0, "float32")

    def backward():
        return ops.layernorm_backward(be.put(dout), be.put(x), mean, rstd,
                                      dresidual=None if dres is None else be.put(dres),
                                      weight=be.put(w), dweight=dw, dbias=db)

    dx = backward()
    tol = _ln_param_tol(be)
    check("layernorm dx", host(dx), dx_r, rng, be.tol)
    check("layernorm dweight", host(dw), f64(dw0) + dw_r, rng, tol)
    check("layernorm dbias", host(db), f64(db0) + db_r, rng, tol)
    dx2 = backward()
    np.testing.assert_array_equal(host(dx2), host(dx))  # activations: overwritten
    check("layernorm dweight (accumulated twice)", host(dw), f64(dw0) + 2 * dw_r, rng, tol)
    check("layernorm dbias (accumulated twice)", host(db), f64(db0) + 2 * db_r, rng, tol)


@backends
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_residual_layernorm(rng, be, shape):
    C = shape[-1]
    x, r = be.rounded(rng.randn(*shape)), be.rounded(rng.randn(*shape))
    w, b = be.rounded(rng.randn(C)), be.rounded(rng.randn(C))
    s, out, mean, rstd = ops.residual_layernorm_forward(be.put(x), be.put(r), be.put(w), be.put(b),
                                                        eps=1e-5)
    s_r = ref.residual_layernorm_forward(x, r, w, b, 1e-5)[0]
    check("residual sum", host(s), s_r, rng, be.tol / 4)
    # the kernel normalises the stored (rounded) sum, as backward will see it
    out_r, mean_r, rstd_r = ref.layernorm_forward(host(s), w, b, 1e-5)
    check("residual_layernorm out", host(out), out_r, rng, be.tol)
    check("residual_layernorm mean", host(mean), mean_r, rng)
    check("residual_layernorm rstd", host(rstd), rstd_r, rng)

    dout, dsum = be.rounded(rng.randn(*shape)), be.rounded(rng.randn(*shape))
    dsum_r, dw_r, db_r = ref.residual_layernorm_backward(dout, host(s), mean_r, rstd_r,
                                                         dsum=dsum, weight=w)
    dw, db = be.put(np.zeros(C), "float32"), be.put(np.zeros(C), "float32")
    dtotal = ops.residual_layernorm_backward(be.put(dout), s, mean, rstd, dsum=be.put(dsum),
                                             weight=be.put(w), dweight=dw, dbias=db)
    check("residual_layernorm dsum", host(dtotal), dsum_r, rng, be.tol)
    check("residual_layernorm dweight", host(dw), dw_r, rng, _ln_param_tol(be))
    check("residual_layernorm dbias", host(db), db_r, rng, _ln_param_tol(be))


@backends
def test_layernorm_constant_row(rng, be):
    # A constant row has zero variance: rstd = 1/sqrt(eps) and the output is the bias.
    C = 64
    x = np.full((3, C), 2.5)
    w, b = be.rounded(rng.randn(C)), be.rounded(rng.randn(C))
    out, mean, rstd = ops.layernorm_forward(be.put(x), be.put(w), be.put(b), eps=1e-5)
    out_r, mean_r, rstd_r = ref.layernorm_forward(x, w, b, 1e-5)
    check("constant-row out", host(out), out_r, rng, be.tol)
    check("constant-row rstd", host(rstd), rstd_r, rng)


# ---- linear ---------------------------------------------------------------------------------

# (x shape, M). Up to 32 rows take CUDA's few-rows (decode) kernel: 1, 2, 3, 5, 8, 13, 32 rows
# cover its 1/2/4/8/16/32-row variants, with vector loads (K % 8 == 0) and without; 33 rows is
# the first tile-kernel size. Tails of every tile, misaligned K (element-wise loads), aligned
# shapes (cp.async), and one shape with enough 128x128 tiles to take the big-tile kernel.
LINEAR_CASES = [
    ((1, 8), 8),
    ((37, 768), 96),
    ((2, 65, 96), 768),
    ((129, 64), 200),
    ((3, 67, 48), 40),  # more rows than output features: the CPU forward splits rows across threads
    ((5, 37), 29), ((130, 64), 72), ((67, 200), 136), ((1536, 96), 1536), ((1, 768), 2304),
    ((2, 200), 33), ((3, 37), 70), ((8, 1024), 129), ((13, 64), 40), ((32, 768), 200),
    ((33, 64), 40), ((33, 40), 24),
]


@backends
@pytest.mark.parametrize("x_shape, M", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear(rng, be, x_shape, M, bias, gelu):
    K = x_shape[-1]
    x, w = be.rounded(rng.randn(*x_shape)), be.rounded(rng.randn(M, K, scale=K ** -0.5))
    b = be.rounded(rng.randn(M)) if bias else None
    out, pre = ops.linear_forward(be.put(x), be.put(w), None if b is None else be.put(b), gelu=gelu)
    out_r, pre_r = ref.linear_forward(x, w, b, gelu=gelu)
    assert out.shape == x_shape[:-1] + (M,)
    check("linear out", host(out), out_r, rng, be.tol)
    if gelu:
        check("linear pre", host(pre), pre_r, rng, be.tol)
    else:
        assert pre is None

    dout = be.rounded(rng.randn(*out.shape))
    # the reference's backward from the pre-activation the kernel stored (bf16-rounded there)
    dx_r, dw_r, db_r = ref.linear_backward(dout, x, pre=host(pre) if gelu else None, weight=w,
                                           has_bias=bias)
    dw0 = rng.randn(M, K)
    db0 = rng.randn(M) if bias else None
    dw = be.put(dw0, "float32")
    db = be.put(db0, "float32") if bias else None
    dx = ops.linear_backward(be.put(dout), be.put(x), pre=pre if gelu else None, weight=be.put(w),
                             dweight=dw, dbias=db)
    check("linear dx", host(dx), dx_r, rng, be.tol)
    check("linear dweight", host(dw), f64(dw0) + dw_r, rng, be.tol)
    if bias:
        check("linear dbias", host(db), f64(db0) + db_r, rng, be.tol)
    # need_dx=False: no dx, parameter gradients still accumulate (2x now)
    assert ops.linear_backward(be.put(dout), be.put(x), pre=pre if gelu else None,
                               weight=be.put(w), need_dx=False, dweight=dw, dbias=db) is None
    check("linear dweight (accumulated twice)", host(dw), f64(dw0) + 2 * dw_r, rng, be.tol)
    if bias:
        check("linear dbias (accumulated twice)", host(db), f64(db0) + 2 * db_r, rng, be.tol)


@backends
def test_gelu_epilogue_against_reference_gelu(rng, be):
    # The fused epilogue is GELU(pre) and its backward GELU'(pre) * dout: compare with the
    # reference's standalone gelu over a wide input range (tails of tanh included).
    x = be.rounded(rng.randn(64, 16) * 4)
    eye = np.eye(16)
    out, pre = ops.linear_forward(be.put(x), be.put(eye), None, gelu=True)
    check("gelu", host(out), ref.gelu_forward(x), rng, be.tol)
    dout = be.rounded(rng.randn(64, 16))
    dw = be.put(np.zeros((16, 16)), "float32")
    dx = ops.linear_backward(be.put(dout), be.put(x), pre=pre, weight=be.put(eye), dweight=dw)
    check("gelu backward", host(dx), ref.gelu_backward(dout, host(pre)), rng, be.tol)


# ---- attention ------------------------------------------------------------------------------

ATTN_CASES = [
    # B, T, n_head, D, window
    (1, 1, 2, 16, None),
    (2, 37, 3, 16, None),
    (1, 65, 2, 64, None),
    (2, 129, 2, 64, None),
    (1, 65, 4, 16, 1),
    (2, 37, 2, 64, 3),
    (1, 129, 2, 16, 50),
    (1, 37, 2, 16, 37),   # window == T: the same as dense
    (1, 37, 2, 64, 100),  # window > T
    (1, 1, 1, 16, 3),
    (2, 37, 1, 8, None),  # C = 8; head sizes that are not a multiple of the SIMD width:
    (1, 65, 3, 24, 5),    # the kernel's leftover-column path
    (1, 130, 1, 128, None),
] + [
    # CUDA's tensor-core kernels take bf16 with D = 64 or 128, everything else (and all float32)
    # the SIMT kernels; these T leave partial tiles of 16, 32 and 64
    (*shape, window)
    for shape in [(2, 1, 2, 16), (2, 37, 3, 16), (1, 130, 2, 64), (2, 70, 1, 128), (1, 65, 2, 24)]
    for window in [None, 1, 5, 64]
]


def _attn_tol(be, backward=False):
    if be.bf16:
        return 2e-2 if backward else 1e-2
    return 2e-5 if backward and be.cuda else 1e-5


@backends
@pytest.mark.parametrize("B, T, H, D, window", ATTN_CASES)
def test_attention(rng, be, B, T, H, D, window):
    C = H * D
    qkv_h = be.rounded(rng.randn(B, T, 3 * C))
    qkv = be.put(qkv_h)
    out, lse = ops.attention_forward(qkv, H, window=window)
    out_r, lse_r = ref.attention_forward(qkv_h, H, window=window)
    assert out.shape == (B, T, C) and lse.shape == (B, H, T) and lse.dtype == "float32"
    check("attention out", host(out), out_r, rng, _attn_tol(be))
    # floor: with T = 1 (or a window of 1) an lse is a single score, which may be ~0
    check("attention lse", host(lse), lse_r, rng, 1e-3 if be.bf16 else 1e-5,
          floor=math.sqrt(lse_r.size))
    dout_h = be.rounded(rng.randn(B, T, C))
    dqkv = ops.attention_backward(be.put(dout_h), qkv, out, lse, H, window=window)
    # the reference's backward from the kernel's own out and lse (rounded as the kernel saw them)
    dqkv_r = ref.attention_backward(dout_h, qkv_h, host(out), host(lse), H, window=window)
    assert dqkv.shape == qkv.shape
    tol = _attn_tol(be, backward=True)
    check("attention dqkv", host(dqkv), dqkv_r, rng, tol)
    # Each third on its own too. With window=1 (or T=1) each query sees one key, the softmax
    # is constant and dq = dk = 0 exactly; float32 leaves ~1e-7 * |dout| |v| of rounding from
    # dP - rowsum(dO * O) there, so those parts are measured against (a tenth of) the whole
    # gradient's norm instead of their own.
    floor = 0.1 * np.linalg.norm(dqkv_r)
    for part, got, want in zip("qkv", np.split(host(dqkv), 3, axis=-1), np.split(dqkv_r, 3, axis=-1)):
        check(f"attention d{part}", got, want, rng, tol, floor=floor)
    # deterministic
    again = ops.attention_backward(be.put(dout_h), qkv, out, lse, H, window=window)
    np.testing.assert_array_equal(host(again), host(dqkv))


@backends
def test_attention_window_one_is_identity_on_v(rng, be):
    B, T, H, D = 2, 19, 2, 16
    C = H * D
    qkv = be.rounded(rng.randn(B, T, 3 * C))
    out, _ = ops.attention_forward(be.put(qkv), H, window=1)
    np.testing.assert_allclose(host(out), qkv[..., 2 * C:], rtol=1e-6, atol=1e-6)


@fp32_backends
def test_attention_large_scores(rng, be):
    # Peaked softmax (scores of magnitude ~100): the online softmax must stay finite and exact.
    B, T, H, D = 1, 65, 2, 64
    qkv = rng.randn(B, T, 3 * H * D) * 3.5
    out, lse = ops.attention_forward(be.put(qkv), H)
    out_r, lse_r = ref.attention_forward(f64(qkv), H)
    check("attention out (peaked)", host(out), out_r, rng)
    check("attention lse (peaked)", host(lse), lse_r, rng)
    dout = rng.randn(B, T, H * D)
    dqkv = ops.attention_backward(be.put(dout), be.put(qkv), out, lse, H)
    # Scores are ~1e2 here, so float32 rounding of each score (~1e-5 absolute) moves the
    # probabilities by ~1e-5 relative: a looser bound than the default.
    check("attention dqkv (peaked)", host(dqkv),
          ref.attention_backward(f64(dout), f64(qkv), out_r, lse_r, H), rng, tol=1e-4)


# ---- cross-entropy --------------------------------------------------------------------------

CE_CASES = [
    # leading shape, Vp, V
    ((1,), 8, 8),
    ((5,), 65, 50),
    ((37,), 50304, 50257),  # GPT-2: real vocabulary 50257, padded to a multiple of 128
    ((13,), 136, 130),
    ((2, 5, 3), 37, 37),
    ((4,), 50304, 50257),
]


def _targets(rng, N, V, dtype, n_ignored):
    t = rng.integers(0, V, size=N).astype(dtype)
    t[0] = V - 1
    if n_ignored:
        t[rng.choice(np.arange(1, N), size=n_ignored, replace=False)] = -1
    return t


@backends
@pytest.mark.parametrize("lead, Vp, V", CE_CASES)
@pytest.mark.parametrize("tgt_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy(rng, be, lead, Vp, V, tgt_dtype, inplace):
    N = int(np.prod(lead))
    logits = be.rounded(rng.randn(*lead, Vp, scale=3.0))
    targets = _targets(rng, N, V, tgt_dtype, min(N - 1, max(3, N // 4))).reshape(lead)
    vs = None if V == Vp else V
    losses = ops.cross_entropy_forward(be.put(logits), be.put(targets), vocab_size=vs)
    losses_r = ref.cross_entropy_forward(logits, targets, vocab_size=vs)
    assert losses.shape == lead and losses.dtype == "float32"
    # a loss near 0 (a dominant target logit) carries ~1e-7 |logsumexp| of rounding: losses are
    # measured against a norm of at least 1
    check("cross-entropy losses", host(losses), losses_r, rng, floor=1.0)
    assert (host(losses)[targets == -1] == 0).all()

    # default grad_scale: 1 / number of non-ignored targets (the mean loss)
    losses2, dlogits = ops.cross_entropy_forward_backward(be.put(logits), be.put(targets),
                                                          vocab_size=vs)
    check("cross-entropy losses (fused)", host(losses2), losses_r, rng, floor=1.0)
    dl_r = ref.cross_entropy_backward(logits, targets, vocab_size=vs)
    # a row whose target takes nearly all the probability has a gradient near 0, and p_t - 1
    # carries ~1e-7 of rounding: each row is measured against at least a tenth of its scale
    nvalid = int((targets != -1).sum())
    floor = 0.1 * np.sqrt(nvalid) / nvalid
    check("cross-entropy dlogits", host(dlogits), dl_r, rng, be.tol, floor=floor)
    dl = host(dlogits)
    assert (dl[..., V:] == 0).all(), f"padding columns must be zero ({rng})"
    assert (dl[targets == -1] == 0).all(), f"ignored rows must be zero ({rng})"
    if not be.bf16:  # each valid row of softmax - onehot sums to zero (a 50257-wide float32
        # softmax sums to 1 within ~1e-6, times the scale 1 / nvalid)
        np.testing.assert_allclose(dl.sum(axis=-1), 0, atol=max(1e-6, 4e-6 / nvalid))

    scale = 1.0 / 7.0
    lg = be.put(logits)
    losses3, dlogits = ops.cross_entropy_forward_backward(lg, be.put(targets), vocab_size=vs,
                                                          ignore_index=-1, grad_scale=scale,
                                                          inplace=inplace)
    dl_r = ref.cross_entropy_backward(logits, targets, vocab_size=vs, grad_scale=scale)
    check("cross-entropy losses (grad_scale)", host(losses3), losses_r, rng, floor=1.0)
    check("cross-entropy dlogits (grad_scale)", host(dlogits), dl_r, rng, be.tol,
          floor=floor * nvalid * scale)
    if inplace:
        assert be.ptr(dlogits) == be.ptr(lg), "inplace=True must write the gradient over the logits"
        check("logits buffer now holds dlogits", host(lg), dl_r, rng, be.tol,
              floor=floor * nvalid * scale)


@backends
def test_cross_entropy_batched_and_ignore_index(rng, be):
    B, T, V = 2, 37, 100
    logits = be.rounded(rng.randn(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, :5] = -100
    losses, dlogits = ops.cross_entropy_forward_backward(be.put(logits), be.put(targets),
                                                         ignore_index=-100)
    assert losses.shape == (B, T) and dlogits.shape == (B, T, V)
    flat_l, flat_t = logits.reshape(-1, V), targets.reshape(-1)
    check("ce losses (B,T)", host(losses).reshape(-1),
          ref.cross_entropy_forward(flat_l, flat_t, ignore_index=-100), rng)
    check("ce dlogits (B,T)", host(dlogits).reshape(-1, V),
          ref.cross_entropy_backward(flat_l, flat_t, ignore_index=-100), rng, be.tol)


@backends
@pytest.mark.parametrize("V, block, scattered", [(700, 512, 300), (5000, 4096, 2500)])
def test_cross_entropy_with_banned_logits(rng, be, V, block, scattered):
    """-inf logits (banned tokens) take no probability: whole 256-wide blocks of them at the
    start of a row (a thread whose first values are all -inf must not turn the row's sum into
    NaN, -inf - -inf), scattered ones, and a row where only the target is finite."""
    N = 5
    logits = be.rounded(rng.randn(N, V, scale=2.0))
    logits[0, :block] = -np.inf  # full blocks before any finite value
    logits[1, rng.choice(V, scattered, replace=False)] = -np.inf
    logits[2, :] = -np.inf
    targets = np.array([V - 100, 0, 3, 1, 2])
    logits[1, 0] = 0.5  # the target itself stays finite
    logits[2, 3] = 1.0
    losses, dlogits = ops.cross_entropy_forward_backward(be.put(logits), be.put(targets))
    check("ce losses with -inf", host(losses), ref.cross_entropy_forward(logits, targets), rng,
          be.tol)
    check("ce dlogits with -inf", host(dlogits), ref.cross_entropy_backward(logits, targets), rng,
          be.tol)
    assert np.isfinite(host(dlogits)).all()
    assert abs(float(host(losses)[2])) < 1e-6  # the only finite logit: loss 0


@backends
def test_cross_entropy_all_ignored(rng, be):
    logits = rng.randn(4, 10)
    targets = np.full(4, -1, np.int64)
    losses, dlogits = ops.cross_entropy_forward_backward(be.put(logits), be.put(targets))
    assert (host(losses) == 0).all() and (host(dlogits) == 0).all()


@pytest.mark.parametrize("as_gptcore_tensor", [False, True])
def test_cross_entropy_inplace_cpu_buffers(rng, as_gptcore_tensor):
    """In place over a host buffer: a NumPy array or a gptcore tensor."""
    N, Vp, V = 9, 50304, 50257
    logits_np = rng.randn(N, Vp, scale=2.0)
    targets = _targets(rng, N, V, np.int64, 2)
    want_l = ref.cross_entropy_forward(f64(logits_np), targets, vocab_size=V)
    want_d = ref.cross_entropy_backward(f64(logits_np), targets, vocab_size=V)
    logits = gptcore.tensor(logits_np) if as_gptcore_tensor else logits_np
    ptr = logits.data_ptr() if as_gptcore_tensor else logits_np.ctypes.data
    losses, dlogits = ops.cross_entropy_forward_backward(logits, targets, vocab_size=V, inplace=True)
    assert dlogits.data_ptr() == ptr, "inplace=True must write the gradient over the logits"
    check("ce losses (in place)", losses, want_l, rng)
    check("ce dlogits (in place)", dlogits, want_d, rng)
    check("logits buffer now holds dlogits", np.asarray(logits), want_d, rng)


# ---- AdamW and the global norm --------------------------------------------------------------

# 5000 and 40001 > the CPU kernel's parallel threshold
ADAM_SHAPES = [(37, 8), (768,), (3, 5, 7), (1,), (5000,), (37,), (16, 33), (40001,)]
ADAM_DECAY = [True, False, True, False, True, False, True, False]


@fp32_backends
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("warm", [False, True])
def test_adamw(rng, be, grad_scale, weight_decay, warm):
    """Five steps from zero moments, or one step at step 3 from random moments."""
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay)
    params = [rng.randn(*s) for s in ADAM_SHAPES]
    m0 = [rng.randn(*s, scale=0.1) if warm else np.zeros(s, np.float32) for s in ADAM_SHAPES]
    v0 = [np.abs(rng.randn(*s, scale=0.1)) if warm else np.zeros(s, np.float32) for s in ADAM_SHAPES]
    P, M, V = ([be.put(a) for a in lst] for lst in (params, m0, v0))
    state = [(f64(p), f64(m), f64(v)) for p, m, v in zip(params, m0, v0)]
    tol = 1e-6 if be.cuda else 1e-5
    for step in range(3, 4) if warm else range(1, 6):
        grads = [rng.randn(*s) for s in ADAM_SHAPES]
        ops.adamw_step(P, [be.put(g) for g in grads], M, V, step=step, decay=ADAM_DECAY,
                       grad_scale=grad_scale, **hp)
        state = [ref.adamw_step(p, f64(g), mm, vv, step=step, decay=d, grad_scale=grad_scale, **hp)
                 for (p, mm, vv), g, d in zip(state, grads, ADAM_DECAY)]
        for i, (p_r, m_r, v_r) in enumerate(state):
            check(f"adamw param[{i}] step {step}", host(P[i]), p_r, rng, tol)
            # m = beta1 m + (1 - beta1) g can cancel (a one-element tensor near 0): measured
            # against at least the size of this step's gradient term
            floor = (1 - hp["beta1"]) * grad_scale * np.linalg.norm(grads[i])
            check(f"adamw m[{i}] step {step}", host(M[i]), m_r, rng, tol, floor=floor)
            check(f"adamw v[{i}] step {step}", host(V[i]), v_r, rng, tol)


@fp32_backends
def test_adamw_decay_flag(rng, be):
    # With zero gradients m, v stay 0 and only decoupled weight decay moves the parameter.
    p0 = [rng.randn(10), rng.randn(10)]
    p = [be.put(x) for x in p0]
    zeros = lambda: [be.put(np.zeros(10)) for _ in range(2)]  # noqa: E731
    ops.adamw_step(p, zeros(), zeros(), zeros(), lr=0.1, step=1, weight_decay=0.5,
                   decay=[True, False])
    np.testing.assert_allclose(host(p[0]), p0[0] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(host(p[1]), p0[1])


@fp32_backends
def test_adamw_with_master_weights_updates_the_master(rng, be):
    """With master= the update runs on the float32 master and the parameter gets its copy (for
    float32 parameters the copy is exact; bf16 parameters: test_adamw_bf16_master)."""
    shapes = [(37, 8), (5000,)]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    params = [rng.randn(*s) for s in shapes]
    P, W = [be.put(p) for p in params], [be.put(p) for p in params]
    M, V = [be.put(np.zeros(s)) for s in shapes], [be.put(np.zeros(s)) for s in shapes]
    state = [(f64(p), np.zeros(s), np.zeros(s)) for p, s in zip(params, shapes)]
    for step in range(1, 4):
        grads = [rng.randn(*s) for s in shapes]
        ops.adamw_step(P, [be.put(g) for g in grads], M, V, step=step, master=W, **hp)
        state = [ref.adamw_step(p, f64(g), mm, vv, step=step, **hp)
                 for (p, mm, vv), g in zip(state, grads)]
        for i, (p_r, _, _) in enumerate(state):
            check(f"adamw master[{i}] step {step}", host(W[i]), p_r, rng)
            np.testing.assert_array_equal(host(P[i]), host(W[i]))


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
BF16_ADAM_SIZES = [(1,), (37,), (16, 33), (40001,)]


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
def test_adamw_bf16_master(rng, grad_dtype):
    master0 = [rng.randn(*s) for s in BF16_ADAM_SIZES]
    grads = [host(to_cuda(rng.randn(*s), grad_dtype)) for s in BF16_ADAM_SIZES]
    ms = [np.zeros(s) for s in BF16_ADAM_SIZES]
    vs = [np.zeros(s) for s in BF16_ADAM_SIZES]
    P = [to_cuda(a, "bfloat16") for a in master0]
    W = [to_cuda(a) for a in master0]
    G = [to_cuda(g, grad_dtype) for g in grads]
    M, V = [to_cuda(a) for a in ms], [to_cuda(a) for a in vs]
    ops.adamw_step(P, G, M, V, step=1, master=W, seed=1234, **HYPER)
    for i in range(len(master0)):
        rp, rm, rv = ref.adamw_step(master0[i], grads[i], ms[i], vs[i], step=1, **HYPER)
        check(f"master {i}", host(W[i]), rp, rng, 1e-6)
        check(f"m {i}", host(M[i]), rm, rng, 1e-6)
        # the bf16 parameter is the master rounded up or down: within one bf16 ulp
        w, p = host(W[i]), host(P[i])
        ulp = np.exp2(np.floor(np.log2(np.abs(w))) - 7)
        assert np.all(np.abs(p - w) <= ulp * (1 + 1e-6)), f"param {i} not a rounding of master"
    # reproducible with the same seed
    P2 = [to_cuda(a, "bfloat16") for a in master0]
    W2 = [to_cuda(a) for a in master0]
    ops.adamw_step(P2, [to_cuda(g, grad_dtype) for g in grads], [to_cuda(a) for a in ms],
                   [to_cuda(a) for a in vs], step=1, master=W2, seed=1234, **HYPER)
    for a, b in zip(P, P2):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.gpu
def test_stochastic_rounding_is_unbiased(rng):
    # lr = 0 leaves the master unchanged, so the bf16 parameter is a pure rounding of it.
    n = 200_000
    w = (1.0 + rng.random(n)).astype(np.float32)  # in [1, 2): bf16 ulp 2^-7
    P, W = to_cuda(np.zeros(n, np.float32), "bfloat16"), to_cuda(w)
    ops.adamw_step([P], [to_cuda(np.zeros(n, np.float32))], [to_cuda(np.zeros(n, np.float32))],
                   [to_cuda(np.zeros(n, np.float32))], lr=0.0, step=1, master=[W], seed=7)
    p = host(P)
    err = (p - w) / 2.0 ** -7
    assert np.all(np.abs(err) < 1.0)
    assert abs(err.mean()) < 0.01, f"mean rounding error {err.mean():.4f} ulp: biased"
    nearest = host(to_cuda(w, "bfloat16"))
    assert (p != nearest).mean() > 0.1, "looks like round-to-nearest, not stochastic"


@backends
def test_global_norm(rng, be):
    """Over tensors of the backend's dtype (on bfloat16: float32 and bfloat16 mixed)."""
    arrays = [rng.randn(37, 8), rng.randn(768), rng.randn(100_000, scale=1e-3), rng.randn(1),
              rng.randn(40001), rng.randn(17, 19)]
    ts = [be.put(a, "float32" if i % 2 == 0 else None) for i, a in enumerate(arrays)]
    got = ops.global_norm(ts)
    assert isinstance(got, float)
    want = ref.global_norm([host(t) for t in ts])
    assert abs(got - want) <= 1e-6 * want, f"global_norm {got} vs {want} ({rng})"
    assert ops.global_norm(ts) == got  # deterministic
    assert ops.global_norm([be.put(np.zeros(5))]) == 0.0
    t = gptcore.tensor(np.array([3.0, 4.0], np.float32), device=be.device, dtype=be.dtype)
    assert ops.global_norm([t]) == 5.0


# ---- CPU threads ----------------------------------------------------------------------------


def test_set_num_threads(rng):
    before = gptcore.get_num_threads()
    x = rng.randn(64, 768)
    w, b = rng.randn(768), rng.randn(768)
    try:
        gptcore.set_num_threads(1)
        assert gptcore.get_num_threads() == 1
        out1 = np.asarray(ops.layernorm_forward(x, w, b)[0]).copy()
    finally:
        gptcore.set_num_threads(0)
    assert gptcore.get_num_threads() == before
    np.testing.assert_array_equal(np.asarray(ops.layernorm_forward(x, w, b)[0]), out1)


def test_backward_passes_are_deterministic(rng):
    # Same inputs, same thread count: bitwise the same gradients (no atomics, fixed reduction
    # order), as DESIGN.md's determinism rule asks.
    B, T, H, D = 2, 70, 3, 16
    qkv, dout = rng.randn(B, T, 3 * H * D), rng.randn(B, T, H * D)
    x, w = rng.randn(B * T, 48), rng.randn(40, 48)
    dy = rng.randn(B * T, 40)

    def run():
        out, lse = ops.attention_forward(qkv, H, window=33)
        dqkv = np.asarray(ops.attention_backward(dout, qkv, out, lse, H, window=33))
        dw, db = np.zeros_like(w), np.zeros(40, np.float32)
        _, pre = ops.linear_forward(x, w, gelu=True)
        dx = np.asarray(ops.linear_backward(dy, x, pre=pre, weight=w, dweight=dw, dbias=db))
        lw, lb = np.zeros(48, np.float32), np.zeros(48, np.float32)
        _, mean, rstd = ops.layernorm_forward(x, w[0], w[1])
        ldx = np.asarray(ops.layernorm_backward(x, x, mean, rstd, weight=w[0], dweight=lw, dbias=lb))
        return [dqkv, dw, db, dx, lw, lb, ldx]

    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b, err_msg=f"{rng}")
