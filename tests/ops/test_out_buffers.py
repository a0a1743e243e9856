"""out= buffers: every op can write into caller-allocated buffers, with the same result as when it
allocates, and refuses buffers of the wrong shape, dtype or device, read-only ones, and ones that
share memory with an input or another output."""

import numpy as np
import pytest

import gptcore
from gptcore import ops


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _empty_like(t):
    return gptcore.empty(list(t.shape), t.dtype, "cpu")


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _check_written(got, buf):
    """The op returned the very buffer it was given."""
    assert got.data_ptr() == buf.data_ptr()


# Each case: (name, function (rng, out) -> result tuple, number of outputs)
def _cases(rng):
    B, T, C, H, V = 2, 5, 12, 3, 37
    x, res = _f32(rng, B, T, C), _f32(rng, B, T, C)
    w, b = _f32(rng, C), _f32(rng, C)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = _f32(rng, V, C), _f32(rng, T + 3, C)
    W, bias = _f32(rng, 7, C), _f32(rng, 7)
    qkv = _f32(rng, B, T, 3 * C)
    _, mean, rstd = ops.layernorm_forward(x, w, b)
    dout = _f32(rng, B, T, C)
    att, lse = ops.attention_forward(qkv, H)
    logits = _f32(rng, B, T, V)
    tgt = rng.integers(0, V, (B, T)).astype(np.int32)
    dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)
    dW = np.zeros((7, C), np.float32)
    kc = np.zeros((B, H, 8, C // H), np.float32)
    vc = np.zeros((B, H, 8, C // H), np.float32)

    def one(r):
        return r if isinstance(r, tuple) else (r,)

    return [
        ("embedding_forward", lambda out: one(ops.embedding_forward(idx, wte, wpe, out=out)), 1),
        ("layernorm_forward", lambda out: ops.layernorm_forward(x, w, b, out=out), 3),
        ("layernorm_backward",
         lambda out: one(ops.layernorm_backward(dout, x, mean, rstd, dresidual=res, weight=w,
                                                dweight=dw.copy(), dbias=db.copy(), out=out)), 1),
        ("residual_layernorm_forward", lambda out: ops.residual_layernorm_forward(x, res, w, b, out=out), 4),
        ("residual_layernorm_backward",
         lambda out: one(ops.residual_layernorm_backward(dout, x, mean, rstd, dsum=res, weight=w,
                                                         dweight=dw.copy(), dbias=db.copy(),
                                                         out=out)), 1),
        ("linear_forward", lambda out: ops.linear_forward(x, W, bias, gelu=True, out=out), 2),
        ("linear_backward",
         lambda out: one(ops.linear_backward(_f32(np.random.default_rng(1), B, T, 7), x, weight=W,
                                             dweight=dW.copy(), out=out)), 1),
        ("attention_forward", lambda out: ops.attention_forward(qkv, H, out=out), 2),
        ("attention_kvcache", lambda out: one(ops.attention_kvcache(qkv, kc.copy(), vc.copy(), 0, H, out=out)), 1),
        ("cross_entropy_forward", lambda out: one(ops.cross_entropy_forward(logits, tgt, out=out)), 1),
        ("cross_entropy_forward_backward",
         lambda out: ops.cross_entropy_forward_backward(logits, tgt, out=out), 2),
    ]


@pytest.mark.parametrize("case", range(11))
def test_out_equals_allocated(rng, case):
    name, fn, n = _cases(rng)[case]
    fresh = fn(None)
    bufs = [_empty_like(t) for t in fresh]
    for buf in bufs:  # poison, so an unwritten element shows
        buf.numpy()[...] = np.nan if buf.dtype == "float32" else -7
    got = fn(bufs[0] if n == 1 else tuple(bufs))
    assert len(got) == n, name
    for g, f, buf in zip(got, fresh, bufs):
        _check_written(g, buf)
        _same(g, f)


@pytest.mark.parametrize("case", range(11))
def test_out_partial_tuple_and_bad_buffers(rng, case):
    name, fn, n = _cases(rng)[case]
    fresh = fn(None)
    first = fresh[0]
    # wrong shape
    bad = gptcore.empty([*first.shape[:-1], first.shape[-1] + 1], first.dtype, "cpu")
    with pytest.raises(ValueError, match="expected shape"):
        fn(bad if n == 1 else (bad,) + (None,) * (n - 1))
    # wrong dtype
    other = "int32" if first.dtype == "float32" else "float32"
    bad = gptcore.empty(list(first.shape), other, "cpu")
    with pytest.raises(TypeError, match="buffer"):
        fn(bad if n == 1 else (bad,) + (None,) * (n - 1))
    # read-only array
    ro = np.zeros(first.shape, np.asarray(first).dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn(ro if n == 1 else (ro,) + (None,) * (n - 1))
    if n > 1:
        # a tuple of the wrong length, and a partial tuple (None entries are allocated)
        with pytest.raises(TypeError, match="tuple"):
            fn((None,) * (n + 1))
        buf = _empty_like(first)
        got = fn((buf,) + (None,) * (n - 1))
        _check_written(got[0], buf)
        for g, f in zip(got, fresh):
            _same(g, f)
        # two outputs sharing one buffer (where two outputs have the same shape)
        same = [i for i in range(1, n) if tuple(fresh[i].shape) == tuple(first.shape)
                and fresh[i].dtype == first.dtype]
        if same:
            outs = [None] * n
            outs[0] = outs[same[0]] = _empty_like(first)
            with pytest.raises(ValueError, match="overlaps the output"):
                fn(tuple(outs))


def test_out_overlapping_input_is_refused(rng):
    x = _f32(rng, 4, 6)
    w, b = np.ones(6, np.float32), np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="overlaps the input x"):
        ops.layernorm_forward(x, w, b, out=(x, None, None))
    W = _f32(rng, 6, 6)
    with pytest.raises(ValueError, match="overlaps the input x"):
        ops.linear_forward(x, W, out=x)
    # a view into part of the input counts too
    big = gptcore.tensor(_f32(rng, 8, 6))
    with pytest.raises(ValueError, match="overlaps the input"):
        ops.linear_forward(big.narrow(0, 4), W, out=big.narrow(2, 4))
    # adjacent, non-overlapping slices of one buffer are fine
    got, _ = ops.linear_forward(big.narrow(0, 4), W, out=big.narrow(4, 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(big.numpy())[:4] @ W.T, rtol=1e-5, atol=1e-5)


def test_out_rules_specific_to_ops(rng):
    x = _f32(rng, 3, 5)
    W = _f32(rng, 4, 5)
    with pytest.raises(ValueError, match="pre"):
        ops.linear_forward(x, W, gelu=False, out=(None, gptcore.empty([3, 4], "float32", "cpu")))
    with pytest.raises(ValueError, match="need_dx"):
        ops.linear_backward(_f32(rng, 3, 4), x, weight=W, need_dx=False,
                            dweight=np.zeros((4, 5), np.float32),
                            out=gptcore.empty([3, 5], "float32", "cpu"))
    logits = _f32(rng, 3, 9)
    tgt = np.array([1, 2, 3], np.int32)
    with pytest.raises(ValueError, match="inplace"):
        ops.cross_entropy_forward_backward(logits, tgt, inplace=True,
                                           out=(None, gptcore.empty([3, 9], "float32", "cpu")))
    qkv = _f32(rng, 1, 4, 6)
    att, lse = ops.attention_forward(qkv, 2)
    dqkv = gptcore.empty([1, 4, 6], "float32", "cpu")
    d_att = _f32(rng, 1, 4, 2)
    got = ops.attention_backward(d_att, qkv, att, lse, 2, dqkv=dqkv)
    _check_written(got, dqkv)
    _same(got, ops.attention_backward(d_att, qkv, att, lse, 2))
    with pytest.raises(ValueError, match="overlaps the input qkv"):
        ops.attention_backward(_f32(rng, 1, 4, 2), qkv, att, lse, 2, dqkv=qkv)
    with pytest.raises(TypeError, match="one buffer"):
        ops.embedding_forward(np.zeros((1, 2), np.int32), _f32(rng, 3, 4), _f32(rng, 2, 4), out=(None,))
