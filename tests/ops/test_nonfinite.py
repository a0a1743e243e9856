"""NaN and +-inf propagate through every CPU op as they do through the float64 reference.

For each op, a NaN, +inf or -inf is put into one element of each input in turn, and the op's
outputs must have NaN and inf in exactly the reference's places (same sign for inf) and agree
elsewhere. (The reference matches PyTorch here: a NaN logit gives a NaN loss, an inf in q a NaN
attention row.) Dropout is the documented exception to propagation: a dropped element is 0,
even when it held inf or NaN, on every backend and in the reference.

Where a value is placed matters for attention only: a key/value position the query cannot see
enters the dense products with probability 0, and 0 * inf is NaN in the reference's (and the
kernels' tile-wide) matrix products, so q, dout and out are poked at the last position (which
sees every key) and k, v at position 0 (which every query sees; with a window no position is,
so there only q and k are poked: a k outside the window never enters, its score is masked).
"""

import numpy as np
import pytest

from gptcore import ops
from gptcore import reference as ref

VALUES = [np.nan, np.inf, -np.inf]
VAL_IDS = ["nan", "+inf", "-inf"]
# Sizes that cross the kernels' blocks: cross-entropy's 256-wide blocks, attention's 64-row tiles.
B, T, C, H, V = 2, 70, 32, 2, 300


def _rng():
    return np.random.default_rng(1234)


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def poke(a, where, val):
    a = np.array(a, dtype=np.float32, copy=True)
    a[where] = val
    return a


def assert_same_nonfinite(got, want, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    gn, wn = np.isnan(got), np.isnan(want)
    assert (gn == wn).all(), (f"{what}: NaN at {np.argwhere(gn & ~wn)[:3].tolist()} (kernel only), "
                              f"{np.argwhere(wn & ~gn)[:3].tolist()} (reference only)")
    gi, wi = np.isinf(got), np.isinf(want)
    assert (gi == wi).all() and (got[gi] == want[wi]).all(), f"{what}: infinities differ"
    fin = ~(gn | gi)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-3, atol=2e-4, err_msg=what)


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_layernorm_forward(val, which):
    rng = _rng()
    args = dict(x=f32(rng, B, T, C), weight=f32(rng, C), bias=f32(rng, C))
    args[which] = poke(args[which], (0, 3, 5) if which == "x" else 5, val)
    got = ops.layernorm_forward(args["x"], args["weight"], args["bias"])
    with np.errstate(all="ignore"):
        want = ref.layernorm_forward(args["x"], args["weight"], args["bias"])
    for g, w, n in zip(got, want, ["out", "mean", "rstd"]):
        assert_same_nonfinite(g, w, n)


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("which", ["x", "residual"])
def test_residual_layernorm_forward(val, which):
    rng = _rng()
    args = dict(x=f32(rng, B, T, C), residual=f32(rng, B, T, C))
    args[which] = poke(args[which], (1, 2, 3), val)
    w, b = f32(rng, C), f32(rng, C)
    got = ops.residual_layernorm_forward(args["x"], args["residual"], w, b)
    with np.errstate(all="ignore"):
        want = ref.residual_layernorm_forward(args["x"], args["residual"], w, b)
    for g, r, n in zip(got, want, ["sum", "out", "mean", "rstd"]):
        assert_same_nonfinite(g, r, n)


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("which", ["dout", "x", "mean", "rstd", "weight", "dresidual"])
def test_layernorm_backward(val, which):
    rng = _rng()
    x, w = f32(rng, B, T, C), f32(rng, C)
    _, mean, rstd = ref.layernorm_forward(x, w, np.zeros(C))
    args = dict(dout=f32(rng, B, T, C), x=x, mean=mean.astype(np.float32),
                rstd=rstd.astype(np.float32), weight=w, dresidual=f32(rng, B, T, C))
    args[which] = poke(args[which], (0, 4, 2)[:args[which].ndim], val)
    dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)
    dx = ops.layernorm_backward(args["dout"], args["x"], args["mean"], args["rstd"],
                                dresidual=args["dresidual"], weight=args["weight"],
                                dweight=dw, dbias=db)
    with np.errstate(all="ignore"):
        want = ref.layernorm_backward(args["dout"], args["x"], args["mean"], args["rstd"],
                                      dresidual=args["dresidual"], weight=args["weight"])
    for g, r, n in zip((dx, dw, db), want, ["dx", "dweight", "dbias"]):
        assert_same_nonfinite(g, r, n)


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_linear_forward(val, gelu, which):
    rng = _rng()
    args = dict(x=f32(rng, B, T, C, scale=0.3), weight=f32(rng, 24, C, scale=0.3),
                bias=f32(rng, 24))
    args[which] = poke(args[which], {"x": (0, 5, 3), "weight": (7, 3), "bias": 7}[which], val)
    got = ops.linear_forward(args["x"], args["weight"], args["bias"], gelu)
    with np.errstate(all="ignore"):
        want = ref.linear_forward(args["x"], args["weight"], args["bias"], gelu)
    assert_same_nonfinite(got[0], want[0], "out")
    if gelu:
        assert_same_nonfinite(got[1], want[1], "pre")


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("which", ["dout", "x", "weight", "pre"])
def test_linear_backward(val, gelu, which):
    if which == "pre" and not gelu:
        pytest.skip("pre exists only with gelu")
    rng = _rng()
    # small values: GELU's derivative stays well away from underflow (where float32 and the
    # float64 reference legitimately differ between 0 and a denormal, and so 0*inf vs inf)
    x, w = f32(rng, B, T, C, scale=0.3), f32(rng, 24, C, scale=0.3)
    args = dict(dout=f32(rng, B, T, 24), x=x, weight=w,
                pre=ref.linear_forward(x, w)[0].astype(np.float32))
    args[which] = poke(args[which], {"dout": (0, 5, 7), "x": (0, 5, 3), "weight": (7, 3),
                                     "pre": (0, 5, 7)}[which], val)
    pre = args["pre"] if gelu else None
    dw, db = np.zeros_like(w), np.zeros(24, np.float32)
    dx = ops.linear_backward(args["dout"], args["x"], pre=pre, weight=args["weight"],
                             dweight=dw, dbias=db)
    with np.errstate(all="ignore"):
        want = ref.linear_backward(args["dout"], args["x"], pre=pre, weight=args["weight"])
    for g, r, n in zip((dx, dw, db), want, ["dx", "dweight", "dbias"]):
        assert_same_nonfinite(g, r, n)


# q at the last position (it sees every key), k and v at position 0 (every query sees it).
QKV_PLACES = [("q", (0, T - 1, 1)), ("k", (0, 0, C + 1)), ("v", (1, 0, 2 * C + 3))]


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("where", [p[1] for p in QKV_PLACES], ids=[p[0] for p in QKV_PLACES])
def test_attention_forward(val, window, where):
    if window and where[2] >= 2 * C:
        pytest.skip("with a window no value position is seen by every query (see the docstring)")
    qkv = poke(f32(_rng(), B, T, 3 * C), where, val)
    out, lse = ops.attention_forward(qkv, H, window)
    with np.errstate(all="ignore"):
        r_out, r_lse = ref.attention_forward(qkv, H, window)
    assert_same_nonfinite(out, r_out, "out")
    assert_same_nonfinite(lse, r_lse, "lse")


def test_attention_forward_inf_in_q_is_nan_not_one():
    # the example: an inf in q gave a finite row (1.0) where softmax(inf - inf) is NaN
    qkv = np.zeros((1, 2, 6), np.float32)
    qkv[0, :, 4:] = 1.0  # v
    qkv[0, 1, 0] = np.inf
    qkv[0, :, 2] = 1.0  # k
    out, lse = ops.attention_forward(qkv, 1)
    assert np.isfinite(np.asarray(out)[0, 0]).all()
    assert np.isnan(np.asarray(out)[0, 1]).all() and not np.isfinite(np.asarray(lse)[0, 0, 1])


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("which", ["dout", "q", "k", "v", "out", "lse"])
def test_attention_backward(val, which):
    rng = _rng()
    qkv, dout = f32(rng, B, T, 3 * C), f32(rng, B, T, C)
    out, lse = ref.attention_forward(qkv, H)
    out, lse = out.astype(np.float32), lse.astype(np.float32)
    if which in ("q", "k", "v"):
        qkv = poke(qkv, dict((p[0], p[1]) for p in QKV_PLACES)[which], val)
    elif which == "lse":
        lse = poke(lse, (0, 1, T - 1), val)
    else:
        where = (0, T - 1, 3)
        dout, out = (poke(dout, where, val), out) if which == "dout" else (dout, poke(out, where, val))
    got = ops.attention_backward(dout, qkv, out, lse, H)
    with np.errstate(all="ignore"):
        want = ref.attention_backward(dout, qkv, out, lse, H)
    assert_same_nonfinite(got, want, "dqkv")


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("pos", [0, 5])
@pytest.mark.parametrize("part", ["q", "k", "v", "k_cache", "v_cache"])
def test_attention_kvcache(val, pos, part):
    rng = _rng()
    Tn, Tmax, D = 4, 12, C // H
    qkv = f32(rng, B, Tn, 3 * C)
    kc, vc = f32(rng, B, H, Tmax, D), f32(rng, B, H, Tmax, D)
    if part == "q":
        qkv = poke(qkv, (0, 2, 1), val)
    elif part in ("k", "v"):
        qkv = poke(qkv, (1, 1, (C if part == "k" else 2 * C) + 2), val)  # a new token's k or v
    else:
        cache = kc if part == "k_cache" else vc
        cache[0, 1, 1, 3] = val  # an old position every new token sees
    with np.errstate(all="ignore"):
        want, want_k, want_v = ref.attention_kvcache(qkv, kc, vc, pos, H)
    got = ops.attention_kvcache(qkv, kc, vc, pos, H)
    assert_same_nonfinite(got, want, "out")
    assert_same_nonfinite(kc, want_k, "k_cache")
    assert_same_nonfinite(vc, want_v, "v_cache")


CE_PLACES = [("other class", (0, 7)), ("target class", (0, 3)), ("padding column", (0, V + 2)),
             ("ignored row", (2, 7)), ("second block", (1, 290))]


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("where", [p[1] for p in CE_PLACES], ids=_ids(CE_PLACES))
def test_cross_entropy(val, where):
    logits = poke(f32(_rng(), 4, V + 4), where, val)
    targets = np.array([3, 5, -1, 0], np.int64)
    losses = ops.cross_entropy_forward(logits, targets, V)
    losses2, dlogits = ops.cross_entropy_forward_backward(logits, targets, V)
    with np.errstate(all="ignore"):
        want, want_d = ref.cross_entropy_forward_backward(logits, targets, V)
    assert_same_nonfinite(losses, want, "losses")
    assert_same_nonfinite(losses2, want, "losses (fused)")
    assert_same_nonfinite(dlogits, want_d, "dlogits")


def test_cross_entropy_nan_logit_gives_nan_loss():
    # the example: two classes, one NaN logit, used to give log(2) = 0.693
    losses = ops.cross_entropy_forward(np.array([[np.nan, 0.0]], np.float32), np.array([1]))
    assert np.isnan(np.asarray(losses)).all()


def test_cross_entropy_banned_logits_stay_finite():
    # -inf among finite logits (a banned class) is legitimate: exp(-inf) = 0 adds nothing
    logits = np.full((1, 600), -np.inf, np.float32)
    logits[0, 400] = 1.0
    losses, d = ops.cross_entropy_forward_backward(logits, np.array([400]))
    assert np.asarray(losses)[0] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(np.asarray(d)).all()


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("which", ["wte", "wpe"])
def test_embedding_forward(val, which):
    rng = _rng()
    wte, wpe = f32(rng, V, C), f32(rng, T, C)
    idx = rng.integers(0, V, (B, T))
    idx[0, 0] = 3
    if which == "wte":
        wte = poke(wte, (3, 1), val)
    else:
        wpe = poke(wpe, (5, 1), val)
    assert_same_nonfinite(ops.embedding_forward(idx, wte, wpe),
                          ref.embedding_forward(idx, wte, wpe), "out")


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
def test_embedding_backward(val):
    rng = _rng()
    idx = rng.integers(0, V, (B, T))
    dout = poke(f32(rng, B, T, C), (1, 4, 2), val)
    dwte, dwpe = np.zeros((V, C), np.float32), np.zeros((T, C), np.float32)
    ops.embedding_backward(dout, idx, dwte, dwpe)
    with np.errstate(all="ignore"):
        want = ref.embedding_backward(dout, idx, V, T)
    assert_same_nonfinite(dwte, want[0], "dwte")
    assert_same_nonfinite(dwpe, want[1], "dwpe")


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
def test_dropout(val):
    x = poke(f32(_rng(), 256), slice(0, 256, 3), val)
    with np.errstate(all="ignore"):
        assert_same_nonfinite(ops.dropout_forward(x, 0.5, 7, 1), ref.dropout_forward(x, 0.5, 7, 1),
                              "out")
        assert_same_nonfinite(ops.dropout_backward(x, 0.5, 7, 1), ref.dropout_backward(x, 0.5, 7, 1),
                              "dx")


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
@pytest.mark.parametrize("which", ["param", "grad", "m", "v"])
def test_adamw_step(val, which):
    rng = _rng()
    state = dict(param=f32(rng, 33), grad=f32(rng, 33), m=f32(rng, 33, scale=0.1),
                 v=np.abs(f32(rng, 33, scale=0.1)))
    state[which] = poke(state[which], 4, val)
    with np.errstate(all="ignore"):
        want = ref.adamw_step(state["param"], state["grad"], state["m"], state["v"], lr=1e-2,
                              step=3, weight_decay=0.1)
    ops.adamw_step([state["param"]], [state["grad"]], [state["m"]], [state["v"]], lr=1e-2, step=3,
                   weight_decay=0.1)
    for n, r in zip(["param", "m", "v"], want):
        assert_same_nonfinite(state[n], r, n)


@pytest.mark.parametrize("val", VALUES, ids=VAL_IDS)
def test_global_norm(val):
    rng = _rng()
    ts = [f32(rng, 100), poke(f32(rng, 50), 7, val), f32(rng, 3)]
    got, want = ops.global_norm(ts), ref.global_norm(ts)
    assert (np.isnan(got) and np.isnan(want)) or got == want
