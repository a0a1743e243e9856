"""gptcore's kernels as PyTorch operators: ``torch.library`` custom ops with fake (meta)
implementations and autograd formulas, so they differentiate, trace under ``torch.compile``
(``fullgraph=True``: no graph break) and run under DDP like any built-in op.

Each op family is two custom ops in the ``gptcore`` namespace, the forward (which returns what
its backward needs: LayerNorm's mean/rstd, attention's log-sum-exp, the GELU pre-activation) and
the backward, joined by ``register_autograd``. Because the backward is itself an op, AOT autograd
and ``torch.compile`` see both halves as single graph nodes. The plain functions below
(:func:`attention`, :func:`layer_norm`, ...) are what a model calls.

Tensors cross into gptcore without a copy (NumPy's buffer on the CPU, DLPack on CUDA); outputs
are torch tensors written by gptcore through the ops' ``out=`` buffers (on CUDA from PyTorch's
caching allocator; large CPU buffers from gptcore's, see :func:`_empty`). CUDA kernels launch on PyTorch's current stream. Inputs that are not contiguous
are copied to contiguous ones first (the kernels read dense row-major tensors).

Dtypes: float32 on the CPU; float32 or bfloat16 on CUDA. Statistics and losses are float32.
Parameter gradients are computed in float32 (the kernels accumulate them there) and returned in
the parameter's dtype. There is no float64 kernel: a float64 input raises TypeError.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import cuda as _gcuda
from .. import ops as _ops
from ..tensor import empty as _gempty
from ..tensor import from_numpy as _from_numpy
from ..tensor import zeros as _gzeros

__all__ = ["attention", "attention_qkv", "dropout", "layer_norm", "residual_layer_norm", "linear",
           "linear_gelu", "cross_entropy", "linear_cross_entropy", "embedding"]


# ---- crossing into gptcore ----------------------------------------------------------------------


def _g(t: Optional[Tensor], name: str):
    """A torch tensor as a gptcore Tensor over the same memory (None stays None)."""
    if t is None:
        return None
    if t.device.type == "cpu":
        if t.dtype not in (torch.float32, torch.int32, torch.int64):
            raise TypeError(f"{name}: gptcore's CPU kernels take float32 (ids int32/int64), "
                            f"got {t.dtype}")
        return _from_numpy(t.detach().numpy(), name)  # the cheapest zero-copy path
    if t.dtype not in (torch.float32, torch.bfloat16, torch.int32, torch.int64):
        raise TypeError(f"{name}: gptcore's CUDA kernels take float32 or bfloat16, got {t.dtype}")
    return _ops.as_tensor(t.detach(), name)


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@contextlib.contextmanager
def _on(t: Tensor):
    """Run gptcore's kernels on PyTorch's current stream of ``t``'s device (CUDA), restoring
    gptcore's previous stream afterwards. Nothing to do on the CPU."""
    if t.device.type != "cuda":
        yield
        return
    prev = _gcuda.current_stream()
    with torch.cuda.device(t.device):
        _gcuda.set_stream(torch.cuda.current_stream(t.device).cuda_stream)
        try:
            yield
        finally:
            _gcuda.set_stream(prev)


_BIG = 1 << 16  # elements; below this torch's allocator does as well


def _empty(shape, dtype, device, zero: bool = False) -> Tensor:
    """A buffer for an op to write. Large float32 CPU buffers come from gptcore's allocator
    (64-byte aligned, huge pages; zeroed pages straight from the system), handed to torch through
    DLPack, which keeps them alive: fewer page faults and no separate zero-fill pass than
    ``torch.empty``/``torch.zeros``. Everything else (CUDA included: its caching allocator, which
    orders memory reuse on PyTorch's streams) comes from torch."""
    shape = tuple(shape)
    if device.type == "cpu" and dtype == torch.float32 and math.prod(shape) >= _BIG:
        return torch.from_dlpack((_gzeros if zero else _gempty)(list(shape), "float32", "cpu"))
    return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)


def _like(t: Tensor) -> Tensor:
    return _empty(t.shape, t.dtype, t.device)


def _f32_zeros(like: Tensor) -> Tensor:
    """A float32 gradient buffer for a parameter (the kernels accumulate parameter gradients
    in float32 and add into the buffer)."""
    return _empty(like.shape, torch.float32, like.device, zero=True)


def _no_zero_grads(ctx) -> None:
    """Multi-output ops: outputs nobody differentiates (statistics, a saved gradient) reach
    backward as None instead of freshly zero-filled tensors (for cross-entropy's saved dlogits
    that would be a (N, V) memset every step)."""
    ctx.set_materialize_grads(False)


# ---- dropout ------------------------------------------------------------------------------------
# Dropout masks come from gptcore's counter-based generator keyed by (seed, stream) (see
# gptcore.ops.dropout_forward): nothing is stored, backward regenerates the mask. The pair travels
# through the custom ops as ``rng``, a (2,) int64 CPU tensor, so that a model can derive it from a
# step counter held in a tensor (a buffer) and torch.compile does not specialise on its value.


def _rng(seed, stream) -> Tensor:
    """(seed, stream) -- ints in [0, 2**63) or int64 tensors -- as the ops' ``rng`` tensor."""
    if isinstance(seed, Tensor) or isinstance(stream, Tensor):
        return torch.stack([torch.as_tensor(v, dtype=torch.int64).reshape(())
                            for v in (seed, stream)]).cpu()
    for name, v in (("seed", seed), ("stream", stream)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 63:
            raise ValueError(f"{name}: expected an int in [0, 2**63), got {v!r}")
    return torch.tensor([seed, stream], dtype=torch.int64)


def _dropout_kw(dropout_p: float, rng: Optional[Tensor]) -> dict:
    """The dropout keywords of a gptcore op (none without dropout)."""
    if dropout_p == 0.0:
        return {}
    if rng is None:
        raise ValueError("dropout_p > 0 needs a seed")
    seed, stream = rng.tolist()
    return dict(dropout_p=dropout_p, seed=seed, stream=stream)


def _mask_args(p: float, rng: Tensor) -> tuple:
    """(p, seed, stream): the leading arguments of gptcore's dropout ops."""
    return (p, *rng.tolist())


def _check_p(dropout_p) -> float:
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {dropout_p!r}")
    return p


@torch.library.custom_op("gptcore::dropout_fwd", mutates_args=())
def _dropout_fwd(x: Tensor, p: float, rng: Tensor) -> Tensor:
    x = x.contiguous()
    out = _like(x)
    with _on(x):
        _ops.dropout_forward(_g(x, "x"), *_mask_args(p, rng), out=_g(out, "out"))
    return out


@torch.library.custom_op("gptcore::dropout_bwd", mutates_args=())
def _dropout_bwd(dout: Tensor, p: float, rng: Tensor) -> Tensor:
    """``dout * mask / (1 - p)`` with the forward's regenerated mask."""
    dout = dout.contiguous()
    dx = _like(dout)
    with _on(dout):
        _ops.dropout_backward(_g(dout, "dout"), *_mask_args(p, rng), out=_g(dx, "dx"))
    return dx


@_dropout_fwd.register_fake
def _(x, p, rng):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_dropout_bwd.register_fake
def _(dout, p, rng):
    return torch.empty_like(dout, memory_format=torch.contiguous_format)


def _dropout_setup(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(inputs[2])


def _dropout_backward(ctx, dout):
    return _dropout_bwd(dout, ctx.p, *ctx.saved_tensors), None, None


_dropout_fwd.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def dropout(x: Tensor, p: float, seed=0, stream=0) -> Tensor:
    """Dropout with gptcore's counter-based generator: ``x * mask / (1 - p)``, the mask a pure
    function of ``(p, seed, stream)`` and x's row-major element index, regenerated in backward
    (nothing stored). ``seed``, ``stream``: ints in [0, 2**63) or int64 tensors. Apply it only
    in training; use a fresh (seed, stream) per step and per site."""
    p = _check_p(p)
    return x if p == 0.0 else _dropout_fwd(x, p, _rng(seed, stream))


# ---- attention ----------------------------------------------------------------------------------


@torch.library.custom_op("gptcore::attention_fwd", mutates_args=())
def _attention_fwd(qkv: Tensor, n_head: int, window: Optional[int], dropout_p: float,
                   rng: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    qkv = qkv.contiguous()
    B, T, C3 = qkv.shape
    out = _empty((B, T, C3 // 3), qkv.dtype, qkv.device)
    lse = _empty((B, n_head, T), torch.float32, qkv.device)
    with _on(qkv):
        _ops.attention_forward(_g(qkv, "qkv"), n_head, window, **_dropout_kw(dropout_p, rng),
                               out=(_g(out, "out"), _g(lse, "lse")))
    return out, lse


@_attention_fwd.register_fake
def _(qkv, n_head, window, dropout_p, rng):
    B, T, C3 = qkv.shape
    return (qkv.new_empty((B, T, C3 // 3)),
            qkv.new_empty((B, n_head, T), dtype=torch.float32))


@torch.library.custom_op("gptcore::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, n_head: int,
                   window: Optional[int], dropout_p: float, rng: Optional[Tensor]) -> Tensor:
    dout, qkv, out, lse = (t.contiguous() for t in (dout, qkv, out, lse))
    dqkv = _like(qkv)
    with _on(qkv):
        _ops.attention_backward(_g(dout, "dout"), _g(qkv, "qkv"), _g(out, "out"), _g(lse, "lse"),
                                n_head, window, **_dropout_kw(dropout_p, rng),
                                dqkv=_g(dqkv, "dqkv"))
    return dqkv


@_attention_bwd.register_fake
def _(dout, qkv, out, lse, n_head, window, dropout_p, rng):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _attention_setup(ctx, inputs, output):
    qkv, n_head, window, dropout_p, rng = inputs
    out, lse = output
    _no_zero_grads(ctx)
    ctx.save_for_backward(qkv, out, lse, rng)
    ctx.args = (n_head, window, dropout_p)


def _attention_backward(ctx, dout, dlse):
    qkv, out, lse, rng = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dqkv = _attention_bwd(dout, qkv, out, lse, *ctx.args, rng) if ctx.needs_input_grad[0] \
        else None
    return dqkv, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(qkv: Tensor, n_head: int, window: Optional[int] = None, *,
              dropout_p: float = 0.0, seed=0, stream=0) -> Tensor:
    """Causal multi-head self-attention on packed ``qkv`` (B, T, 3C) = [q | k | v], each split
    into ``n_head`` heads of C / n_head; returns (B, T, C) with heads concatenated. Scores are
    scaled by 1/sqrt(head dim); ``window=w`` restricts query t to keys t-w < s <= t.

    Equals ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the split heads. The
    kernel is flash-style: only the log-sum-exp (B, n_head, T) is kept for backward.

    ``dropout_p`` > 0 drops attention probabilities with gptcore's counter-based generator keyed
    by ``(seed, stream)`` (ints in [0, 2**63), or int64 tensors); backward regenerates the same
    mask, so pass a fresh seed (or stream) per step and per layer yourself.
    """
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"qkv: expected (B, T, 3C), got shape {tuple(qkv.shape)}")
    p = _check_p(dropout_p)
    return _attention_fwd(qkv, int(n_head), None if window is None else int(window), p,
                          _rng(seed, stream) if p > 0 else None)[0]


def attention_qkv(q: Tensor, k: Tensor, v: Tensor, window: Optional[int] = None, *,
                  dropout_p: float = 0.0, seed=0, stream=0) -> Tensor:
    """:func:`attention` on separate q, k, v of shape (B, T, H, D) (flash-attn's layout);
    returns (B, T, H, D). They are packed into one (B, T, 3HD) buffer first (one copy: the
    kernel reads packed qkv), and the gradient is split back by autograd."""
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v: expected three (B, T, H, D) tensors of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    qkv = torch.cat([q.reshape(B, T, H * D), k.reshape(B, T, H * D), v.reshape(B, T, H * D)], -1)
    return attention(qkv, H, window, dropout_p=dropout_p, seed=seed,
                     stream=stream).view(B, T, H, D)


# ---- LayerNorm ----------------------------------------------------------------------------------


@torch.library.custom_op("gptcore::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor,
                    eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    out = _like(x)
    mean = _empty(x.shape[:-1], torch.float32, x.device)
    rstd = _like(mean)
    with _on(x):
        _ops.layernorm_forward(_g(x, "x"), _g(weight, "weight"), _g(bias, "bias"), eps,
                               out=(_g(out, "out"), _g(mean, "mean"), _g(rstd, "rstd")))
    return out, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("gptcore::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dout: Tensor, dresidual: Optional[Tensor], x: Tensor, mean: Tensor,
                    rstd: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """dx (+ dresidual when given), dweight, dbias (float32). Also the backward of the fused
    residual+LayerNorm, with its ``sum`` in x's place and the gradient reaching ``sum`` from
    elsewhere in ``dresidual``."""
    dout, dresidual, x, weight = (_dense(t) for t in (dout, dresidual, x, weight))
    dweight, dbias = _f32_zeros(weight), _f32_zeros(weight)
    dx = _like(x)
    with _on(x):
        _ops.layernorm_backward(_g(dout, "dout"), _g(x, "x"), _g(mean.contiguous(), "mean"),
                                _g(rstd.contiguous(), "rstd"),
                                dresidual=_g(dresidual, "dresidual"), weight=_g(weight, "weight"),
                                dweight=_g(dweight, "dweight"), dbias=_g(dbias, "dbias"),
                                out=_g(dx, "dx"))
    return dx, dweight, dbias


@_layer_norm_bwd.register_fake
def _(dout, dresidual, x, mean, rstd, weight):
    g = weight.new_empty(weight.shape, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), g, torch.empty_like(g)


def _layer_norm_setup(ctx, inputs, output):
    x, weight = inputs[:2]
    _, mean, rstd = output
    _no_zero_grads(ctx)
    ctx.save_for_backward(x, mean, rstd, weight)


def _param_grads(ctx, first: int, dweight, dbias, weight):
    """The parameter gradients autograd asked for, in the parameters' dtype."""
    return (dweight.to(weight.dtype) if ctx.needs_input_grad[first] else None,
            dbias.to(weight.dtype) if ctx.needs_input_grad[first + 1] else None)


def _layer_norm_backward(ctx, dout, dmean, drstd):
    x, mean, rstd, weight = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    dx, dw, db = _layer_norm_bwd(dout, None, x, mean, rstd, weight)
    return (dx if ctx.needs_input_grad[0] else None, *_param_grads(ctx, 1, dw, db, weight), None)


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension, as ``F.layer_norm(x, (C,), weight, bias, eps)``
    (biased variance; mean and 1/std kept in float32 for backward)."""
    return _layer_norm_fwd(x, weight, bias, float(eps))[0]


@torch.library.custom_op("gptcore::residual_layer_norm_fwd", mutates_args=())
def _residual_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                             eps: float, dropout_p: float,
                             rng: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x, residual, weight, bias = (t.contiguous() for t in (x, residual, weight, bias))
    s, out = _like(x), _like(x)
    mean = _empty(x.shape[:-1], torch.float32, x.device)
    rstd = _like(mean)
    with _on(x):
        _ops.residual_layernorm_forward(_g(x, "x"), _g(residual, "residual"), _g(weight, "weight"),
                                        _g(bias, "bias"), eps, **_dropout_kw(dropout_p, rng),
                                        out=(_g(s, "sum"), _g(out, "out"), _g(mean, "mean"),
                                             _g(rstd, "rstd")))
    return s, out, mean, rstd


@_residual_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, rng):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    dense = torch.contiguous_format
    return (torch.empty_like(x, memory_format=dense), torch.empty_like(x, memory_format=dense),
            stats, torch.empty_like(stats))


def _residual_layer_norm_setup(ctx, inputs, output):
    weight, ctx.dropout_p = inputs[2], inputs[5]
    s, _, mean, rstd = output
    _no_zero_grads(ctx)
    ctx.save_for_backward(s, mean, rstd, weight, inputs[6])


def _residual_layer_norm_backward(ctx, dsum, dout, dmean, drstd):
    s, mean, rstd, weight, rng = ctx.saved_tensors
    if dout is None and dsum is None:
        return (None,) * 7
    if dout is None:  # only the sum is used downstream
        dout = torch.zeros_like(s)
    dtotal, dw, db = _layer_norm_bwd(dout, dsum, s, mean, rstd, weight)
    need = ctx.needs_input_grad
    dx = None
    if need[0]:  # through x's dropout mask, when there was one
        dx = _dropout_bwd(dtotal, ctx.dropout_p, rng) if ctx.dropout_p > 0 else dtotal
    return (dx, dtotal if need[1] else None, *_param_grads(ctx, 2, dw, db, weight),
            None, None, None)


_residual_layer_norm_fwd.register_autograd(_residual_layer_norm_backward,
                                           setup_context=_residual_layer_norm_setup)


def residual_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                        eps: float = 1e-5, *, dropout_p: float = 0.0, seed=0,
                        stream=0) -> Tuple[Tensor, Tensor]:
    """Fused (dropout +) residual add + LayerNorm in one pass: returns ``(s, layer_norm(s))``
    with ``s = dropout(x) + residual`` (the new residual stream, as a pre-LN transformer block
    needs). ``dropout_p`` > 0 applies :func:`dropout`'s mask for ``(seed, stream)`` to x
    (GPT-2's residual dropout) inside the same pass."""
    p = _check_p(dropout_p)
    s, out, _, _ = _residual_layer_norm_fwd(x, residual, weight, bias, float(eps), p,
                                            _rng(seed, stream) if p > 0 else None)
    return s, out


# ---- linear (+ GELU) ----------------------------------------------------------------------------


def _linear_out_shape(x: Tensor, weight: Tensor):
    return (*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("gptcore::linear_fwd", mutates_args=())
def _linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    x, weight, bias = _dense(x), _dense(weight), _dense(bias)
    out = _empty(_linear_out_shape(x, weight), x.dtype, x.device)
    with _on(x):
        _ops.linear_forward(_g(x, "x"), _g(weight, "weight"), _g(bias, "bias"),
                            out=_g(out, "out"))
    return out


@_linear_fwd.register_fake
def _(x, weight, bias):
    return x.new_empty(_linear_out_shape(x, weight))


@torch.library.custom_op("gptcore::linear_gelu_fwd", mutates_args=())
def _linear_gelu_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    x, weight, bias = _dense(x), _dense(weight), _dense(bias)
    shape = _linear_out_shape(x, weight)
    out = _empty(shape, x.dtype, x.device)
    pre = _like(out)
    with _on(x):
        _ops.linear_forward(_g(x, "x"), _g(weight, "weight"), _g(bias, "bias"), gelu=True,
                            out=(_g(out, "out"), _g(pre, "pre")))
    return out, pre


@_linear_gelu_fwd.register_fake
def _(x, weight, bias):
    shape = _linear_out_shape(x, weight)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("gptcore::linear_bwd", mutates_args=())
def _linear_bwd(dout: Tensor, x: Tensor, pre: Optional[Tensor], weight: Tensor,
                need_dx: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """dx, dweight and dbias (both float32); dx and dbias are empty (0,) tensors when not
    needed (a layer without bias, an input without grad)."""
    dout, x, pre, weight = (_dense(t) for t in (dout, x, pre, weight))
    dweight = _f32_zeros(weight)
    dbias = _empty((weight.shape[0] if need_dbias else 0,), torch.float32, x.device, zero=True)
    dx = _like(x) if need_dx else x.new_empty((0,))
    with _on(x):
        _ops.linear_backward(_g(dout, "dout"), _g(x, "x"), pre=_g(pre, "pre"),
                             weight=_g(weight, "weight"), need_dx=need_dx,
                             dweight=_g(dweight, "dweight"),
                             dbias=_g(dbias, "dbias") if need_dbias else None,
                             out=_g(dx, "dx") if need_dx else None)
    return dx, dweight, dbias


@_linear_bwd.register_fake
def _(dout, x, pre, weight, need_dx, need_dbias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx \
        else x.new_empty((0,))
    return dx, weight.new_empty(weight.shape, dtype=torch.float32), \
        weight.new_empty((weight.shape[0] if need_dbias else 0,), dtype=torch.float32)


def _linear_setup(ctx, inputs, output):
    x, weight = inputs[:2]
    ctx.save_for_backward(x, weight, None)


def _linear_gelu_setup(ctx, inputs, output):
    x, weight = inputs[:2]
    _no_zero_grads(ctx)
    ctx.save_for_backward(x, weight, output[1])


def _linear_backward(ctx, dout, dpre=None):
    x, weight, pre = ctx.saved_tensors
    if dout is None:
        return None, None, None
    need = ctx.needs_input_grad
    dx, dw, db = _linear_bwd(dout, x, pre, weight, need[0], need[2])
    return (dx if need[0] else None, dw.to(weight.dtype) if need[1] else None,
            db.to(weight.dtype) if need[2] else None)


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)
_linear_gelu_fwd.register_autograd(_linear_backward, setup_context=_linear_gelu_setup)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` with weight (out, in), as ``F.linear``; x (..., in)."""
    return _linear_fwd(x, weight, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``gelu(x @ weight.T + bias)`` with tanh-GELU (``F.gelu(..., approximate='tanh')``) fused
    into the GEMM's epilogue; the pre-activation is kept for backward."""
    return _linear_gelu_fwd(x, weight, bias)[0]


# ---- cross-entropy ------------------------------------------------------------------------------


@torch.library.custom_op("gptcore::cross_entropy_loss", mutates_args=())
def _cross_entropy_loss(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Per-position losses only (no gradient), for inputs that need none."""
    logits, targets = logits.contiguous(), targets.contiguous()
    losses = _empty(targets.shape, torch.float32, logits.device)
    with _on(logits):
        _ops.cross_entropy_forward(_g(logits, "logits"), _g(targets, "targets"),
                                   ignore_index=ignore_index, out=_g(losses, "losses"))
    return losses


@_cross_entropy_loss.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty(targets.shape, dtype=torch.float32)


@torch.library.custom_op("gptcore::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, targets: Tensor,
                       ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-position losses and, in the same pass, their gradient with respect to the logits
    (``softmax - onehot``, zero on ignored rows): backward is then one multiplication, and the
    softmax is never stored (llm.c's and Liger-Kernel's fused classifier)."""
    logits, targets = logits.contiguous(), targets.contiguous()
    losses = _empty(targets.shape, torch.float32, logits.device)
    dlogits = _like(logits)
    with _on(logits):
        _ops.cross_entropy_forward_backward(_g(logits, "logits"), _g(targets, "targets"),
                                            ignore_index=ignore_index, grad_scale=1.0,
                                            out=(_g(losses, "losses"), _g(dlogits, "dlogits")))
    return losses, dlogits


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index):
    return (logits.new_empty(targets.shape, dtype=torch.float32),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


def _cross_entropy_setup(ctx, inputs, output):
    _no_zero_grads(ctx)
    ctx.save_for_backward(output[1])


def _cross_entropy_backward(ctx, dlosses, ddlogits):
    (dlogits,) = ctx.saved_tensors
    if dlosses is None or not ctx.needs_input_grad[0]:
        return None, None, None
    dl = dlogits * dlosses.unsqueeze(-1).to(dlogits.dtype)
    return dl, None, None


_cross_entropy_fwd.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def _check_ce(logits: Tensor, targets: Tensor, reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets: expected int32 or int64 class ids, got {targets.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
                         "expected logits (..., V) and targets (...)")


def _reduce(losses: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    # the mean over the positions that count, on the device (no host sync, no graph break);
    # all ignored gives 0/0 = nan, as F.cross_entropy
    return losses.sum() / (targets != ignore_index).sum()


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy with the class dimension **last**: logits (..., V), targets (...)
    int; positions whose target is ``ignore_index`` count for nothing. ``reduction`` 'mean'
    (over the positions that count), 'sum' or 'none' (per-position, float32).

    For 2-D logits this is ``F.cross_entropy(logits, targets, ignore_index=..., reduction=...)``
    (for more dimensions PyTorch wants the classes in dim 1; here they stay last, as a language
    model's logits are). The loss is float32 whatever the logits' dtype. When the logits need a
    gradient, the forward computes it in the same pass and keeps it (the size of the logits)
    instead of the logits.
    """
    _check_ce(logits, targets, reduction)
    ignore_index = int(ignore_index)
    if logits.requires_grad and torch.is_grad_enabled():
        losses = _cross_entropy_fwd(logits, targets, ignore_index)[0]
    else:
        losses = _cross_entropy_loss(logits, targets, ignore_index)
    return _reduce(losses, targets, ignore_index, reduction)


# ---- fused linear + cross-entropy ---------------------------------------------------------------


@torch.library.custom_op("gptcore::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                              chunk: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-position losses of ``cross_entropy(x @ weight.T, targets)`` and their gradients with
    respect to x and weight, computed ``chunk`` rows at a time: only a (chunk, V) slice of the
    logits ever exists (Liger-Kernel's fused linear cross-entropy)."""
    x, weight, targets = x.contiguous(), weight.contiguous(), targets.contiguous()
    K, V = x.shape[-1], weight.shape[0]
    xf, tf = x.reshape(-1, K), targets.reshape(-1)
    N = xf.shape[0]
    losses = _empty((N,), torch.float32, x.device)
    dx = _like(xf)
    dweight = _f32_zeros(weight)
    logits = _empty((min(chunk, N), V), x.dtype, x.device)
    with _on(x):
        gw, gdw = _g(weight, "weight"), _g(dweight, "dweight")
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            xs, lg = _g(xf[r0:r1], "x"), _g(logits[: r1 - r0], "logits")
            _ops.linear_forward(xs, gw, None, out=lg)
            _ops.cross_entropy_forward_backward(lg, _g(tf[r0:r1], "targets"),
                                                ignore_index=ignore_index, grad_scale=1.0,
                                                inplace=True, out=(_g(losses[r0:r1], "losses"),
                                                                   None))
            _ops.linear_backward(lg, xs, weight=gw, dweight=gdw, out=_g(dx[r0:r1], "dx"))
    return losses.view(targets.shape), dx.view(x.shape), dweight


@_linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index, chunk):
    return (x.new_empty(targets.shape, dtype=torch.float32),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape, dtype=torch.float32))


def _linear_cross_entropy_setup(ctx, inputs, output):
    _no_zero_grads(ctx)
    ctx.save_for_backward(output[1], output[2], inputs[1])


def _linear_cross_entropy_backward(ctx, dlosses, ddx, ddweight):
    dx, dweight, weight = ctx.saved_tensors
    if dlosses is None:
        return None, None, None, None, None
    need = ctx.needs_input_grad
    # the losses' gradients were computed for an upstream gradient of 1 per position: the
    # weight's gradient is a sum over positions, so it is exact only for one shared upstream
    # value (a sum or mean of the losses), which linear_cross_entropy guarantees.
    g = dlosses.reshape(-1)[0]
    return (dx * dlosses.unsqueeze(-1).to(dx.dtype) if need[0] else None,
            (dweight * g).to(weight.dtype) if need[1] else None, None, None, None)


_linear_cross_entropy_fwd.register_autograd(_linear_cross_entropy_backward,
                                            setup_context=_linear_cross_entropy_setup)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk: int = 1024) -> Tensor:
    """``cross_entropy(linear(x, weight), targets, ...)`` (an LM head without bias, then the
    loss) without materialising the (N, V) logits: ``chunk`` rows at a time, their logits are
    computed, turned into losses and gradients in place, and folded into the gradients of x and
    weight during the forward. Memory: one (chunk, V) slice instead of two (N, V) tensors.
    ``reduction`` is 'mean' or 'sum' (the weight gradient is accumulated for one upstream value
    shared by all positions)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    _check_ce(x.new_empty((*x.shape[:-1], 1)), targets, reduction)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    losses = _linear_cross_entropy_fwd(x, weight, targets, int(ignore_index), chunk)[0]
    return _reduce(losses, targets, int(ignore_index), reduction)


# ---- embedding ----------------------------------------------------------------------------------


@torch.library.custom_op("gptcore::embedding_fwd", mutates_args=())
def _embedding_fwd(idx: Tensor, wte: Tensor, wpe: Tensor, dropout_p: float,
                   rng: Optional[Tensor]) -> Tensor:
    idx, wte, wpe = idx.contiguous(), wte.contiguous(), wpe.contiguous()
    out = _empty((*idx.shape, wte.shape[1]), wte.dtype, wte.device)
    with _on(wte):
        _ops.embedding_forward(_g(idx, "idx"), _g(wte, "wte"), _g(wpe, "wpe"),
                               **_dropout_kw(dropout_p, rng), out=_g(out, "out"))
    return out


@_embedding_fwd.register_fake
def _(idx, wte, wpe, dropout_p, rng):
    return wte.new_empty((*idx.shape, wte.shape[1]))


@torch.library.custom_op("gptcore::embedding_bwd", mutates_args=())
def _embedding_bwd(dout: Tensor, idx: Tensor, wte: Tensor, wpe: Tensor) -> Tuple[Tensor, Tensor]:
    """float32 gradients of wte and wpe (wte and wpe give only their shapes and device)."""
    dout, idx = dout.contiguous().float(), idx.contiguous()
    dwte, dwpe = _f32_zeros(wte), _f32_zeros(wpe)
    with _on(dout):
        _ops.embedding_backward(_g(dout, "dout"), _g(idx, "idx"), _g(dwte, "dwte"),
                                _g(dwpe, "dwpe"))
    return dwte, dwpe


@_embedding_bwd.register_fake
def _(dout, idx, wte, wpe):
    return (wte.new_empty(wte.shape, dtype=torch.float32),
            wpe.new_empty(wpe.shape, dtype=torch.float32))


def _embedding_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], inputs[4])
    ctx.dropout_p = inputs[3]


def _embedding_backward(ctx, dout):
    idx, wte, wpe, rng = ctx.saved_tensors
    need = ctx.needs_input_grad
    if ctx.dropout_p > 0:
        dout = _dropout_bwd(dout, ctx.dropout_p, rng)
    dwte, dwpe = _embedding_bwd(dout, idx, wte, wpe)
    return (None, dwte.to(wte.dtype) if need[1] else None,
            dwpe.to(wpe.dtype) if need[2] else None, None, None)


_embedding_fwd.register_autograd(_embedding_backward, setup_context=_embedding_setup)


def embedding(idx: Tensor, wte: Tensor, wpe: Tensor, *, dropout_p: float = 0.0, seed=0,
              stream=0) -> Tensor:
    """GPT's input embedding: ``wte[idx] + wpe[:T]`` for ids (B, T) (int32/int64, in
    [0, V)), token table wte (V, C) and position table wpe (maxT, C), T <= maxT. Out-of-range
    ids raise ValueError (on the CPU). ``dropout_p`` > 0 applies :func:`dropout` with
    ``(seed, stream)`` to the sum in the same pass (GPT-2's embedding dropout)."""
    if idx.dim() != 2:
        raise ValueError(f"idx: expected (B, T) token ids, got shape {tuple(idx.shape)}")
    p = _check_p(dropout_p)
    return _embedding_fwd(idx, wte, wpe, p, _rng(seed, stream) if p > 0 else None)
