"""Every CPU op, forward and backward, against the float64 NumPy reference (gptcore.reference).

Inputs are fresh random float32 arrays each run (the seed is printed and named in every failure
message: replay with GPTCORE_TEST_SEED=<seed>). Sizes are chosen to hit the edges: T = 1, T not a
multiple of any tile (37, 65, 129), C = 8 and 768, heads of 16 and 64 dims, GPT-2's vocabulary
50257 padded to 50304, attention windows 1, 3 and >= T.

Agreement is measured as the relative error ||out - ref|| / ||ref|| against the float64
reference. float32 kernels land near 1e-7; the bound TOL = 1e-5 leaves room for the longest
float32 reductions here (768-wide dot products, 50257-wide softmax sums).
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops

ref = pytest.importorskip("gptcore.reference")

TOL = 1e-5


def f64(x):
    return np.asarray(x, dtype=np.float64)


def check(name, got, want, rng, tol=TOL, floor=0.0):
    """Assert ``got`` (gptcore output) matches ``want`` (float64 reference) in relative L2 error,
    and that every element is finite (no NaN/garbage anywhere). ``floor`` bounds the
    denominator from below, for parts of a result that are exactly zero in exact arithmetic."""
    got = np.asarray(got)
    want = f64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape} ({rng})"
    assert np.isfinite(got).all(), f"{name}: non-finite values in output ({rng})"
    denom = max(np.linalg.norm(want), floor)
    err = np.linalg.norm(f64(got) - want) / (denom if denom > 0 else 1.0)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({rng})"


# ---- embedding ------------------------------------------------------------------------------


@pytest.mark.parametrize("B, T, C, V, maxT, idx_dtype", [
    (1, 1, 8, 50257, 1, np.int32),
    (2, 37, 8, 11, 40, np.int64),      # tiny vocabulary: many repeated ids in the scatter-add
    (3, 65, 768, 300, 128, np.int32),
])
def test_embedding(rng, B, T, C, V, maxT, idx_dtype):
    idx = rng.integers(0, V, size=(B, T)).astype(idx_dtype)
    idx.flat[0] = V - 1  # the last row of wte is reachable
    wte, wpe = rng.randn(V, C), rng.randn(maxT, C)
    out = ops.embedding_forward(idx, wte, wpe)
    assert out.shape == (B, T, C) and out.dtype == "float32"
    check("embedding out", out, ref.embedding_forward(idx, f64(wte), f64(wpe)), rng)

    dout = rng.randn(B, T, C)
    dwte_ref, dwpe_ref = ref.embedding_backward(f64(dout), idx, V, maxT)
    dwte0, dwpe0 = rng.randn(V, C), rng.randn(maxT, C)  # gradients accumulate into these
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    assert ops.embedding_backward(dout, idx, dwte, dwpe) is None
    check("dwte", dwte, f64(dwte0) + dwte_ref, rng)
    check("dwpe", dwpe, f64(dwpe0) + dwpe_ref, rng)
    ops.embedding_backward(dout, idx, dwte, dwpe)  # a second micro-batch: 2x the gradient
    check("dwte (accumulated twice)", dwte, f64(dwte0) + 2 * dwte_ref, rng)
    check("dwpe (accumulated twice)", dwpe, f64(dwpe0) + 2 * dwpe_ref, rng)


def test_embedding_backward_deterministic(rng):
    B, T, C, V = 4, 33, 96, 5
    idx = rng.integers(0, V, size=(B, T)).astype(np.int32)
    dout = rng.randn(B, T, C)
    runs = []
    for _ in range(3):
        dwte, dwpe = np.zeros((V, C), np.float32), np.zeros((T, C), np.float32)
        ops.embedding_backward(dout, idx, dwte, dwpe)
        runs.append((dwte, dwpe))
    for dwte, dwpe in runs[1:]:
        np.testing.assert_array_equal(dwte, runs[0][0])
        np.testing.assert_array_equal(dwpe, runs[0][1])


# ---- layernorm ------------------------------------------------------------------------------

LN_SHAPES = [(1, 8), (37, 8), (2, 65, 768), (129, 768)]


@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("with_dresidual", [False, True])
def test_layernorm(rng, shape, with_dresidual):
    C = shape[-1]
    x = rng.randn(*shape) * 2 + 3  # an offset mean: the variance must not cancel badly
    w, b = rng.randn(C), rng.randn(C)
    out, mean, rstd = ops.layernorm_forward(x, w, b, eps=1e-5)
    out_r, mean_r, rstd_r = ref.layernorm_forward(f64(x), f64(w), f64(b), 1e-5)
    assert out.shape == shape and mean.shape == shape[:-1] and rstd.shape == shape[:-1]
    assert mean.dtype == "float32" and rstd.dtype == "float32"
    check("layernorm out", out, out_r, rng)
    check("layernorm mean", mean, mean_r, rng)
    check("layernorm rstd", rstd, rstd_r, rng)

    dout = rng.randn(*shape)
    dres = rng.randn(*shape) if with_dresidual else None
    dx_r, dw_r, db_r = ref.layernorm_backward(f64(dout), f64(x), mean_r, rstd_r,
                                              dresidual=None if dres is None else f64(dres),
                                              weight=f64(w))
    dw0, db0 = rng.randn(C), rng.randn(C)
    dw, db = dw0.copy(), db0.copy()
    dx = ops.layernorm_backward(dout, x, mean, rstd, dresidual=dres, weight=w, dweight=dw, dbias=db)
    check("layernorm dx", dx, dx_r, rng)
    check("layernorm dweight", dw, f64(dw0) + dw_r, rng)
    check("layernorm dbias", db, f64(db0) + db_r, rng)
    dx2 = ops.layernorm_backward(dout, x, mean, rstd, dresidual=dres, weight=w, dweight=dw, dbias=db)
    np.testing.assert_array_equal(np.asarray(dx2), np.asarray(dx))  # activations: overwritten
    check("layernorm dweight (accumulated twice)", dw, f64(dw0) + 2 * dw_r, rng)
    check("layernorm dbias (accumulated twice)", db, f64(db0) + 2 * db_r, rng)


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_residual_layernorm(rng, shape):
    C = shape[-1]
    x, r = rng.randn(*shape), rng.randn(*shape)
    w, b = rng.randn(C), rng.randn(C)
    s, out, mean, rstd = ops.residual_layernorm_forward(x, r, w, b, eps=1e-5)
    s_r, out_r, mean_r, rstd_r = ref.residual_layernorm_forward(f64(x), f64(r), f64(w), f64(b), 1e-5)
    check("residual sum", s, s_r, rng)
    check("residual_layernorm out", out, out_r, rng)
    check("residual_layernorm mean", mean, mean_r, rng)
    check("residual_layernorm rstd", rstd, rstd_r, rng)

    dout, dsum = rng.randn(*shape), rng.randn(*shape)
    dsum_r, dw_r, db_r = ref.residual_layernorm_backward(f64(dout), s_r, mean_r, rstd_r,
                                                         dsum=f64(dsum), weight=f64(w))
    dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)
    dtotal = ops.residual_layernorm_backward(dout, s, mean, rstd, dsum=dsum, weight=w, dweight=dw,
                                             dbias=db)
    check("residual_layernorm dsum", dtotal, dsum_r, rng)
    check("residual_layernorm dweight", dw, dw_r, rng)
    check("residual_layernorm dbias", db, db_r, rng)


def test_layernorm_constant_row(rng):
    # A constant row has zero variance: rstd = 1/sqrt(eps) and the output is the bias.
    C = 64
    x = np.full((3, C), 2.5, np.float32)
    w, b = rng.randn(C), rng.randn(C)
    out, mean, rstd = ops.layernorm_forward(x, w, b, eps=1e-5)
    out_r, mean_r, rstd_r = ref.layernorm_forward(f64(x), f64(w), f64(b), 1e-5)
    check("constant-row out", out, out_r, rng)
    check("constant-row rstd", rstd, rstd_r, rng)


# ---- linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape, M", [
    ((1, 8), 8),
    ((37, 768), 96),
    ((2, 65, 96), 768),
    ((129, 64), 200),
    ((3, 67, 48), 40),  # more rows than output features: the forward splits rows across threads
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear(rng, x_shape, M, bias, gelu):
    K = x_shape[-1]
    x, w = rng.randn(*x_shape), rng.randn(M, K, scale=K ** -0.5)
    b = rng.randn(M) if bias else None
    out, pre = ops.linear_forward(x, w, b, gelu=gelu)
    out_r, pre_r = ref.linear_forward(f64(x), f64(w), None if b is None else f64(b), gelu=gelu)
    assert out.shape == x_shape[:-1] + (M,)
    check("linear out", out, out_r, rng)
    if gelu:
        check("linear pre", pre, pre_r, rng)
    else:
        assert pre is None

    dout = rng.randn(*out.shape)
    dx_r, dw_r, db_r = ref.linear_backward(f64(dout), f64(x), pre=pre_r if gelu else None,
                                           weight=f64(w), has_bias=bias)
    dw0 = rng.randn(M, K)
    dw = dw0.copy()
    db = np.zeros(M, np.float32) if bias else None
    dx = ops.linear_backward(dout, x, pre=pre if gelu else None, weight=w, dweight=dw, dbias=db)
    check("linear dx", dx, dx_r, rng)
    check("linear dweight", dw, f64(dw0) + dw_r, rng)
    if bias:
        check("linear dbias", db, db_r, rng)
    # need_dx=False: no dx, parameter gradients still accumulate (2x now)
    assert ops.linear_backward(dout, x, pre=pre if gelu else None, weight=w, need_dx=False,
                               dweight=dw, dbias=db) is None
    check("linear dweight (accumulated twice)", dw, f64(dw0) + 2 * dw_r, rng)
    if bias:
        check("linear dbias (accumulated twice)", db, 2 * f64(db_r), rng)


def test_gelu_epilogue_against_reference_gelu(rng):
    # The fused epilogue is GELU(pre) and its backward GELU'(pre) * dout: compare with the
    # reference's standalone gelu over a wide input range (tails of tanh included).
    x = rng.randn(64, 16) * 4
    eye = np.eye(16, dtype=np.float32)
    out, pre = ops.linear_forward(x, eye, None, gelu=True)
    check("gelu", out, ref.gelu_forward(f64(x)), rng)
    dout = rng.randn(64, 16)
    dw = np.zeros((16, 16), np.float32)
    dx = ops.linear_backward(dout, x, pre=pre, weight=eye, dweight=dw)
    check("gelu backward", dx, ref.gelu_backward(f64(dout), f64(x)), rng)


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
]


@pytest.mark.parametrize("B, T, H, D, window", ATTN_CASES)
def test_attention(rng, B, T, H, D, window):
    C = H * D
    qkv = rng.randn(B, T, 3 * C)
    out, lse = ops.attention_forward(qkv, H, window=window)
    out_r, lse_r = ref.attention_forward(f64(qkv), H, window=window)
    assert out.shape == (B, T, C) and lse.shape == (B, H, T) and lse.dtype == "float32"
    check("attention out", out, out_r, rng)
    check("attention lse", lse, lse_r, rng)
    dout = rng.randn(B, T, C)
    dqkv = ops.attention_backward(dout, qkv, out, lse, H, window=window)
    dqkv_r = ref.attention_backward(f64(dout), f64(qkv), out_r, lse_r, H, window=window)
    assert dqkv.shape == qkv.shape
    check("attention dqkv", dqkv, dqkv_r, rng)
    # Each third on its own too. With window=1 (or T=1) each query sees one key, the softmax
    # is constant and dq = dk = 0 exactly; float32 leaves ~1e-7 * |dout| |v| of rounding from
    # dP - rowsum(dO * O) there, so those parts are measured against (a tenth of) the whole
    # gradient's norm instead of their own.
    floor = 0.1 * np.linalg.norm(dqkv_r)
    for part, got, want in zip("qkv", np.split(np.asarray(dqkv), 3, axis=-1), np.split(dqkv_r, 3, axis=-1)):
        check(f"attention d{part}", got, want, rng, floor=floor)


def test_attention_window_one_is_identity_on_v(rng):
    B, T, H, D = 2, 19, 2, 16
    C = H * D
    qkv = rng.randn(B, T, 3 * C)
    out, _ = ops.attention_forward(qkv, H, window=1)
    np.testing.assert_allclose(np.asarray(out), qkv[..., 2 * C:], rtol=1e-6, atol=1e-6)


def test_attention_large_scores(rng):
    # Peaked softmax (scores of magnitude ~100): the online softmax must stay finite and exact.
    B, T, H, D = 1, 65, 2, 64
    qkv = rng.randn(B, T, 3 * H * D) * 3.5
    out, lse = ops.attention_forward(qkv, H)
    out_r, lse_r = ref.attention_forward(f64(qkv), H)
    check("attention out (peaked)", out, out_r, rng)
    check("attention lse (peaked)", lse, lse_r, rng)
    dout = rng.randn(B, T, H * D)
    dqkv = ops.attention_backward(dout, qkv, out, lse, H)
    # Scores are ~1e2 here, so float32 rounding of each score (~1e-5 absolute) moves the
    # probabilities by ~1e-5 relative: a looser bound than the default.
    check("attention dqkv (peaked)", dqkv, ref.attention_backward(f64(dout), f64(qkv), out_r, lse_r, H),
          rng, tol=1e-4)


# ---- cross-entropy --------------------------------------------------------------------------

CE_CASES = [
    # N, Vp, V
    (1, 8, 8),
    (5, 65, 50),
    (37, 50304, 50257),  # GPT-2: real vocabulary 50257, padded to a multiple of 128
]


def _targets(rng, N, V, dtype, n_ignored):
    t = rng.integers(0, V, size=N).astype(dtype)
    t[0] = V - 1
    if n_ignored:
        t[rng.choice(np.arange(1, N), size=n_ignored, replace=False)] = -1
    return t


@pytest.mark.parametrize("N, Vp, V", CE_CASES)
@pytest.mark.parametrize("tgt_dtype", [np.int32, np.int64])
def test_cross_entropy(rng, N, Vp, V, tgt_dtype):
    n_ignored = min(N - 1, 3)
    logits = rng.randn(N, Vp, scale=3.0)
    targets = _targets(rng, N, V, tgt_dtype, n_ignored)
    vs = None if V == Vp else V
    losses = ops.cross_entropy_forward(logits, targets, vocab_size=vs)
    losses_r = ref.cross_entropy_forward(f64(logits), targets, vocab_size=vs)
    assert losses.shape == (N,) and losses.dtype == "float32"
    check("cross-entropy losses", losses, losses_r, rng)
    assert (np.asarray(losses)[targets == -1] == 0).all()

    # default grad_scale: 1 / number of non-ignored targets (the mean loss)
    losses2, dlogits = ops.cross_entropy_forward_backward(logits, targets, vocab_size=vs)
    check("cross-entropy losses (fused)", losses2, losses_r, rng)
    dl_r = ref.cross_entropy_backward(f64(logits), targets, vocab_size=vs)
    check("cross-entropy dlogits", dlogits, dl_r, rng)
    dl = np.asarray(dlogits)
    assert (dl[:, V:] == 0).all(), f"padding columns must be zero ({rng})"
    assert (dl[targets == -1] == 0).all(), f"ignored rows must be zero ({rng})"
    # each valid row of softmax - onehot sums to zero
    np.testing.assert_allclose(dl.sum(axis=1, dtype=np.float64), 0, atol=1e-6)

    _, dlogits = ops.cross_entropy_forward_backward(logits, targets, vocab_size=vs, grad_scale=0.25)
    check("cross-entropy dlogits (grad_scale)", dlogits,
          ref.cross_entropy_backward(f64(logits), targets, vocab_size=vs, grad_scale=0.25), rng)


def test_cross_entropy_batched_and_ignore_index(rng):
    B, T, V = 2, 37, 100
    logits = rng.randn(B, T, V)
    targets = rng.integers(0, V, size=(B, T))
    targets[0, :5] = -100
    losses, dlogits = ops.cross_entropy_forward_backward(logits, targets, ignore_index=-100)
    assert losses.shape == (B, T) and dlogits.shape == (B, T, V)
    flat_l, flat_t = logits.reshape(-1, V), targets.reshape(-1)
    check("ce losses (B,T)", np.asarray(losses).reshape(-1),
          ref.cross_entropy_forward(f64(flat_l), flat_t, ignore_index=-100), rng)
    check("ce dlogits (B,T)", np.asarray(dlogits).reshape(-1, V),
          ref.cross_entropy_backward(f64(flat_l), flat_t, ignore_index=-100), rng)


def test_cross_entropy_with_banned_logits(rng):
    """-inf logits (banned tokens) take no probability: whole 256-wide blocks of them at the
    start of a row, scattered ones, and a row where only the target is finite."""
    N, V = 5, 700
    logits = rng.randn(N, V, scale=2.0)
    logits[0, :512] = -np.inf  # two full blocks before any finite value
    logits[1, rng.choice(V, 300, replace=False)] = -np.inf
    logits[2, :] = -np.inf
    targets = np.array([600, 0, 3, 1, 2])
    logits[1, 0] = 0.5  # the target itself stays finite
    logits[2, 3] = 1.0
    losses, dlogits = ops.cross_entropy_forward_backward(logits, targets)
    check("ce losses with -inf", losses, ref.cross_entropy_forward(f64(logits), targets), rng)
    check("ce dlogits with -inf", dlogits, ref.cross_entropy_backward(f64(logits), targets), rng)
    assert np.isfinite(np.asarray(dlogits)).all()
    assert abs(float(np.asarray(losses)[2])) < 1e-6  # the only finite logit: loss 0


def test_cross_entropy_all_ignored(rng):
    logits = rng.randn(4, 10)
    targets = np.full(4, -1, np.int64)
    losses, dlogits = ops.cross_entropy_forward_backward(logits, targets)
    assert (np.asarray(losses) == 0).all() and (np.asarray(dlogits) == 0).all()


@pytest.mark.parametrize("as_gptcore_tensor", [False, True])
def test_cross_entropy_inplace(rng, as_gptcore_tensor):
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


@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw(rng, grad_scale, weight_decay):
    shapes = [(37, 8), (768,), (3, 5, 7), (1,), (5000,)]  # 5000 > the kernel's parallel threshold
    decay = [True, False, True, False, True]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay)
    params = [rng.randn(*s) for s in shapes]
    m = [np.zeros(s, np.float32) for s in shapes]
    v = [np.zeros(s, np.float32) for s in shapes]
    state = [(f64(p), np.zeros(s), np.zeros(s)) for p, s in zip(params, shapes)]
    for step in range(1, 6):
        grads = [rng.randn(*s) for s in shapes]
        ops.adamw_step(params, grads, m, v, step=step, decay=decay, grad_scale=grad_scale, **hp)
        state = [ref.adamw_step(p, f64(g), mm, vv, step=step, decay=d, grad_scale=grad_scale, **hp)
                 for (p, mm, vv), g, d in zip(state, grads, decay)]
        for i, (p_r, m_r, v_r) in enumerate(state):
            check(f"adamw param[{i}] step {step}", params[i], p_r, rng)
            check(f"adamw m[{i}] step {step}", m[i], m_r, rng)
            check(f"adamw v[{i}] step {step}", v[i], v_r, rng)


def test_adamw_decay_flag(rng):
    # With zero gradients m, v stay 0 and only decoupled weight decay moves the parameter.
    p = [rng.randn(10), rng.randn(10)]
    p0 = [x.copy() for x in p]
    zeros = [np.zeros(10, np.float32) for _ in range(2)]
    ops.adamw_step(p, zeros, [z.copy() for z in zeros], [z.copy() for z in zeros], lr=0.1, step=1,
                   weight_decay=0.5, decay=[True, False])
    np.testing.assert_allclose(p[0], p0[0] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(p[1], p0[1])


def test_adamw_with_master_weights_updates_the_master(rng):
    """With master= the update runs on the float32 master and the parameter gets its copy, as
    on CUDA (on the CPU parameters are float32, so the copy is exact)."""
    shapes = [(37, 8), (5000,)]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    params = [rng.randn(*s) for s in shapes]
    master = [p.copy() for p in params]
    m = [np.zeros(s, np.float32) for s in shapes]
    v = [np.zeros(s, np.float32) for s in shapes]
    state = [(f64(p), np.zeros(s), np.zeros(s)) for p, s in zip(params, shapes)]
    for step in range(1, 4):
        grads = [rng.randn(*s) for s in shapes]
        ops.adamw_step(params, grads, m, v, step=step, master=master, **hp)
        state = [ref.adamw_step(p, f64(g), mm, vv, step=step, **hp)
                 for (p, mm, vv), g in zip(state, grads)]
        for i, (p_r, _, _) in enumerate(state):
            check(f"adamw master[{i}] step {step}", master[i], p_r, rng)
            np.testing.assert_array_equal(params[i], master[i])


def test_global_norm(rng):
    ts = [rng.randn(37, 8), rng.randn(768), rng.randn(100_000, scale=1e-3), rng.randn(1)]
    got = ops.global_norm(ts)
    assert isinstance(got, float)
    want = ref.global_norm([f64(t) for t in ts])
    assert abs(got - want) <= 1e-6 * want, f"global_norm {got} vs {want} ({rng})"
    assert ops.global_norm([np.zeros(5, np.float32)]) == 0.0
    t = gptcore.tensor(np.array([3.0, 4.0], np.float32))
    assert ops.global_norm([t]) == 5.0


# ---- threads --------------------------------------------------------------------------------


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
