"""gptcore's functional op table: one documented wrapper per op, forward and backward.

Every function accepts a :class:`gptcore.Tensor` or anything that speaks DLPack or the buffer
protocol (NumPy arrays, PyTorch tensors, ...). Inputs must be C-contiguous; they are wrapped
without a copy. Outputs are :class:`gptcore.Tensor` on the inputs' device.

Conventions (the same on every backend and in :mod:`gptcore.reference`):

* One argument order for every op, the same as in ``csrc/core/ops.h`` and the ``_C`` bindings:
  inputs (activations, ids, upstream gradients such as ``dout``, statistics saved by the
  forward; optional inputs such as ``dresidual`` or ``pre`` keep their place among them), then
  parameters (``weight``, ``bias``), then scalar settings (``eps``, ``n_head``, ``window``...),
  then the parameter-gradient buffers (``dweight``, ``dbias``...), and ``out=`` last. Where a
  required argument follows an optional one, everything from the optional one on is
  keyword-only. ``tests/test_op_signatures.py`` keeps the three layers in step.

* Gradients of *parameters* (``dwte``, ``dweight``, ``dbias``...) are **accumulated** into
  the buffers you pass (``+=``), so micro-batch gradient accumulation is free. Pass zeroed
  buffers for a plain gradient.
* Gradients of *activations* (``dx``, ``dqkv``...) are returned as new tensors.
* ``out=``: every op that returns tensors can write them into buffers you allocated once
  instead (what a training or decode loop does). ``out`` is what the op returns: one buffer, or
  a tuple with one entry per returned tensor (``None`` entries are allocated as usual). Each
  buffer must have exactly the output's shape, dtype and device, be writable, and share no
  memory with the op's inputs or other outputs. The op returns the buffers it wrote.
* Floating-point tensors are float32 on the CPU, float32 or bfloat16 on CUDA. Statistics saved
  for backward (LayerNorm ``mean``/``rstd``, attention ``lse``) and losses are float32.
* Token ids and targets are int32 or int64.

Bad input raises ``ValueError`` (shapes, values, contiguity) or ``TypeError`` (dtypes) naming
the argument; a CUDA failure raises ``RuntimeError`` naming the kernel.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

from . import _C
from .tensor import Tensor, as_tensor

__all__ = [
    "embedding_forward",
    "embedding_backward",
    "layernorm_forward",
    "layernorm_backward",
    "residual_layernorm_forward",
    "residual_layernorm_backward",
    "linear_forward",
    "linear_backward",
    "attention_forward",
    "attention_backward",
    "attention_kvcache",
    "dropout_forward",
    "dropout_backward",
    "cross_entropy_forward",
    "cross_entropy_forward_backward",
    "adamw_step",
    "global_norm",
    "sample_tokens",
]


def _opt(x, name):
    return None if x is None else as_tensor(x, name)


def _out(x, name):
    """A buffer the op writes into (outputs, caches, gradients, optimiser state). A read-only
    one (a read-only NumPy array, ``np.load(..., mmap_mode="r")``, a Tensor wrapping either) is
    refused by the op itself, which knows every Tensor's ``read_only`` flag."""
    return None if x is None else as_tensor(x, name)


def _int(v, name: str) -> int:
    """An integer setting as a Python int in the int64 range the core takes: TypeError for a
    non-integer (bool, float: ``int(2.5)`` would silently be 2), ValueError naming the argument
    outside int64 (pybind11 would only say "incompatible function arguments")."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    v = v.__index__()
    if not -2 ** 63 <= v < 2 ** 63:
        raise ValueError(f"{name}: {v} is outside the 64-bit integer range")
    return v


def _opt_int(v, name: str) -> Optional[int]:
    return None if v is None else _int(v, name)


_POS_KINDS = "an int, a 1-element int32 tensor or a (B,) int32 tensor of per-row positions"


def _pos(pos):
    """A position argument as (int, None) or (0, position tensor); the tensor's dtype, shape
    (one element, or one per row) and device are checked by the op."""
    if pos is None:
        return 0, None
    if isinstance(pos, bool):
        raise TypeError(f"pos: expected {_POS_KINDS}, got bool")
    if isinstance(pos, numbers.Integral):
        return _int(pos, "pos"), None
    if isinstance(pos, numbers.Number):
        raise TypeError(f"pos: expected {_POS_KINDS}, got {type(pos).__name__}")
    return 0, as_tensor(pos, "pos")


def _u64(v, name: str) -> int:
    """A seed or stream: an int in [0, 2**64)."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    v = v.__index__()
    if not 0 <= v < 2 ** 64:
        raise ValueError(f"{name}: expected an int in [0, 2**64), got {v}")
    return v


def _prob(v, name: str) -> float:
    """A dropout probability as a float; its range (0 <= p < 1, not NaN) is checked by the op."""
    if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    return float(v)


def _dropout(p, seed, stream) -> dict:
    """The dropout keywords for a _C call, checked; none at all on the common path (p, seed and
    stream plain zeros), which then costs no checks."""
    if type(p) in (int, float) and type(seed) is int and type(stream) is int and \
            p == 0 and seed == 0 and stream == 0:
        return {}
    return dict(dropout_p=_prob(p, "dropout_p"), seed=_u64(seed, "seed"),
                stream=_u64(stream, "stream"))


def _outs(out, names: Sequence[str]) -> list:
    """out= normalised to one checked buffer (or None) per returned tensor."""
    n = len(names)
    if out is None:
        return [None] * n
    if n == 1:
        if isinstance(out, (tuple, list)):
            raise TypeError(f"out: expected one buffer for {names[0]}, got a {type(out).__name__}")
        return [_out(out, "out")]
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise TypeError(f"out: expected a tuple of {n} buffers ({', '.join(names)}; None entries "
                        f"are allocated), got {type(out).__name__}")
    return [_out(o, f"out[{i}] ({names[i]})") for i, o in enumerate(out)]


# ---- embedding ------------------------------------------------------------------------------


def embedding_forward(idx, wte, wpe, pos=None, *, dropout_p: float = 0.0, seed: int = 0,
                      stream: int = 0, out=None) -> Tensor:
    """Token + position embedding, with embedding dropout fused.

    idx (B, T) int32/int64 token ids in [0, V); wte (V, C); wpe (maxT, C). Row b's tokens sit
    at positions ``p_b .. p_b+T-1``: ``pos=None`` means p_b = 0, an int is every p_b, a 1-element
    int32 tensor on idx's device holds every p_b (see :func:`attention_kvcache`: a captured CUDA
    graph then reads the current value at every replay), and a (B,) int32 tensor on idx's device
    holds p_b in element b (per-row positions, for rows decoded at different positions).
    Returns out (B, T, C) with ``out[b, t] = wte[idx[b, t]] + wpe[p_b + t]``. ``0 <= p_b`` and
    ``p_b + T <= maxT`` are checked (ValueError) whenever the host can see p_b; a CUDA tensor's
    values are only seen by the kernel, which writes NaN rows for an out-of-range p_b instead of
    reading outside wpe.

    ``dropout_p`` in [0, 1): embedding dropout (GPT-1/GPT-2's embd_pdrop) in the same pass, equal
    bit for bit to ``dropout_forward(embedding_forward(...), dropout_p, seed, stream)`` (the mask
    over out's row-major index; see :func:`dropout_forward`), so :func:`dropout_backward` with
    the same three regenerates it. ``dropout_p=0`` runs the dropout-free kernel.
    """
    p, p_dev = _pos(pos)
    return _C.embedding_forward(as_tensor(idx, "idx"), as_tensor(wte, "wte"), as_tensor(wpe, "wpe"),
                                p, p_dev, **_dropout(dropout_p, seed, stream),
                                out=_outs(out, ["out"])[0])


def embedding_backward(dout, idx, dwte, dwpe) -> None:
    """Accumulate embedding gradients: ``dwte[idx[b,t]] += dout[b,t]``, ``dwpe[t] += sum_b dout[b,t]``.

    dout (B, T, C); idx (B, T); dwte (V, C) and dwpe (maxT, C) are updated in place. The
    result is deterministic (no atomics race on repeated token ids).
    """
    _C.embedding_backward(as_tensor(dout, "dout"), as_tensor(idx, "idx"),
                          _out(dwte, "dwte"), _out(dwpe, "dwpe"))


# ---- layernorm ------------------------------------------------------------------------------


def layernorm_forward(x, weight, bias, eps: float = 1e-5, *, out=None):
    """LayerNorm over the last dimension.

    x (..., C); weight, bias (C,). Returns ``(out, mean, rstd)``: out like x, and the float32
    statistics mean, rstd of shape x.shape[:-1] that :func:`layernorm_backward` needs.
    ``out = (x - mean) * rstd * weight + bias`` with ``rstd = 1 / sqrt(var + eps)`` (biased var).
    """
    return tuple(_C.layernorm_forward(as_tensor(x, "x"), as_tensor(weight, "weight"),
                                      as_tensor(bias, "bias"), float(eps),
                                      *_outs(out, ["out", "mean", "rstd"])))


def layernorm_backward(dout, x, mean, rstd, *, dresidual=None, weight, dweight, dbias,
                       out=None) -> Tensor:
    """Backward of :func:`layernorm_forward`.

    dout, x (..., C); mean, rstd (x.shape[:-1]) saved by the forward; weight (C,). Returns dx
    (like x). ``dweight`` and ``dbias`` (C,) are accumulated in place. If ``dresidual`` (like x)
    is given it is added to dx in the same pass (the gradient that reaches a residual stream
    from both the LayerNorm and the skip connection). Everything after ``rstd`` is keyword-only.
    """
    return _C.layernorm_backward(as_tensor(dout, "dout"), as_tensor(x, "x"),
                                 as_tensor(mean, "mean"), as_tensor(rstd, "rstd"),
                                 dresidual=_opt(dresidual, "dresidual"),
                                 weight=as_tensor(weight, "weight"),
                                 dweight=_out(dweight, "dweight"), dbias=_out(dbias, "dbias"),
                                 dx=_outs(out, ["dx"])[0])


def residual_layernorm_forward(x, residual, weight, bias, eps: float = 1e-5, *,
                               dropout_p: float = 0.0, seed: int = 0, stream: int = 0, out=None):
    """Fused (dropout +) residual add + LayerNorm: ``sum = dropout(x) + residual;
    out = LayerNorm(sum)``.

    x, residual (..., C); weight, bias (C,). Returns ``(sum, out, mean, rstd)``.

    ``dropout_p`` in [0, 1): residual dropout (GPT-1/GPT-2's resid_pdrop) on x, read through
    the mask of :func:`dropout_forward` for the same ``(dropout_p, seed, stream)`` over x's
    row-major index, so ``sum`` equals ``dropout_forward(x, dropout_p, seed, stream) + residual``
    (bit for bit) without a separate pass over x. Backward: the gradient of x is
    ``dropout_backward(dsum_total, dropout_p, seed, stream)``. ``dropout_p=0`` runs the
    dropout-free kernel.
    """
    s, o, m, r = _outs(out, ["sum", "out", "mean", "rstd"])
    return tuple(_C.residual_layernorm_forward(as_tensor(x, "x"), as_tensor(residual, "residual"),
                                               as_tensor(weight, "weight"), as_tensor(bias, "bias"),
                                               float(eps), **_dropout(dropout_p, seed, stream),
                                               sum=s, out=o, mean=m, rstd=r))


def residual_layernorm_backward(dout, sum, mean, rstd, *, dsum=None, weight, dweight, dbias,
                                out=None) -> Tensor:
    """Backward of :func:`residual_layernorm_forward`, laid out like :func:`layernorm_backward`
    (``sum`` in x's place, ``dsum`` in dresidual's).

    dout is the gradient of ``out``, dsum the gradient that reaches ``sum`` from elsewhere
    (the residual stream; None when nothing else reads ``sum``, as in GPT-1's post-LN blocks).
    Returns the total gradient of ``sum``, which is also the gradient of both ``x`` and
    ``residual``. dweight, dbias are accumulated in place. Everything after ``rstd`` is
    keyword-only.
    """
    return _C.residual_layernorm_backward(as_tensor(dout, "dout"), as_tensor(sum, "sum"),
                                          as_tensor(mean, "mean"), as_tensor(rstd, "rstd"),
                                          dsum=_opt(dsum, "dsum"),
                                          weight=as_tensor(weight, "weight"),
                                          dweight=_out(dweight, "dweight"),
                                          dbias=_out(dbias, "dbias"), dx=_outs(out, ["dx"])[0])


# ---- linear ---------------------------------------------------------------------------------


def linear_forward(x, weight, bias=None, gelu: bool = False, *, out=None):
    """Linear layer with an optional fused tanh-GELU epilogue.

    x (..., K); weight (M, K) in (out, in) layout; bias (M,) or None.
    Returns ``(out, pre)``: with ``gelu=False`` out = x @ weight.T + bias and pre is None;
    with ``gelu=True`` pre = x @ weight.T + bias (kept for backward) and out = gelu_tanh(pre).
    ``out`` may be one buffer (for out) or the tuple ``(out, pre)``.
    """
    bufs = _outs(out if isinstance(out, (tuple, list)) else (out, None), ["out", "pre"])
    out, pre = _C.linear_forward(as_tensor(x, "x"), as_tensor(weight, "weight"),
                                 _opt(bias, "bias"), bool(gelu), *bufs)
    return out, (pre if gelu else None)  # the binding returns an undefined Tensor otherwise


def linear_backward(dout, x, *, pre=None, weight, need_dx: bool = True, dweight, dbias=None,
                    out=None):
    """Backward of :func:`linear_forward`.

    dout (..., M); x (..., K); weight (M, K). If ``pre`` is given the layer had a GELU epilogue
    and the gradient is first multiplied by GELU's derivative at ``pre`` (fused). ``dweight``
    (M, K) and ``dbias`` (M,; None for a layer without bias) are accumulated in place. Returns
    dx (..., K), or None when ``need_dx`` is False. Everything after ``x`` is keyword-only.
    """
    dx = _C.linear_backward(as_tensor(dout, "dout"), as_tensor(x, "x"), pre=_opt(pre, "pre"),
                            weight=as_tensor(weight, "weight"), need_dx=bool(need_dx),
                            dweight=_out(dweight, "dweight"), dbias=_out(dbias, "dbias"),
                            dx=_outs(out, ["dx"])[0])
    return dx if need_dx else None


# ---- attention ------------------------------------------------------------------------------


def attention_forward(qkv, n_head: int, window: Optional[int] = None, *, dropout_p: float = 0.0,
                      seed: int = 0, stream: int = 0, out=None):
    """Causal multi-head self-attention, flash-style (no (T, T) buffer).

    qkv (B, T, 3C) packed as [q | k | v] along the last axis, each split into n_head heads of
    D = C / n_head. Query t attends to keys s <= t, and with ``window=w`` only to the last w
    positions (t - w < s <= t): GPT-3's locally banded layers. Scores are scaled by 1/sqrt(D).
    Returns ``(out, lse)``: out (B, T, C) with heads concatenated, and lse (B, n_head, T)
    float32, each row's log-sum-exp of scaled scores, the only thing backward keeps.

    ``dropout_p`` in [0, 1): dropout on the attention probabilities (GPT-1/GPT-2's attn_pdrop),
    fused into the kernel: ``out = (P * M / (1 - p)) V`` with the keep mask M of
    :func:`dropout_forward`'s generator keyed by ``(seed, stream)``, probability (b, h, t, s)
    being element ``((b*H + h)*T + t)*T + s``. ``lse`` stays that of the un-dropped softmax. No
    mask is stored: :func:`attention_backward` regenerates it from the same ``dropout_p``,
    ``seed`` and ``stream``. ``dropout_p=0`` runs the dropout-free kernels.
    """
    o, lse = _outs(out, ["out", "lse"])
    return tuple(_C.attention_forward(as_tensor(qkv, "qkv"), _int(n_head, "n_head"),
                                      _opt_int(window, "window"),
                                      **_dropout(dropout_p, seed, stream),
                                      out=o, lse=lse))


def attention_backward(dout, qkv, out, lse, n_head: int, window: Optional[int] = None, *,
                       dropout_p: float = 0.0, seed: int = 0, stream: int = 0,
                       dqkv=None) -> Tensor:
    """Backward of :func:`attention_forward`. Returns dqkv (B, T, 3C), written into the
    ``dqkv`` buffer when given (named so because ``out`` is the forward output here).

    ``dropout_p``, ``seed`` and ``stream`` must be the forward's: the mask is regenerated
    (FlashAttention-2's backward: ``dP = M/(1-p) * (dO V^T)``, ``dS = P * (dP - rowsum(dO * O))``).
    """
    return _C.attention_backward(as_tensor(dout, "dout"), as_tensor(qkv, "qkv"),
                                 as_tensor(out, "out"), as_tensor(lse, "lse"),
                                 _int(n_head, "n_head"), _opt_int(window, "window"),
                                 **_dropout(dropout_p, seed, stream),
                                 dqkv=None if dqkv is None else _out(dqkv, "dqkv"))


def attention_kvcache(qkv, k_cache, v_cache, pos, n_head: int,
                      window: Optional[int] = None, *, out=None) -> Tensor:
    """Attention for decoding: append new tokens to a KV cache and attend over it.

    qkv (B, Tn, 3C) packed like :func:`attention_forward`, holding row b's Tn new tokens at
    absolute positions ``p_b .. p_b+Tn-1``. k_cache and v_cache (B, n_head, Tmax, D) have qkv's
    dtype and device and are updated **in place**: the new keys and values are written at those
    positions of row b (they must be gptcore Tensors or writable arrays). New token i of row b
    then attends causally to row b's cache positions ``0 .. p_b+i``, and with ``window=w`` only
    to the last w of them (``p_b+i-w < s <= p_b+i``). Requires ``p_b + Tn <= Tmax``. Returns out
    (B, Tn, C), heads concatenated; with ``pos=0`` it equals
    ``attention_forward(qkv, n_head, window)[0]``.

    ``pos`` is an int (every p_b), a 1-element int32 tensor on qkv's device holding every p_b,
    or a (B,) int32 tensor on qkv's device holding p_b in element b (per-row positions: rows
    of a continuous batch, each at its own position, in one call). The tensor forms are for
    decode steps captured in a CUDA graph (:class:`gptcore.cuda.Graph`): the kernel reads the
    positions when it runs, so one captured step serves every position (advance them with
    ``pos_tensor.copy_(...)`` between replays). On the CPU their values are checked like ints;
    on CUDA they are never read by the host (that would wait for the device), and a row whose
    ``p_b < 0`` or ``p_b + Tn > Tmax`` leaves that row's caches untouched and makes its out
    rows NaN.
    """
    if pos is None:
        raise TypeError(f"pos: expected {_POS_KINDS}, got None")
    p, p_dev = _pos(pos)
    return _C.attention_kvcache(as_tensor(qkv, "qkv"), _out(k_cache, "k_cache"),
                                _out(v_cache, "v_cache"), p, pos_dev=p_dev,
                                n_head=_int(n_head, "n_head"), window=_opt_int(window, "window"),
                                out=_outs(out, ["out"])[0])


# ---- dropout --------------------------------------------------------------------------------


def dropout_forward(x, p: float, seed: int, stream: int, *, inplace: bool = False, out=None) -> Tensor:
    """Dropout from a counter-based generator: ``out = x * mask / (1 - p)``, nothing stored.

    Element i of x (its row-major linear index) is kept iff ``(bits >> 32) >= floor(p * 2**32)``
    with ``bits = mix(key + G * (i + 1))`` and ``key = mix(mix(seed + G) + G * (stream + 1))``
    (splitmix64's finaliser, G = 0x9E3779B97F4A7C15; ``csrc/core/hash.h``). Kept elements are
    multiplied by ``float32(1 / (1 - p))``, dropped ones become 0. The same ``(p, seed, stream)``
    gives the same mask on every backend (:func:`gptcore.reference.dropout_mask`), so
    :func:`dropout_backward` regenerates it. Use a distinct ``stream`` per dropout site (layer,
    embd/attn/resid) and a fresh ``seed`` (or stream) per step.

    x: float32 (CPU) or float32/bfloat16 (CUDA), any shape. ``p`` in [0, 1) (ValueError
    otherwise, NaN included); ``p == 0`` is the identity (in place nothing runs; otherwise x is
    copied). ``seed``, ``stream``: ints in [0, 2**64). ``inplace=True`` overwrites x (a gptcore
    Tensor or writable array) and returns it; otherwise the result goes into ``out`` when given.
    """
    pf, s, st = _prob(p, "p"), _u64(seed, "seed"), _u64(stream, "stream")
    xt = _out(x, "x") if inplace else as_tensor(x, "x")
    return _C.dropout_forward(xt, pf, s, st, inplace=bool(inplace), out=_outs(out, ["out"])[0])


def dropout_backward(dout, p: float, seed: int, stream: int, *, inplace: bool = False,
                     out=None) -> Tensor:
    """Backward of :func:`dropout_forward`: ``dx = dout * mask / (1 - p)`` with the forward's
    mask, regenerated from the same ``p``, ``seed`` and ``stream`` (and dout's shape: the element
    index is the row-major linear index). ``out`` and ``inplace`` (overwrite dout) as in the
    forward."""
    pf, s, st = _prob(p, "p"), _u64(seed, "seed"), _u64(stream, "stream")
    dt = _out(dout, "dout") if inplace else as_tensor(dout, "dout")
    return _C.dropout_backward(dt, pf, s, st, inplace=bool(inplace), out=_outs(out, ["out"])[0])


# ---- cross-entropy --------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, vocab_size: Optional[int] = None,
                          ignore_index: int = -1, *, out=None) -> Tensor:
    """Per-position softmax cross-entropy.

    logits (..., Vp); targets (...) int32/int64. Only the first ``vocab_size`` columns
    (default Vp) are real classes; padding columns are ignored. Returns losses (...) float32,
    ``logsumexp(logits[:V]) - logits[target]``, and 0 where ``targets == ignore_index``.
    A target outside [0, V) that is not ignore_index raises ValueError.
    """
    losses, _ = _C.cross_entropy(as_tensor(logits, "logits"), as_tensor(targets, "targets"),
                                 _opt_int(vocab_size, "vocab_size"),
                                 _int(ignore_index, "ignore_index"), False, None, False,
                                 *_outs(out, ["losses"]), None)
    return losses


def cross_entropy_forward_backward(logits, targets, vocab_size: Optional[int] = None,
                                   ignore_index: int = -1, grad_scale: Optional[float] = None,
                                   inplace: bool = False, *, out=None):
    """Fused cross-entropy: per-position losses and the logits' gradient in one pass.

    Returns ``(losses, dlogits)``; the softmax is never stored.
    ``dlogits = grad_scale * (softmax(logits[:V]) - onehot(target))``, zero in padding columns
    and ignored rows. ``grad_scale`` defaults to 1 / (number of non-ignored positions), the
    gradient of the mean loss. With ``inplace=True`` dlogits overwrites ``logits`` (which must
    then be a gptcore Tensor or a writable array) and no new (N, Vp) buffer is allocated.
    ``out`` is ``(losses, dlogits)``; its dlogits entry must be None when ``inplace``.
    """
    logits_t = _out(logits, "logits") if inplace else as_tensor(logits, "logits")
    return tuple(_C.cross_entropy(logits_t, as_tensor(targets, "targets"),
                                  _opt_int(vocab_size, "vocab_size"),
                                  _int(ignore_index, "ignore_index"), True,
                                  None if grad_scale is None else float(grad_scale),
                                  bool(inplace), *_outs(out, ["losses", "dlogits"])))


# ---- optimiser ------------------------------------------------------------------------------


def adamw_step(params: Sequence, grads: Sequence, m: Sequence, v: Sequence, *,
               master: Optional[Sequence] = None, decay: Optional[Sequence[bool]] = None,
               lr: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, step: int, grad_scale: float = 1.0,
               seed: int = 0) -> None:
    """One fused AdamW step over lists of tensors, updated in place.

    For each i: ``g = grads[i] * grad_scale`` (clipping folded in), ``m = b1 m + (1-b1) g``,
    ``v = b2 v + (1-b2) g^2``, ``p -= lr * (mhat / (sqrt(vhat) + eps) + wd_i * p)`` with bias
    corrections ``mhat = m / (1 - b1^step)``, ``vhat = v / (1 - b2^step)`` and
    ``wd_i = weight_decay if decay[i] else 0`` (decoupled weight decay; ``decay`` defaults to
    all True). m and v are float32. ``step`` counts from 1. With ``master`` (float32 copies of
    the params; needed for bfloat16 params) the update runs on the master and params get an
    exact copy (float32) or a stochastically rounded bf16 copy seeded by ``seed``.
    """
    n = len(params)
    decay = [True] * n if decay is None else [bool(d) for d in decay]
    _C.adamw_step([_out(p, "params") for p in params], [as_tensor(g, "grads") for g in grads],
                  [_out(t, "m") for t in m], [_out(t, "v") for t in v],
                  master=[] if master is None else [_out(t, "master") for t in master],
                  decay=decay, lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                  eps=float(eps), weight_decay=float(weight_decay), step=_int(step, "step"),
                  grad_scale=float(grad_scale), seed=_u64(seed, "seed"))


def global_norm(tensors: Sequence) -> float:
    """L2 norm over every element of every tensor (the global gradient norm for clipping)."""
    return float(_C.global_norm([as_tensor(t, "tensors") for t in tensors]))


# ---- sampling -------------------------------------------------------------------------------


def _sampling_number(v, name: str) -> float:
    if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    return float(v)


def sample_tokens(logits, *, counts=None, counter=None, logit_bias=None, forced=None,
                  vocab_size: Optional[int] = None, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: int = 0,
                  out=None) -> Tensor:
    """Next-token sampling on the logits' device: one token per row, so a decode step can keep
    its tokens and sampling state on the GPU (no host round trip, CUDA-graph friendly).

    logits (B, Vp): float32 (CPU) or float32/bfloat16 (CUDA); only the first
    V = ``vocab_size`` (default Vp) columns are real. For every row b that is not forced:

    1. ``z = logits[b, :V] + logit_bias - counts[b] * frequency_penalty
       - (counts[b] > 0) * presence_penalty`` (OpenAI's penalties; ``logit_bias`` (V,) float32
       may hold ``-inf`` to ban tokens). Penalties need ``counts`` (B, V) int32, the number of
       times each row has generated each token. Only finite z take part: ``-inf``, ``+inf`` and
       NaN entries are never chosen, and a row without any finite z gets token **-1** (a kernel
       cannot raise).
    2. ``temperature == 0``: greedy, the index of the largest z (ties: the lowest index); top_k
       and top_p do not apply. Otherwise ``p_j = exp((z_j - max z) / temperature)`` and
       ``top_k`` keeps the tokens with z at least the k-th largest (ties with it kept);
       ``top_p`` then keeps, of those, the tokens at least as likely as the m-th most likely,
       m the smallest count whose probability reaches ``top_p`` of the kept total (ties kept;
       the most likely token always stays; ``top_p=1`` keeps all).
    3. The token is drawn by inverse CDF in vocabulary order: the smallest j whose running sum
       of kept p exceeds ``u * sum(kept p)``, with ``u`` in [0, 1) a counter-based hash of
       ``(seed, b, counter[b])`` (``counter[b]`` is 0 without ``counter``; the exact formula is
       in ``csrc/core/ops.h`` and :mod:`gptcore.reference`). Same seed and counters, same tokens.
    4. ``counts[b, token] += 1`` and ``counter[b] += 1`` **in place** (when given; counter is
       (B,) int64), so the whole sampling state can live on the device across steps.

    ``forced`` (B,) int32: where ``forced[b] >= 0`` the row's token is ``forced[b]`` and nothing
    else of that row changes (no draw, no counts or counter update): a row still reading its
    prompt. Forced values must be < V.

    counts, counter (updated) must be gptcore Tensors or writable arrays on the logits' device;
    ``out`` is an optional (B,) int32 buffer for the tokens. Returns the tokens (B,) int32.
    The CPU computes in double and matches :func:`gptcore.reference.sample_tokens` token for
    token (but for rounding-level ties); CUDA computes in float32.
    """
    kw_top_k = _opt_int(top_k, "top_k")
    kw_top_p = None if top_p is None else _sampling_number(top_p, "top_p")
    vs = _opt_int(vocab_size, "vocab_size")
    s = _u64(seed, "seed")
    return _C.sample_tokens(as_tensor(logits, "logits"), _out(counts, "counts"),
                            _out(counter, "counter"), _opt(logit_bias, "logit_bias"),
                            _opt(forced, "forced"), vs,
                            _sampling_number(temperature, "temperature"), kw_top_k, kw_top_p,
                            _sampling_number(frequency_penalty, "frequency_penalty"),
                            _sampling_number(presence_penalty, "presence_penalty"), s,
                            *_outs(out, ["tokens"]))
