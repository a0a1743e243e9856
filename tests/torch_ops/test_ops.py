"""gptcore.torch's custom ops checked the way PyTorch checks operators.

* ``torch.library.opcheck`` on every forward and backward op (schema, autograd registration,
  fake tensors, AOT dispatch with dynamic shapes), on inputs that do and do not require grad.
* ``torch.autograd.gradcheck`` (finite differences) through each public function. The kernels
  are float32 only (there is no float64 kernel to check in double precision), so gradcheck runs
  in float32 with a step of 1e-2 and tolerances of a few 1e-2 -- loose, but a wrong formula,
  a missing term or a transposed gradient is off by O(1).
* Values and gradients against PyTorch's own functions (``scaled_dot_product_attention``,
  ``layer_norm``, ``linear`` + ``gelu``, ``cross_entropy``, ``embedding``) at float32 precision.
* The known traps: ignore_index under ``torch.compile``, non-contiguous inputs, only some inputs
  requiring grad.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gptcore.torch as gt
from gptcore.torch import ops as gops
from tests.helpers import fresh_seed


@pytest.fixture
def gen():
    """A torch generator with a fresh seed per test (printed; replay with GPTCORE_TEST_SEED)."""
    seed = fresh_seed()
    print(f"torch seed = {seed} (replay with GPTCORE_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, grad=False, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).requires_grad_(grad)


def close(name, got, want, tol=2e-5):
    """Relative L2 error of got against PyTorch's want."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g, allow_unused=False)


def gradcheck(fn, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "input is not double precision": known, see module doc
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=3e-2, rtol=3e-2,
                                         fast_mode=True)


def sdpa_ref(qkv, n_head, window=None):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, -1))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if window is not None:
        mask &= ~torch.ones(T, T, dtype=torch.bool).tril(-window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C)


# ---- values against PyTorch ---------------------------------------------------------------------


@pytest.mark.parametrize("B,T,H,D,window", [(2, 13, 2, 8, None), (1, 1, 1, 16, None),
                                            (3, 37, 4, 16, None), (2, 29, 2, 8, 5)])
def test_attention_matches_sdpa(gen, B, T, H, D, window):
    qkv = randn(gen, B, T, 3 * H * D, grad=True)
    out = gt.attention(qkv, H, window)
    want = sdpa_ref(qkv, H, window)
    close("out", out, want)
    g = randn(gen, *out.shape)
    close("dqkv", grads(out, [qkv], g)[0], grads(want, [qkv], g)[0])


def test_attention_separate_qkv_matches_sdpa(gen):
    B, T, H, D = 2, 11, 3, 8
    q, k, v = (randn(gen, B, T, H, D, grad=True) for _ in range(3))
    out = gt.attention_qkv(q, k, v)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                          is_causal=True).transpose(1, 2)
    close("out", out, want)
    g = randn(gen, *out.shape)
    for name, a, b in zip("qkv", grads(out, [q, k, v], g), grads(want, [q, k, v], g)):
        close(f"d{name}", a, b)


def test_attention_dropout_is_a_regenerated_mask(gen):
    """With dropout the output is seeded (same seed, same output; another seed, another one) and
    the gradient is that of the same masked function (checked by finite differences)."""
    qkv = randn(gen, 1, 9, 3 * 16, grad=True)
    a = gt.attention(qkv, 2, dropout_p=0.3, seed=7)
    b = gt.attention(qkv, 2, dropout_p=0.3, seed=7)
    c = gt.attention(qkv, 2, dropout_p=0.3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, gt.attention(qkv, 2))
    gradcheck(lambda t: gt.attention(t, 2, dropout_p=0.3, seed=7), (qkv,))


@pytest.mark.parametrize("shape", [(5, 32), (2, 7, 48)])
def test_layer_norm_matches_torch(gen, shape):
    C = shape[-1]
    x, w, b = randn(gen, *shape, grad=True), randn(gen, C, grad=True), randn(gen, C, grad=True)
    out, want = gt.layer_norm(x, w, b), F.layer_norm(x, (C,), w, b, 1e-5)
    close("out", out, want)
    g = randn(gen, *shape)
    for name, a, r in zip(["dx", "dw", "db"], grads(out, [x, w, b], g), grads(want, [x, w, b], g)):
        close(name, a, r)


def test_residual_layer_norm_matches_torch(gen):
    C = 40
    x, res = randn(gen, 2, 9, C, grad=True), randn(gen, 2, 9, C, grad=True)
    w, b = randn(gen, C, grad=True), randn(gen, C, grad=True)
    s, out = gt.residual_layer_norm(x, res, w, b)
    s_ref = x + res
    out_ref = F.layer_norm(s_ref, (C,), w, b)
    close("sum", s, s_ref)
    close("out", out, out_ref)
    gs, go = randn(gen, *s.shape), randn(gen, *s.shape)
    got = torch.autograd.grad([s, out], [x, res, w, b], [gs, go])
    want = torch.autograd.grad([s_ref, out_ref], [x, res, w, b], [gs, go])
    for name, a, r in zip(["dx", "dresidual", "dw", "db"], got, want):
        close(name, a, r)


def test_residual_layer_norm_with_one_output_used(gen):
    """Only the sum, or only the normalised output, reaches the loss: the unused output's
    gradient is absent (not zero-filled) and the gradients are still PyTorch's."""
    C = 24
    x, r = randn(gen, 3, 5, C, grad=True), randn(gen, 3, 5, C, grad=True)
    w, b = randn(gen, C, grad=True), randn(gen, C, grad=True)
    s, _ = gt.residual_layer_norm(x, r, w, b)
    g = randn(gen, 3, 5, C)
    dx, dr = torch.autograd.grad(s, [x, r], g)
    close("dx (sum only)", dx, g)
    close("dr (sum only)", dr, g)
    got = torch.autograd.grad(gt.residual_layer_norm(x, r, w, b)[1], [x, r, w, b], g)
    want = torch.autograd.grad(F.layer_norm(x + r, (C,), w, b), [x, r, w, b], g)
    for name, a_, e in zip(["dx", "dr", "dw", "db"], got, want):
        close(name + " (out only)", a_, e)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(gen, gelu, bias):
    x, w = randn(gen, 3, 5, 24, grad=True), randn(gen, 40, 24, grad=True, scale=0.2)
    b = randn(gen, 40, grad=True) if bias else None
    out = (gt.linear_gelu if gelu else gt.linear)(x, w, b)
    want = F.linear(x, w, b)
    if gelu:
        want = F.gelu(want, approximate="tanh")
    close("out", out, want)
    g = randn(gen, *out.shape)
    inputs = [x, w] + ([b] if bias else [])
    for a, r in zip(grads(out, inputs, g), grads(want, inputs, g)):
        close("grad", a, r)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(gen, reduction):
    N, V = 23, 77
    logits = randn(gen, N, V, grad=True, scale=3.0)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::4] = -100
    got = gt.cross_entropy(logits, targets, reduction=reduction)
    want = F.cross_entropy(logits, targets, reduction=reduction)
    close("loss", got, want)
    g = randn(gen, *got.shape)
    close("dlogits", grads(got, [logits], g)[0], grads(want, [logits], g)[0])


def test_cross_entropy_class_dim_last_and_custom_ignore_index(gen):
    B, T, V = 2, 6, 31
    logits = randn(gen, B, T, V, grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, :3] = -1
    got = gt.cross_entropy(logits, targets, ignore_index=-1)
    want = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    close("loss", got, want)
    close("dlogits", grads(got, [logits], None)[0], grads(want, [logits], None)[0])
    with torch.no_grad():  # the forward-only op
        close("loss (no grad)", gt.cross_entropy(logits, targets, ignore_index=-1), want)


def test_cross_entropy_all_ignored_is_nan_like_torch():
    logits = torch.randn(4, 10, requires_grad=True)
    targets = torch.full((4,), -100)
    assert torch.isnan(gt.cross_entropy(logits, targets)) and \
        torch.isnan(F.cross_entropy(logits, targets))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_linear_cross_entropy_matches_unfused(gen, reduction, chunk):
    N, K, V = 13, 16, 57
    x, w = randn(gen, N, K, grad=True), randn(gen, V, K, grad=True, scale=0.3)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[2] = -100
    got = gt.linear_cross_entropy(x, w, targets, reduction=reduction, chunk=chunk)
    want = F.cross_entropy(F.linear(x, w), targets, reduction=reduction)
    close("loss", got, want)
    for name, a, r in zip(["dx", "dw"], grads(got * 1.7, [x, w], None),
                          grads(want * 1.7, [x, w], None)):
        close(name, a, r)


def test_embedding_matches_torch(gen):
    V, C, P, B, T = 50, 16, 12, 3, 9
    wte, wpe = randn(gen, V, C, grad=True), randn(gen, P, C, grad=True)
    idx = torch.randint(0, V, (B, T), generator=gen)
    idx[0, :4] = 3  # repeated ids accumulate
    out = gt.embedding(idx, wte, wpe)
    want = F.embedding(idx, wte) + wpe[:T]
    close("out", out, want)
    g = randn(gen, *out.shape)
    for name, a, r in zip(["dwte", "dwpe"], grads(out, [wte, wpe], g), grads(want, [wte, wpe], g)):
        close(name, a, r)


def test_dropout_uses_gptcores_generator(gen):
    """dropout, residual dropout and embedding dropout apply gptcore.reference's mask for
    (p, seed, stream), and their gradients go through the same mask."""
    from gptcore import reference

    p, seed, stream = 0.3, 11, 5
    x = randn(gen, 3, 7, 16, grad=True)
    keep = torch.from_numpy(reference.dropout_mask(tuple(x.shape), p, seed, stream)
                            .astype("float32"))
    scale = 1.0 / (1.0 - p)
    close("dropout", gt.dropout(x, p, seed, stream), x * keep * scale, tol=1e-6)
    r, w, b = randn(gen, 3, 7, 16, grad=True), randn(gen, 16, grad=True), randn(gen, 16, grad=True)
    s, out = gt.residual_layer_norm(x, r, w, b, dropout_p=p, seed=seed, stream=stream)
    s_ref = x * keep * scale + r
    out_ref = F.layer_norm(s_ref, (16,), w, b)
    close("sum", s, s_ref)
    close("out", out, out_ref)
    gs, go = randn(gen, *s.shape), randn(gen, *s.shape)
    for a, e in zip(torch.autograd.grad([s, out], [x, r, w, b], [gs, go]),
                    torch.autograd.grad([s_ref, out_ref], [x, r, w, b], [gs, go])):
        close("grad", a, e)
    wte, wpe = randn(gen, 30, 16, grad=True), randn(gen, 9, 16, grad=True)
    idx = torch.randint(0, 30, (3, 7), generator=gen)
    e = gt.embedding(idx, wte, wpe, dropout_p=p, seed=seed, stream=stream)
    e_ref = (F.embedding(idx, wte) + wpe[:7]) * keep * scale
    close("embedding", e, e_ref)
    ge = randn(gen, *e.shape)
    for a, r_ in zip(torch.autograd.grad(e, [wte, wpe], ge),
                     torch.autograd.grad(e_ref, [wte, wpe], ge)):
        close("embedding grad", a, r_)
    # seed and stream may be tensors (a model's step counter)
    assert torch.equal(gt.dropout(x, p, torch.tensor(seed), torch.tensor(stream)),
                       gt.dropout(x, p, seed, stream))
    gradcheck(lambda t: gt.dropout(t, p, seed, stream), (x,))
    gradcheck(lambda t, u: gt.residual_layer_norm(t, u, w, b, dropout_p=p, seed=1, stream=2),
              (randn(gen, 2, 3, 16, grad=True), randn(gen, 2, 3, 16, grad=True)))


# ---- traps --------------------------------------------------------------------------------------


def test_non_contiguous_inputs(gen):
    """Transposed / sliced inputs give the same values and gradients as contiguous copies."""
    xt = randn(gen, 24, 2, 7, grad=True)  # used as (2, 7, 24).T-like view
    x = xt.permute(1, 2, 0)
    assert not x.is_contiguous()
    wt = randn(gen, 24, 40, grad=True, scale=0.2)
    w = wt.t()
    b = randn(gen, 80, grad=True)[::2]
    out = gt.linear_gelu(x, w, b)
    want = F.gelu(F.linear(x, w, b), approximate="tanh")
    close("linear", out, want)
    g = randn(gen, *out.shape)
    for a, r in zip(grads(out, [xt, wt], g), grads(want, [xt, wt], g)):
        close("linear grad", a, r)
    ln_w = randn(gen, 48, grad=True)[::2]
    close("layer_norm", gt.layer_norm(x, ln_w, b[:24]), F.layer_norm(x, (24,), ln_w, b[:24]))
    qkv = randn(gen, 2, 3 * 16, 9, grad=True).transpose(1, 2)
    close("attention", gt.attention(qkv, 2), sdpa_ref(qkv, 2))
    logits = randn(gen, 31, 8, grad=True).t()
    targets = torch.randint(0, 31, (16,), generator=gen)[::2]
    close("cross_entropy", gt.cross_entropy(logits, targets), F.cross_entropy(logits, targets))


def test_requires_grad_on_only_some_inputs(gen):
    """A frozen weight gets no gradient, the inputs that need one get the right one."""
    x, w, b = randn(gen, 4, 5, 16, grad=False), randn(gen, 16, grad=True), randn(gen, 16)
    out = gt.layer_norm(x, w, b)
    g = randn(gen, *out.shape)
    (dw,) = torch.autograd.grad(out, [w], g)
    close("dw", dw, torch.autograd.grad(F.layer_norm(x, (16,), w, b), [w], g)[0])
    x2, W = randn(gen, 6, 16, grad=True), randn(gen, 8, 16)
    out = gt.linear(x2, W, None)
    out.sum().backward()
    assert W.grad is None
    close("dx", x2.grad, W.sum(0).expand(6, 16))
    wte, wpe = randn(gen, 20, 8), randn(gen, 9, 8, grad=True)
    e = gt.embedding(torch.randint(0, 20, (2, 9), generator=gen), wte, wpe)
    e.sum().backward()
    assert wte.grad is None and torch.allclose(wpe.grad, torch.full((9, 8), 2.0))
    # nothing requires grad: plain forward, no graph
    assert not gt.attention(randn(gen, 1, 4, 24), 2).requires_grad


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="float32"):
        gt.layer_norm(torch.randn(3, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                      torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="qkv"):
        gt.attention(torch.randn(2, 5, 10), 2)
    with pytest.raises(ValueError, match="targets"):
        gt.cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="reduction"):
        gt.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), reduction="avg")
    with pytest.raises(ValueError, match="idx"):
        gt.embedding(torch.tensor([[0, 99]]), torch.randn(10, 4), torch.randn(4, 4))


# ---- gradcheck ----------------------------------------------------------------------------------


def test_gradcheck_every_op(gen):
    C = 8
    x = randn(gen, 2, 3, C, grad=True)
    w, b = randn(gen, C, grad=True), randn(gen, C, grad=True)
    gradcheck(lambda x, w, b: gt.layer_norm(x, w, b), (x, w, b))
    r = randn(gen, 2, 3, C, grad=True)
    gradcheck(lambda x, r, w, b: gt.residual_layer_norm(x, r, w, b), (x, r, w, b))
    W, bias = randn(gen, 6, C, grad=True, scale=0.5), randn(gen, 6, grad=True)
    gradcheck(lambda x, W, bias: gt.linear(x, W, bias), (x, W, bias))
    gradcheck(lambda x, W, bias: gt.linear_gelu(x, W, bias), (x, W, bias))
    gradcheck(lambda qkv: gt.attention(qkv, 2), (randn(gen, 2, 5, 3 * C, grad=True),))
    gradcheck(lambda qkv: gt.attention(qkv, 2, 2), (randn(gen, 1, 6, 3 * C, grad=True),))
    targets = torch.tensor([1, -100, 4, 0, 5, 2])
    gradcheck(lambda lg: gt.cross_entropy(lg, targets), (randn(gen, 6, 7, grad=True),))
    gradcheck(lambda x, W: gt.linear_cross_entropy(x, W, targets, chunk=4),
              (randn(gen, 6, C, grad=True), randn(gen, 7, C, grad=True)))
    idx = torch.tensor([[1, 3, 1], [0, 2, 3]])
    gradcheck(lambda wte, wpe: gt.embedding(idx, wte, wpe),
              (randn(gen, 4, C, grad=True), randn(gen, 5, C, grad=True)))


# ---- opcheck ------------------------------------------------------------------------------------


def _opcheck_cases(gen):
    C, H = 16, 2
    x = randn(gen, 2, 5, C, grad=True)
    w, b = randn(gen, C, grad=True), randn(gen, C, grad=True)
    qkv = randn(gen, 2, 5, 3 * C, grad=True)
    out, lse = gops._attention_fwd(qkv.detach(), H, None, 0.0, None)
    rng = torch.tensor([5, 1])
    _, mean, rstd = gops._layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    W = randn(gen, 24, C, grad=True)
    pre = gops._linear_gelu_fwd(x.detach(), W.detach(), None)[1]
    logits = randn(gen, 10, 30, grad=True)
    targets = torch.randint(0, 30, (10,), generator=gen)
    targets[1] = -100
    idx = torch.randint(0, 30, (2, 5), generator=gen)
    wte, wpe = randn(gen, 30, C, grad=True), randn(gen, 8, C, grad=True)
    d = lambda t: randn(gen, *t.shape)
    return [
        (gops._attention_fwd, (qkv, H, None, 0.0, None)),
        (gops._attention_fwd, (qkv, H, 3, 0.25, rng)),
        (gops._attention_bwd, (d(out), qkv.detach(), out, lse, H, None, 0.0, None)),
        (gops._attention_bwd, (d(out), qkv.detach(), out, lse, H, 2, 0.25, rng)),
        (gops._dropout_fwd, (x, 0.3, rng)),
        (gops._dropout_bwd, (d(x), 0.3, rng)),
        (gops._layer_norm_fwd, (x, w, b, 1e-5)),
        (gops._layer_norm_bwd, (d(x), None, x.detach(), mean, rstd, w.detach())),
        (gops._layer_norm_bwd, (d(x), d(x), x.detach(), mean, rstd, w.detach())),
        (gops._residual_layer_norm_fwd, (x, randn(gen, 2, 5, C), w, b, 1e-5, 0.0, None)),
        (gops._residual_layer_norm_fwd, (x, randn(gen, 2, 5, C, grad=True), w, b, 1e-5, 0.2,
                                         rng)),
        (gops._linear_fwd, (x, W, randn(gen, 24, grad=True))),
        (gops._linear_fwd, (x.detach(), W, None)),
        (gops._linear_gelu_fwd, (x, W, randn(gen, 24))),
        (gops._linear_bwd, (d(pre), x.detach(), pre, W.detach(), True, True)),
        (gops._linear_bwd, (d(pre), x.detach(), None, W.detach(), False, False)),
        (gops._cross_entropy_fwd, (logits, targets, -100)),
        (gops._cross_entropy_loss, (logits.detach(), targets, -100)),
        (gops._linear_cross_entropy_fwd, (randn(gen, 10, C, grad=True),
                                          randn(gen, 30, C, grad=True), targets, -100, 4)),
        (gops._embedding_fwd, (idx, wte, wpe, 0.0, None)),
        (gops._embedding_fwd, (idx, wte, wpe, 0.1, rng)),
        (gops._embedding_bwd, (randn(gen, 2, 5, C), idx, wte.detach(), wpe.detach())),
    ]


def test_opcheck_every_op(gen):
    for op, args in _opcheck_cases(gen):
        torch.library.opcheck(op, args)


# ---- torch.compile --------------------------------------------------------------------------------


def test_compiled_cross_entropy_with_ignore_index_matches_eager(gen):
    """The mean over non-ignored positions is computed on the device; compiled and eager give
    the same loss and gradient (and PyTorch's)."""
    fn = torch.compile(lambda lg, t: gt.cross_entropy(lg, t), fullgraph=True, backend="aot_eager")
    logits = randn(gen, 12, 19, grad=True)
    targets = torch.randint(0, 19, (12,), generator=gen)
    targets[:5] = -100
    got = fn(logits, targets)
    want = F.cross_entropy(logits, targets)
    close("loss", got, want)
    close("dlogits", grads(got, [logits], None)[0], grads(want, [logits], None)[0])
    targets[5:9] = -100  # a different count of ignored positions: no stale constant
    close("loss, new mask", fn(logits, targets), F.cross_entropy(logits, targets))


def test_tensors_cross_without_a_copy():
    """torch -> gptcore views the same memory (CPU: NumPy's buffer), gptcore -> torch through
    DLPack too, and an op's output is the buffer torch allocated."""
    import gptcore

    x = torch.randn(3, 8)
    assert gops._g(x, "x").data_ptr() == x.data_ptr()
    ids = torch.tensor([[1, 2]])
    assert gops._g(ids, "ids").data_ptr() == ids.data_ptr()
    t = gptcore.zeros([2, 5])
    y = torch.from_dlpack(t)
    assert y.data_ptr() == t.data_ptr()
    y += 1.0  # one memory: gptcore sees the write
    assert float(t.numpy().sum()) == 10.0


def test_compile_fullgraph_every_public_function(gen):
    """Every public function traces into one graph (fullgraph: a graph break raises) and the
    compiled forward and backward equal eager."""
    B, T, H, D, V = 2, 6, 2, 8, 20
    C = H * D

    def fn(q, k, v, w, b, W, wte, wpe, idx, targets):
        x = gt.embedding(idx, wte, wpe)
        a = gt.attention_qkv(q, k, v, 3).reshape(B, T, C) + x
        s, h = gt.residual_layer_norm(a, x, w, b)
        h = gt.layer_norm(gt.linear_gelu(h, W, None), w, b) + s
        h = gt.attention(torch.cat([h, h, h], -1), H, dropout_p=0.1, seed=3)
        return (gt.cross_entropy(gt.linear(h, wte), targets)
                + gt.linear_cross_entropy(h.reshape(-1, C), wte, targets.reshape(-1), chunk=5))

    args = (randn(gen, B, T, H, D, grad=True), randn(gen, B, T, H, D, grad=True),
            randn(gen, B, T, H, D, grad=True), randn(gen, C, grad=True), randn(gen, C, grad=True),
            randn(gen, C, C, grad=True, scale=0.3), randn(gen, V, C, grad=True),
            randn(gen, T, C, grad=True), torch.randint(0, V, (B, T), generator=gen),
            torch.randint(0, V, (B, T), generator=gen))
    args[-1][0, :2] = -100
    leaves = [a for a in args if a.requires_grad]
    want = fn(*args)
    want_grads = torch.autograd.grad(want, leaves)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    close("loss", got, want, tol=1e-6)
    for a, r in zip(torch.autograd.grad(got, leaves), want_grads):
        close("grad", a, r, tol=1e-6)
