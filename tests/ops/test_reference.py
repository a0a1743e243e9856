"""The NumPy reference (python/gptcore/reference.py) checked on its own, in float64.

Every backward is compared with central finite differences of its forward; forwards are compared
with direct, obviously-correct formulations written here (per-row loops, closed forms). Inputs
are fresh random each run: the seed is printed and named in every failure message, and
``GPTCORE_TEST_SEED=<seed>`` replays a run.

reference.py imports nothing but NumPy, so it is loaded straight from its file: these tests run
whether or not the C++ extension has been built.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from tests import helpers

_REF_PATH = Path(__file__).resolve().parents[2] / "python" / "gptcore" / "reference.py"
_spec = importlib.util.spec_from_file_location("_gptcore_reference_under_test", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

FD_TOL = 1e-6  # finite differences in float64 typically land near 1e-9
EXACT_TOL = 1e-12  # two float64 formulations of the same forward


class Rand:
    """A NumPy Generator that remembers its seed, for failure messages."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = np.random.default_rng(seed)

    def normal(self, *shape, scale: float = 1.0) -> np.ndarray:
        return self.gen.standard_normal(shape) * scale

    def __repr__(self) -> str:
        return f"seed={self.seed} (replay with GPTCORE_TEST_SEED={self.seed})"


@pytest.fixture
def rand() -> Rand:
    seed = helpers.fresh_seed()
    print(f"rand seed = {seed}")
    return Rand(seed)


def check(name, got, want, rand, tol=FD_TOL, floor=1e-3):
    """Relative L2 error ||got - want|| / max(||want||, floor) below tol.

    The floor keeps a legitimately tiny gradient (a GELU tail, say), whose finite-difference
    estimate carries an absolute round-off error near 1e-11, from failing a relative test.
    """
    helpers.check(name, got, want, rand, tol, floor=floor)


def fd_grad(loss, x, h=1e-5):
    """Central-difference gradient of the scalar ``loss(x)`` with respect to the array x."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    xf, gf = x.reshape(-1), grad.reshape(-1)
    for i in range(xf.size):
        old = xf[i]
        xf[i] = old + h
        up = loss(x)
        xf[i] = old - h
        down = loss(x)
        xf[i] = old
        gf[i] = (up - down) / (2 * h)
    return grad


# ---- GELU -----------------------------------------------------------------------------------


def test_gelu(rand):
    x = np.concatenate([rand.normal(61, scale=3.0), [0.0, -12.0, 12.0, -40.0, 40.0]])
    y = ref.gelu_forward(x)
    # the definition, one element at a time
    want = [0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))) for t in x]
    check("gelu", y, want, rand, EXACT_TOL)
    # tanh-GELU approximates the exact erf GELU x * Phi(x) to within ~1e-3 everywhere
    exact = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x])
    assert np.max(np.abs(y - exact)) < 1e-3, f"gelu far from x*Phi(x) ({rand})"
    assert y[-5] == 0.0 and y[-1] == 40.0 and y[-2] == 0.0, f"gelu tails/zero wrong ({rand})"
    dout = rand.normal(x.size)
    h = 1e-5  # elementwise op: one vectorised central difference covers every element
    fd = dout * (ref.gelu_forward(x + h) - ref.gelu_forward(x - h)) / (2 * h)
    check("gelu backward", ref.gelu_backward(dout, x), fd, rand)


# ---- embedding ------------------------------------------------------------------------------


@pytest.mark.parametrize("B, T, maxT, V, C", [(2, 5, 7, 4, 3), (1, 1, 1, 3, 5), (3, 4, 4, 2, 1)])
def test_embedding(rand, B, T, maxT, V, C):
    idx = rand.gen.integers(0, V, size=(B, T))  # V small: token ids repeat
    wte, wpe = rand.normal(V, C), rand.normal(maxT, C)
    out = ref.embedding_forward(idx.astype(np.int32), wte.astype(np.float32), wpe)
    want = np.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            want[b, t] = wte[idx[b, t]] + wpe[t]
    check("embedding out", out, want, rand, 1e-7)  # wte went through float32

    dout = rand.normal(B, T, C)
    dwte, dwpe = ref.embedding_backward(dout, idx, V, maxT)
    check("dwte", dwte, fd_grad(lambda w: np.sum(ref.embedding_forward(idx, w, wpe) * dout), wte), rand)
    check("dwpe", dwpe, fd_grad(lambda w: np.sum(ref.embedding_forward(idx, wte, w) * dout), wpe), rand)
    assert (dwpe[T:] == 0).all(), f"unused positions must get zero gradient ({rand})"


def test_embedding_bad_ids():
    wte, wpe = np.zeros((4, 3)), np.zeros((5, 3))
    with pytest.raises(ValueError, match="idx"):
        ref.embedding_forward(np.array([[0, 4]]), wte, wpe)
    with pytest.raises(ValueError, match="idx"):
        ref.embedding_forward(np.zeros((1, 6), np.int64), wte, wpe)  # T > maxT
    with pytest.raises(TypeError, match="idx"):
        ref.embedding_forward(np.zeros((1, 2)), wte, wpe)


# ---- layernorm ------------------------------------------------------------------------------


LN_SHAPES = [(4, 7), (2, 3, 12), (1, 1, 5)]


@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("with_dresidual", [False, True])
def test_layernorm(rand, shape, with_dresidual):
    C = shape[-1]
    x = rand.normal(*shape, scale=2.0) + 0.5
    w, b = rand.normal(C) + 1.0, rand.normal(C)
    eps = 1e-5
    out, mean, rstd = ref.layernorm_forward(x, w, b, eps)
    assert mean.shape == rstd.shape == shape[:-1]
    check("ln mean", mean, np.mean(x, axis=-1), rand, EXACT_TOL)
    check("ln rstd", rstd, 1 / np.sqrt(np.var(x, axis=-1) + eps), rand, EXACT_TOL)
    want = (x - np.mean(x, -1, keepdims=True)) / np.sqrt(np.var(x, -1, keepdims=True) + eps) * w + b
    check("ln out", out, want, rand, EXACT_TOL)

    dout = rand.normal(*shape)
    dres = rand.normal(*shape) if with_dresidual else None
    dx, dw, db = ref.layernorm_backward(dout, x, mean, rstd, dresidual=dres, weight=w)

    def loss_x(xx):
        extra = np.sum(xx * dres) if with_dresidual else 0.0  # dx includes the skip path
        return np.sum(ref.layernorm_forward(xx, w, b, eps)[0] * dout) + extra

    check("ln dx", dx, fd_grad(loss_x, x), rand)
    check("ln dweight", dw, fd_grad(lambda ww: np.sum(ref.layernorm_forward(x, ww, b, eps)[0] * dout), w), rand)
    check("ln dbias", db, fd_grad(lambda bb: np.sum(ref.layernorm_forward(x, w, bb, eps)[0] * dout), b), rand)


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_residual_layernorm(rand, shape):
    C = shape[-1]
    x, r = rand.normal(*shape), rand.normal(*shape)
    w, b = rand.normal(C) + 1.0, rand.normal(C)
    s, out, mean, rstd = ref.residual_layernorm_forward(x, r, w, b)
    check("residual sum", s, x + r, rand, EXACT_TOL)
    out2, mean2, rstd2 = ref.layernorm_forward(x + r, w, b)
    check("residual ln out", out, out2, rand, EXACT_TOL)

    dout, dsum = rand.normal(*shape), rand.normal(*shape)

    def loss(xx, rr, ww, bb):
        ss, oo, _, _ = ref.residual_layernorm_forward(xx, rr, ww, bb)
        return np.sum(oo * dout) + np.sum(ss * dsum)

    dtot, dw, db = ref.residual_layernorm_backward(dout, s, mean, rstd, dsum=dsum, weight=w)
    check("dsum_total vs dx", dtot, fd_grad(lambda a: loss(a, r, w, b), x), rand)
    check("dsum_total vs dresidual", dtot, fd_grad(lambda a: loss(x, a, w, b), r), rand)
    check("residual ln dweight", dw, fd_grad(lambda a: loss(x, r, a, b), w), rand)
    check("residual ln dbias", db, fd_grad(lambda a: loss(x, r, w, a), b), rand)


# ---- linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape, M", [((2, 3, 5), 7), ((1, 4), 3), ((1, 1, 1), 1)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear(rand, x_shape, M, gelu, has_bias):
    K = x_shape[-1]
    x, w = rand.normal(*x_shape), rand.normal(M, K)
    b = rand.normal(M) if has_bias else None
    out, pre = ref.linear_forward(x, w, b, gelu=gelu)
    want = np.einsum("...k,mk->...m", x, w) + (b if has_bias else 0.0)
    if gelu:
        check("linear pre", pre, want, rand, EXACT_TOL)
        check("linear out", out, ref.gelu_forward(want), rand, EXACT_TOL)
    else:
        assert pre is None
        check("linear out", out, want, rand, EXACT_TOL)

    dout = rand.normal(*x_shape[:-1], M)
    dx, dw, db = ref.linear_backward(dout, x, pre=pre, weight=w, has_bias=has_bias)

    def loss(xx, ww, bb):
        return np.sum(ref.linear_forward(xx, ww, bb, gelu=gelu)[0] * dout)

    check("linear dx", dx, fd_grad(lambda a: loss(a, w, b), x), rand)
    check("linear dweight", dw, fd_grad(lambda a: loss(x, a, b), w), rand)
    if has_bias:
        check("linear dbias", db, fd_grad(lambda a: loss(x, w, a), b), rand)
    else:
        assert db is None


# ---- attention ------------------------------------------------------------------------------


def naive_attention(qkv, n_head, window):
    """One query row at a time, over exactly the keys it may see: no masks, no batching."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    out = np.zeros((B, T, C))
    lse = np.zeros((B, n_head, T))
    for b in range(B):
        for h in range(n_head):
            cols = slice(h * D, (h + 1) * D)
            q, k, v = (qkv[b, :, i * C:(i + 1) * C][:, cols] for i in range(3))
            for t in range(T):
                first = max(0, t - window + 1) if window else 0
                scores = np.array([q[t] @ k[s] for s in range(first, t + 1)]) / math.sqrt(D)
                lse[b, h, t] = math.log(sum(math.exp(z) for z in scores))
                weights = np.exp(scores - lse[b, h, t])
                out[b, t, cols] = sum(wt * v[s] for wt, s in zip(weights, range(first, t + 1)))
    return out, lse


ATTN_CASES = [
    # B, T, C, n_head, window
    (2, 7, 6, 2, None),
    (2, 7, 6, 2, 1),
    (2, 7, 6, 2, 3),
    (1, 7, 6, 3, 0),  # 0 = dense
    (1, 1, 4, 2, None),  # T = 1
    (1, 1, 4, 1, 3),
    (2, 5, 15, 3, None),  # D = 5
    (1, 6, 10, 5, 2),  # D = 2
    (1, 4, 6, 2, 10),  # window longer than the sequence
]


@pytest.mark.parametrize("B, T, C, H, window", ATTN_CASES)
def test_attention(rand, B, T, C, H, window):
    qkv = rand.normal(B, T, 3 * C, scale=1.5)
    out, lse = ref.attention_forward(qkv, H, window=window)
    assert out.shape == (B, T, C) and lse.shape == (B, H, T)
    out_n, lse_n = naive_attention(qkv, H, window)
    check("attention out vs naive", out, out_n, rand, EXACT_TOL)
    check("attention lse vs naive", lse, lse_n, rand, EXACT_TOL)

    dout = rand.normal(B, T, C)
    dqkv = ref.attention_backward(dout, qkv, out, lse, H, window=window)
    fd = fd_grad(lambda a: np.sum(ref.attention_forward(a, H, window=window)[0] * dout), qkv)
    check("attention dqkv", dqkv, fd, rand)


def test_attention_window_one_is_identity_on_v(rand):
    # With window=1 each query sees only its own key: out = v and lse = q.k / sqrt(D).
    B, T, C, H = 2, 7, 12, 3
    D = C // H
    qkv = rand.normal(B, T, 3 * C)
    out, lse = ref.attention_forward(qkv, H, window=1)
    check("window=1 out", out, qkv[:, :, 2 * C:], rand, EXACT_TOL)
    q = qkv[:, :, :C].reshape(B, T, H, D)
    k = qkv[:, :, C:2 * C].reshape(B, T, H, D)
    check("window=1 lse", lse, np.einsum("bthd,bthd->bht", q, k) / math.sqrt(D), rand, EXACT_TOL)
    # the first query of a dense layer also sees only itself
    out_d, lse_d = ref.attention_forward(qkv, H)
    check("t=0 dense out", out_d[:, 0], out[:, 0], rand, EXACT_TOL)
    check("t=0 dense lse", lse_d[:, :, 0], lse[:, :, 0], rand, EXACT_TOL)


def test_attention_bad_args():
    qkv = np.zeros((1, 3, 12))
    with pytest.raises(ValueError, match="n_head"):
        ref.attention_forward(qkv, 3)  # C = 4 not divisible by 3
    with pytest.raises(ValueError, match="qkv"):
        ref.attention_forward(np.zeros((1, 3, 10)), 1)
    with pytest.raises(ValueError, match="window"):
        ref.attention_forward(qkv, 2, window=-1)


# ---- cross-entropy --------------------------------------------------------------------------


CE_CASES = [
    # targets shape, Vp, V (None = Vp), n_ignored, ignore_index
    ((5,), 8, None, 0, -1),
    ((6,), 13, 10, 2, -1),  # padded vocabulary
    ((2, 3), 9, 7, 1, -100),  # batched
    ((1,), 3, None, 0, -1),
    ((4,), 5, 1, 1, -1),  # one real class
]


def _ce_inputs(rand, shape, Vp, V, n_ignored, ignore_index):
    logits = rand.normal(*shape, Vp, scale=2.0)
    targets = rand.gen.integers(0, V or Vp, size=shape)
    flat = targets.reshape(-1)
    flat[0] = (V or Vp) - 1
    if n_ignored:
        flat[rand.gen.choice(np.arange(1, flat.size), size=n_ignored, replace=False)] = ignore_index
    return logits, targets


@pytest.mark.parametrize("shape, Vp, V, n_ignored, ignore_index", CE_CASES)
def test_cross_entropy(rand, shape, Vp, V, n_ignored, ignore_index):
    logits, targets = _ce_inputs(rand, shape, Vp, V, n_ignored, ignore_index)
    kw = dict(vocab_size=V, ignore_index=ignore_index)
    losses = ref.cross_entropy_forward(logits, targets, **kw)
    assert losses.shape == targets.shape
    want = np.zeros(targets.shape)
    for pos in np.ndindex(targets.shape):
        t = targets[pos]
        if t != ignore_index:
            row = logits[pos][: V or Vp]
            want[pos] = -math.log(math.exp(row[t]) / sum(math.exp(z) for z in row))
    check("ce losses", losses, want, rand, EXACT_TOL)

    ignored = targets == ignore_index
    n_valid = int((~ignored).sum())
    for scale in (None, 0.3):
        dl = ref.cross_entropy_backward(logits, targets, grad_scale=scale, **kw)
        assert dl.shape == logits.shape
        eff = 1.0 / n_valid if scale is None else scale
        fd = fd_grad(lambda a: eff * np.sum(ref.cross_entropy_forward(a, targets, **kw)), logits)
        check(f"ce dlogits (grad_scale={scale})", dl, fd, rand)
        assert (dl[..., V or Vp:] == 0).all(), f"padding columns must be exactly 0 ({rand})"
        assert (dl[ignored] == 0).all(), f"ignored rows must be exactly 0 ({rand})"


def test_cross_entropy_extremes(rand):
    logits = rand.normal(3, 6, scale=1000.0)  # overflow unless the max is subtracted
    targets = np.array([0, 5, -1])
    losses = ref.cross_entropy_forward(logits, targets)
    dl = ref.cross_entropy_backward(logits, targets)
    assert np.isfinite(losses).all() and np.isfinite(dl).all(), f"{rand}"
    assert (losses[:2] >= 0).all() and losses[2] == 0
    # every target ignored: zero losses and zero gradient (no division by zero)
    none = np.full(3, -1)
    assert (ref.cross_entropy_forward(logits, none) == 0).all()
    assert (ref.cross_entropy_backward(logits, none) == 0).all()
    for bad in (np.array([0, 6, 1]), np.array([0, -2, 1])):
        with pytest.raises(ValueError, match="targets"):
            ref.cross_entropy_forward(logits, bad)
    with pytest.raises(ValueError, match="targets"):
        ref.cross_entropy_backward(logits, np.array([0, 4, 1]), vocab_size=4)  # 4 is padding
    with pytest.raises(ValueError, match="vocab_size"):
        ref.cross_entropy_forward(logits, targets, vocab_size=7)


# ---- AdamW and the global norm --------------------------------------------------------------


@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_adamw_two_steps(rand, decay, grad_scale):
    hp = dict(lr=3e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)
    p0 = rand.normal(3, 5).astype(np.float32)  # float32 in, float64 out
    g1, g2 = rand.normal(3, 5), rand.normal(3, 5)
    m0, v0 = np.zeros((3, 5), np.float32), np.zeros((3, 5), np.float32)
    before = [a.copy() for a in (p0, g1, m0, v0)]
    p1, m1, v1 = ref.adamw_step(p0, g1, m0, v0, step=1, decay=decay, grad_scale=grad_scale, **hp)
    for a, b in zip(before, (p0, g1, m0, v0)):
        np.testing.assert_array_equal(a, b, err_msg="adamw_step must not modify its inputs")
    p2, m2, v2 = ref.adamw_step(p1, g2, m1, v1, step=2, decay=decay, grad_scale=grad_scale, **hp)

    # Closed forms from zero moments. Step 1: mhat = g, vhat = g^2, so the Adam direction is
    # g / (|g| + eps). Step 2: mhat = (b1 g1 + g2) / (1 + b1), vhat = (b2 g1^2 + g2^2) / (1 + b2).
    lr, b1, b2, eps = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"]
    wd = hp["weight_decay"] if decay else 0.0
    x0 = p0.astype(np.float64)
    a1, a2 = g1 * grad_scale, g2 * grad_scale
    want_p1 = x0 - lr * (a1 / (np.abs(a1) + eps) + wd * x0)
    check("adamw m step 1", m1, (1 - b1) * a1, rand, EXACT_TOL)
    check("adamw v step 1", v1, (1 - b2) * a1 ** 2, rand, EXACT_TOL)
    check("adamw p step 1", p1, want_p1, rand, EXACT_TOL)
    mhat = (b1 * a1 + a2) / (1 + b1)
    vhat = (b2 * a1 ** 2 + a2 ** 2) / (1 + b2)
    check("adamw m step 2", m2, b1 * (1 - b1) * a1 + (1 - b1) * a2, rand, EXACT_TOL)
    check("adamw v step 2", v2, b2 * (1 - b2) * a1 ** 2 + (1 - b2) * a2 ** 2, rand, EXACT_TOL)
    check("adamw p step 2", p2, want_p1 - lr * (mhat / (np.sqrt(vhat) + eps) + wd * want_p1),
          rand, EXACT_TOL)
    assert p2.dtype == np.float64


def test_adamw_zero_grad_only_decays(rand):
    p = rand.normal(7)
    z = np.zeros(7)
    p1, _, _ = ref.adamw_step(p, z, z, z, lr=0.1, step=1, weight_decay=0.5)
    check("decayed param", p1, p * (1 - 0.1 * 0.5), rand, EXACT_TOL)
    p1, _, _ = ref.adamw_step(p, z, z, z, lr=0.1, step=1, weight_decay=0.5, decay=False)
    np.testing.assert_array_equal(p1, p)


def test_global_norm(rand):
    arrays = [rand.normal(3, 4), rand.normal(7).astype(np.float32), rand.normal(2, 3, 5), rand.normal(1)]
    got = ref.global_norm(arrays)
    assert isinstance(got, float)
    want = math.sqrt(sum(float(v) ** 2 for a in arrays for v in np.asarray(a, np.float64).ravel()))
    assert abs(got - want) <= 1e-12 * want, f"global_norm {got} vs {want} ({rand})"
    assert ref.global_norm([np.array([3.0, 4.0])]) == 5.0
    assert ref.global_norm([]) == 0.0


def test_float32_inputs_give_float64(rand):
    x = rand.normal(3, 8).astype(np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    out, mean, rstd = ref.layernorm_forward(x, w, b)
    assert out.dtype == mean.dtype == rstd.dtype == np.float64
    out, _ = ref.linear_forward(x, rand.normal(5, 8).astype(np.float32))
    assert out.dtype == np.float64
    out, lse = ref.attention_forward(rand.normal(1, 3, 12).astype(np.float32), 2)
    assert out.dtype == lse.dtype == np.float64
