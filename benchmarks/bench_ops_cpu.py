"""CPU op benchmarks: gptcore's kernels against the NumPy reference, and sgemm against NumPy.

Every op is timed forward + backward at GPT-2 small shapes (C = 768, 12 heads, vocabulary
50257 padded to 50304) for B*T = 256 and 1024 token positions. Attention runs one sequence of
T = B*T tokens (B = 1), the costly case for a causal kernel.

* ``gptcore``: the CPU kernels on float32 inputs, through the public ``gptcore.ops`` API
  (outputs allocated by each call, parameter gradients accumulated into persistent buffers).
* ``reference``: :mod:`gptcore.reference`, which computes in float64 -- it is timed on float64
  inputs, as one uses the oracle, so it never pays for a cast inside the timing.
* ``numpy``: NumPy's float32 ``matmul`` (its own OpenBLAS, its own threads), for the sgemm rows.

Group names read ``<op> fwd+bwd | BT=<n>`` (or ``sgemm | <N>x<K> -> <M>``) with one entry per
implementation, so ``results_table.py`` can put each pair side by side.

    pytest benchmarks/bench_ops_cpu.py --benchmark-json=bench_cpu.json
    python benchmarks/results_table.py bench_cpu.json
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gptcore import ops
from gptcore import reference as ref

C, N_HEAD, V, VP, MAX_T = 768, 12, 50257, 50304, 1024
BTS = [256, 1024]
FUSED_TARGET = ">= 3x"  # the target for LayerNorm, attention, cross-entropy, AdamW

ROUNDS = {"gptcore": 20, "reference": 5, "numpy": 20}


def _rng():
    return np.random.default_rng(1234)


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _run(benchmark, fn, *, op, group, impl, size, target=None, rounds=None):
    benchmark.group = group
    benchmark.extra_info.update(op=op, impl=impl, size=size, target=target)
    # Let the previous benchmark's idle worker threads (NumPy's OpenBLAS pool spins ~0.1 s after
    # each call; OpenMP's briefly) go to sleep, so they do not steal a core from this one.
    time.sleep(0.5)
    benchmark.pedantic(fn, rounds=rounds or ROUNDS[impl], iterations=1, warmup_rounds=2)


# ---- op setups: each returns fn() running forward + backward ------------------------------------


def setup_embedding(impl, bt):
    rng = _rng()
    idx = rng.integers(0, V, size=(1, bt)).astype(np.int32)
    wte, wpe, dout = _f32(rng, V, C, scale=0.02), _f32(rng, MAX_T, C, scale=0.02), _f32(rng, 1, bt, C)
    if impl == "gptcore":
        dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)

        def fn():
            ops.embedding_forward(idx, wte, wpe)
            ops.embedding_backward(dout, idx, dwte, dwpe)
    else:
        wte, wpe, dout = wte.astype(np.float64), wpe.astype(np.float64), dout.astype(np.float64)

        def fn():
            ref.embedding_forward(idx, wte, wpe)
            ref.embedding_backward(dout, idx, V, MAX_T)
    return fn


def setup_layernorm(impl, bt):
    rng = _rng()
    x, w, b, dout = _f32(rng, bt, C), _f32(rng, C), _f32(rng, C), _f32(rng, bt, C)
    if impl == "gptcore":
        dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)

        def fn():
            _, mean, rstd = ops.layernorm_forward(x, w, b)
            ops.layernorm_backward(dout, x, mean, rstd, weight=w, dweight=dw, dbias=db)
    else:
        x, w, b, dout = (a.astype(np.float64) for a in (x, w, b, dout))

        def fn():
            _, mean, rstd = ref.layernorm_forward(x, w, b)
            ref.layernorm_backward(dout, x, mean, rstd, weight=w)
    return fn


def setup_residual_layernorm(impl, bt):
    rng = _rng()
    x, r, w, b = _f32(rng, bt, C), _f32(rng, bt, C), _f32(rng, C), _f32(rng, C)
    dout, dsum = _f32(rng, bt, C), _f32(rng, bt, C)
    if impl == "gptcore":
        dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)

        def fn():
            s, _, mean, rstd = ops.residual_layernorm_forward(x, r, w, b)
            ops.residual_layernorm_backward(dout, s, mean, rstd, dsum=dsum, weight=w, dweight=dw,
                                            dbias=db)
    else:
        x, r, w, b, dout, dsum = (a.astype(np.float64) for a in (x, r, w, b, dout, dsum))

        def fn():
            s, _, mean, rstd = ref.residual_layernorm_forward(x, r, w, b)
            ref.residual_layernorm_backward(dout, s, mean, rstd, dsum=dsum, weight=w)
    return fn


def _setup_linear(impl, bt, K, M, gelu):
    rng = _rng()
    x, w, b, dout = _f32(rng, bt, K), _f32(rng, M, K, scale=0.02), _f32(rng, M), _f32(rng, bt, M)
    if impl == "gptcore":
        dw, db = np.zeros_like(w), np.zeros_like(b)

        def fn():
            _, pre = ops.linear_forward(x, w, b, gelu=gelu)
            ops.linear_backward(dout, x, pre=pre, weight=w, dweight=dw, dbias=db)
    else:
        x, w, b, dout = (a.astype(np.float64) for a in (x, w, b, dout))

        def fn():
            _, pre = ref.linear_forward(x, w, b, gelu=gelu)
            ref.linear_backward(dout, x, pre=pre, weight=w)
    return fn


def setup_linear_fc_gelu(impl, bt):
    return _setup_linear(impl, bt, C, 4 * C, gelu=True)


def setup_linear_proj(impl, bt):
    return _setup_linear(impl, bt, 4 * C, C, gelu=False)


def setup_attention(impl, bt):
    rng = _rng()
    qkv, dout = _f32(rng, 1, bt, 3 * C), _f32(rng, 1, bt, C)
    if impl == "gptcore":
        def fn():
            out, lse = ops.attention_forward(qkv, N_HEAD)
            ops.attention_backward(dout, qkv, out, lse, N_HEAD)
    else:
        qkv, dout = qkv.astype(np.float64), dout.astype(np.float64)

        def fn():
            out, lse = ref.attention_forward(qkv, N_HEAD)
            ref.attention_backward(dout, qkv, out, lse, N_HEAD)
    return fn


def setup_attention_dropout(impl, bt):
    """Attention with GPT-2's attn_pdrop = 0.1 fused in (the mask regenerated in backward)."""
    rng = _rng()
    qkv, dout = _f32(rng, 1, bt, 3 * C), _f32(rng, 1, bt, C)
    kw = dict(dropout_p=0.1, seed=1, stream=2)
    if impl == "gptcore":
        def fn():
            out, lse = ops.attention_forward(qkv, N_HEAD, **kw)
            ops.attention_backward(dout, qkv, out, lse, N_HEAD, **kw)
    else:
        qkv, dout = qkv.astype(np.float64), dout.astype(np.float64)

        def fn():
            out, lse = ref.attention_forward(qkv, N_HEAD, **kw)
            ref.attention_backward(dout, qkv, out, lse, N_HEAD, **kw)
    return fn


def setup_dropout(impl, bt):
    """Residual dropout on a (BT, 4C) activation (the MLP's width), forward + backward."""
    rng = _rng()
    x, dout = _f32(rng, bt, 4 * C), _f32(rng, bt, 4 * C)
    if impl == "gptcore":
        def fn():
            ops.dropout_forward(x, 0.1, 1, 2)
            ops.dropout_backward(dout, 0.1, 1, 2)
    else:
        x, dout = x.astype(np.float64), dout.astype(np.float64)

        def fn():
            ref.dropout_forward(x, 0.1, 1, 2)
            ref.dropout_backward(dout, 0.1, 1, 2)
    return fn


def setup_cross_entropy(impl, bt):
    rng = _rng()
    logits = _f32(rng, bt, VP, scale=2.0)
    targets = rng.integers(0, V, size=bt)
    targets[::17] = -1  # a few masked positions
    if impl == "gptcore":
        def fn():
            ops.cross_entropy_forward_backward(logits, targets, vocab_size=V)
    else:
        logits = logits.astype(np.float64)

        def fn():
            ref.cross_entropy_forward(logits, targets, vocab_size=V)
            ref.cross_entropy_backward(logits, targets, vocab_size=V)
    return fn


OPS = {
    "embedding": (setup_embedding, None),
    "layernorm": (setup_layernorm, FUSED_TARGET),
    "residual+layernorm": (setup_residual_layernorm, FUSED_TARGET),
    "linear 768->3072 +GELU": (setup_linear_fc_gelu, None),
    "linear 3072->768": (setup_linear_proj, None),
    "attention": (setup_attention, FUSED_TARGET),
    "attention dropout 0.1": (setup_attention_dropout, None),
    "dropout 0.1 (BT, 4C)": (setup_dropout, None),
    "cross-entropy": (setup_cross_entropy, FUSED_TARGET),
}


@pytest.mark.parametrize("impl", ["gptcore", "reference"])
@pytest.mark.parametrize("bt", BTS, ids=lambda bt: f"BT{bt}")
@pytest.mark.parametrize("op", list(OPS))
def test_op_fwd_bwd(benchmark, op, bt, impl):
    setup, target = OPS[op]
    fn = setup(impl, bt)
    _run(benchmark, fn, op=op, group=f"{op} fwd+bwd | BT={bt}", impl=impl, size=f"BT={bt}",
         target=target)


# ---- the optimiser: one GPT-2 small block's parameters (7.1M) ---------------------------------

BLOCK_SHAPES = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,),
                (C, 4 * C), (C,)]


@pytest.mark.parametrize("impl", ["gptcore", "reference"])
def test_adamw(benchmark, impl):
    rng = _rng()
    params = [_f32(rng, *s, scale=0.02) for s in BLOCK_SHAPES]
    grads = [_f32(rng, *s, scale=1e-3) for s in BLOCK_SHAPES]
    decay = [len(s) == 2 for s in BLOCK_SHAPES]
    hp = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
    step = [0]
    if impl == "gptcore":
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]

        def fn():
            step[0] += 1
            ops.adamw_step(params, grads, m, v, step=step[0], decay=decay, **hp)
    else:
        state = [(p.astype(np.float64), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
        grads = [g.astype(np.float64) for g in grads]

        def fn():
            step[0] += 1
            for i, ((p, mm, vv), g, d) in enumerate(zip(state, grads, decay)):
                state[i] = ref.adamw_step(p, g, mm, vv, step=step[0], decay=d, **hp)
    n = sum(int(np.prod(s)) for s in BLOCK_SHAPES)
    _run(benchmark, fn, op="AdamW", group=f"AdamW step | {n / 1e6:.1f}M params (one GPT-2 block)",
         impl=impl, size=f"{n / 1e6:.1f}M params", target=FUSED_TARGET)


@pytest.mark.parametrize("impl", ["gptcore", "reference"])
def test_global_norm(benchmark, impl):
    rng = _rng()
    grads = [_f32(rng, *s) for s in BLOCK_SHAPES]
    if impl == "gptcore":
        def fn():
            ops.global_norm(grads)
    else:
        grads = [g.astype(np.float64) for g in grads]

        def fn():
            ref.global_norm(grads)
    n = sum(int(np.prod(s)) for s in BLOCK_SHAPES)
    _run(benchmark, fn, op="global norm", group=f"global norm | {n / 1e6:.1f}M params",
         impl=impl, size=f"{n / 1e6:.1f}M params")


# ---- sgemm: gptcore's linear forward (no bias) against NumPy's float32 matmul ------------------

GEMMS = [(C, 3 * C), (C, 4 * C), (4 * C, C), (C, C)]


@pytest.mark.parametrize("impl", ["gptcore", "numpy"])
@pytest.mark.parametrize("K, M", GEMMS, ids=lambda v: str(v))
@pytest.mark.parametrize("bt", BTS, ids=lambda bt: f"BT{bt}")
def test_sgemm(benchmark, bt, K, M, impl):
    rng = _rng()
    x, w = _f32(rng, bt, K), _f32(rng, M, K, scale=0.02)
    if impl == "gptcore":
        def fn():
            ops.linear_forward(x, w)
    else:
        wt = w.T  # a view: NumPy hands the transpose to BLAS, as gptcore does

        def fn():
            np.matmul(x, wt)
    _run(benchmark, fn, op="sgemm", group=f"sgemm | {bt}x{K} -> {M}", impl=impl,
         size=f"{bt}x{K} -> {M}", target="within 5% of NumPy")


# ---- sampling: next-token draw from GPT-2 logits (temperature + top-p) --------------------------


@pytest.mark.parametrize("impl", ["gptcore", "reference"])
@pytest.mark.parametrize("B", [1, 8], ids=lambda b: f"B{b}")
def test_sample_tokens(benchmark, B, impl):
    """ops.sample_tokens against reference.sample_tokens, both on the same float32 logits (scale
    3, a nucleus of a few thousand tokens at top_p=0.95). Each call takes the next of 16 logit
    arrays, so neither side profits from having just seen the same row."""
    rng = _rng()
    xs = [_f32(rng, B, VP, scale=3.0) for _ in range(16)]
    i = [0]
    if impl == "gptcore":
        counter = np.zeros(B, np.int64)

        def fn():
            i[0] = (i[0] + 1) % len(xs)
            ops.sample_tokens(xs[i[0]], vocab_size=V, temperature=0.8, top_p=0.95, counter=counter)
    else:
        xs = [x.astype(np.float64) for x in xs]

        def fn():
            i[0] = (i[0] + 1) % len(xs)
            ref.sample_tokens(xs[i[0]], vocab_size=V, temperature=0.8, top_p=0.95)
    _run(benchmark, fn, op="sample_tokens", group=f"sample_tokens top_p=0.95 | B={B}, V={V}",
         impl=impl, size=f"B={B}", rounds=200 if impl == "gptcore" else 10)
