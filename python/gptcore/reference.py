"""NumPy reference for every op in gptcore's op table: the oracle the kernels are tested against.

Each function computes in float64 (inputs of any float dtype are cast) and returns float64
NumPy arrays, with exactly the semantics documented in :mod:`gptcore.ops` and
``csrc/core/ops.h``. It imports nothing but NumPy, so it works before the extension is built,
and it doubles as the speed baseline in ``benchmarks/``: everything is vectorised, and the only
Python loop (over attention heads) is there to keep the (T, T) score matrices small.

Each function takes the arguments of the op of the same name, in the same order and under the
same names (``tests/test_op_signatures.py`` checks it), with these differences, all for ease of
testing:

* Functions are pure. Parameter gradients are returned as fresh arrays instead of being
  accumulated into buffers, so the buffer arguments (``dweight``, ``dbias``, ``dwte``...) and
  ``out=`` are left out; where the op learns a shape or a choice from a buffer the reference
  takes it as a setting instead (:func:`embedding_backward`'s ``vocab_size`` and
  ``max_positions``, :func:`linear_backward`'s ``has_bias``). :func:`adamw_step` works on one
  tensor (``param``, ``grad``) and returns the new state instead of updating in place.
* :func:`cross_entropy_backward` returns only the logits' gradient; the fused op's pair is
  :func:`cross_entropy_forward_backward`.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "gelu_forward",
    "gelu_backward",
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
    "dropout_mask",
    "dropout_forward",
    "dropout_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "cross_entropy_forward_backward",
    "adamw_step",
    "global_norm",
    "sample_tokens",
]


def _f64(x, name: str) -> np.ndarray:
    """``x`` as a float64 array (a copy only where a cast is needed)."""
    a = np.asarray(x)
    if a.dtype.kind in "bcOSUMm":  # bool, complex, object, strings, dates
        raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)  # also bfloat16 (ml_dtypes) and friends


def _index(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _same_shape(a: np.ndarray, want: Tuple[int, ...], name: str) -> None:
    if a.shape != tuple(want):
        raise ValueError(f"{name}: expected shape {tuple(want)}, got {a.shape}")


# ---- GELU (tanh approximation) --------------------------------------------------------------

_GELU_S = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu_forward(x) -> np.ndarray:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, elementwise; same shape as x."""
    x = _f64(x, "x")
    return 0.5 * x * (1.0 + np.tanh(_GELU_S * (x + _GELU_C * x ** 3)))


def gelu_backward(dout, x) -> np.ndarray:
    """``dout * gelu'(x)``, elementwise; dout and x have the same shape."""
    dout, x = _f64(dout, "dout"), _f64(x, "x")
    _same_shape(dout, x.shape, "dout")
    th = np.tanh(_GELU_S * (x + _GELU_C * x ** 3))
    dth = (1.0 - th * th) * _GELU_S * (1.0 + 3.0 * _GELU_C * x * x)
    return dout * (0.5 * (1.0 + th) + 0.5 * x * dth)


# ---- embedding ------------------------------------------------------------------------------


def _check_idx(idx: np.ndarray, vocab_size: int, max_positions: int) -> None:
    if idx.ndim != 2:
        raise ValueError(f"idx: expected shape (B, T), got {idx.shape}")
    if idx.shape[1] > max_positions:
        raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds max positions {max_positions}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"idx: token ids must lie in [0, {vocab_size})")


def _row_positions(pos, B: int, T: int, limit: int) -> np.ndarray:
    """Each row's first position (B,) from ``pos``: an int (every row), or an integer array
    with one element (every row) or one per row; checked: 0 <= p_b and p_b + T <= limit."""
    p = np.asarray(0 if pos is None else pos)
    if not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"pos: expected an int or integer positions, got dtype {p.dtype}")
    if p.size != 1 and p.shape != (B,):
        raise ValueError(f"pos: expected one position or one per row ({B},), got shape {p.shape}")
    p = np.broadcast_to(p.reshape(-1).astype(np.int64), (B,))
    if (p < 0).any() or (p + T > limit).any():
        raise ValueError(f"pos: need 0 <= pos and pos + {T} <= {limit}, got pos={p.tolist()}")
    return p


def embedding_forward(idx, wte, wpe, pos=None, *, dropout_p: float = 0.0,
                      seed: int = 0, stream: int = 0) -> np.ndarray:
    """Token + position embedding, then embedding dropout.

    idx (B, T) integer ids in [0, V); wte (V, C); wpe (maxT, C). Row b's tokens sit at
    positions ``p_b .. p_b+T-1``, which must lie below maxT: ``pos`` None (0), an int (every
    p_b), or integer positions with one element (every p_b) or one per row (B,) (per-row).
    Returns out (B, T, C) with ``out[b, t] = wte[idx[b, t]] + wpe[p_b + t]``, passed through
    :func:`dropout_forward` with ``(dropout_p, seed, stream)`` when ``dropout_p > 0``.
    """
    dropout_p = _check_dropout_args(dropout_p, seed, stream, "dropout_p")
    idx, wte, wpe = _index(idx, "idx"), _f64(wte, "wte"), _f64(wpe, "wpe")
    if wte.ndim != 2 or wpe.ndim != 2 or wpe.shape[1] != wte.shape[1]:
        raise ValueError(f"wte, wpe: expected (V, C) and (maxT, C), got {wte.shape} and {wpe.shape}")
    _check_idx(idx, wte.shape[0], wpe.shape[0])
    B, T = idx.shape
    p = _row_positions(pos, B, T, wpe.shape[0])
    out = wte[idx] + wpe[p[:, None] + np.arange(T)[None, :]]
    return dropout_forward(out, dropout_p, seed, stream) if dropout_p > 0 else out


def embedding_backward(dout, idx, vocab_size: int, max_positions: int):
    """Gradients of :func:`embedding_forward`, as fresh arrays.

    dout (B, T, C); idx (B, T). Returns ``(dwte, dwpe)`` of shapes (vocab_size, C) and
    (max_positions, C): ``dwte[v] = sum of dout[b, t] over idx[b, t] == v`` and
    ``dwpe[t] = sum_b dout[b, t]`` (rows t >= T are zero).
    """
    dout, idx = _f64(dout, "dout"), _index(idx, "idx")
    _check_idx(idx, vocab_size, max_positions)
    B, T = idx.shape
    if dout.ndim != 3 or dout.shape[:2] != (B, T):
        raise ValueError(f"dout: expected shape ({B}, {T}, C), got {dout.shape}")
    C = dout.shape[2]
    dwte = np.zeros((vocab_size, C))
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))  # unbuffered: repeated ids all add
    dwpe = np.zeros((max_positions, C))
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


# ---- layernorm ------------------------------------------------------------------------------


def layernorm_forward(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last dimension.

    x (..., C); weight, bias (C,). Returns ``(out, mean, rstd)``: out like x, mean and rstd of
    shape x.shape[:-1], ``rstd = 1 / sqrt(var + eps)`` with the biased variance, and
    ``out = (x - mean) * rstd * weight + bias``.
    """
    x, weight, bias = _f64(x, "x"), _f64(weight, "weight"), _f64(bias, "bias")
    if x.ndim < 1:
        raise ValueError("x: expected at least one dimension (..., C)")
    C = x.shape[-1]
    _same_shape(weight, (C,), "weight")
    _same_shape(bias, (C,), "bias")
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    var = (xc * xc).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + eps)
    out = xc * rstd[..., None] * weight + bias
    return out, mean, rstd


def layernorm_backward(dout, x, mean, rstd, *, dresidual=None, weight):
    """Backward of :func:`layernorm_forward`, using the saved ``mean`` and ``rstd``.

    dout, x (..., C); mean, rstd x.shape[:-1]; dresidual like x or None; weight (C,).
    Returns ``(dx, dweight, dbias)``: dx like x (plus ``dresidual`` when given), dweight and
    dbias (C,) summed over every leading position (fresh arrays).
    """
    dout, x, weight = _f64(dout, "dout"), _f64(x, "x"), _f64(weight, "weight")
    mean, rstd = _f64(mean, "mean"), _f64(rstd, "rstd")
    _same_shape(dout, x.shape, "dout")
    _same_shape(weight, x.shape[-1:], "weight")
    _same_shape(mean, x.shape[:-1], "mean")
    _same_shape(rstd, x.shape[:-1], "rstd")
    C = x.shape[-1]
    xhat = (x - mean[..., None]) * rstd[..., None]
    dxhat = dout * weight
    # d/dx of (x - mean) * rstd: remove the gradient's mean and its component along xhat.
    dx = rstd[..., None] * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                            - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    if dresidual is not None:
        dresidual = _f64(dresidual, "dresidual")
        _same_shape(dresidual, x.shape, "dresidual")
        dx = dx + dresidual
    dweight = (dout * xhat).reshape(-1, C).sum(axis=0)
    dbias = dout.reshape(-1, C).sum(axis=0)
    return dx, dweight, dbias


def residual_layernorm_forward(x, residual, weight, bias, eps: float = 1e-5, *,
                               dropout_p: float = 0.0, seed: int = 0, stream: int = 0):
    """Dropout, residual add, then LayerNorm: ``sum = dropout(x) + residual;
    out = LayerNorm(sum)``, dropout being :func:`dropout_forward` with ``(dropout_p, seed,
    stream)`` (nothing when ``dropout_p == 0``).

    x, residual (..., C); weight, bias (C,). Returns ``(sum, out, mean, rstd)``.
    """
    dropout_p = _check_dropout_args(dropout_p, seed, stream, "dropout_p")
    x, residual = _f64(x, "x"), _f64(residual, "residual")
    _same_shape(residual, x.shape, "residual")
    if dropout_p > 0:
        x = dropout_forward(x, dropout_p, seed, stream)
    s = x + residual
    out, mean, rstd = layernorm_forward(s, weight, bias, eps)
    return s, out, mean, rstd


def residual_layernorm_backward(dout, sum, mean, rstd, *, dsum=None, weight):
    """Backward of :func:`residual_layernorm_forward`, laid out like :func:`layernorm_backward`.

    dout: gradient of ``out``; dsum: gradient reaching ``sum`` from elsewhere (the residual
    stream), or None. Returns ``(dx, dweight, dbias)``; dx is the total gradient of ``sum``,
    and so of both ``x`` and ``residual``.
    """
    return layernorm_backward(dout, sum, mean, rstd, dresidual=dsum, weight=weight)


# ---- linear ---------------------------------------------------------------------------------


def linear_forward(x, weight, bias=None, gelu: bool = False):
    """Linear layer with an optional tanh-GELU epilogue.

    x (..., K); weight (M, K) in (out, in) layout; bias (M,) or None.
    Returns ``(out, pre)`` of shape (..., M): ``pre = x @ weight.T + bias`` and
    ``out = gelu(pre)`` when ``gelu``; otherwise ``out = x @ weight.T + bias`` and pre is None.
    """
    x, weight = _f64(x, "x"), _f64(weight, "weight")
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x, weight: expected (..., K) and (M, K), got {x.shape} and {weight.shape}")
    y = x @ weight.T
    if bias is not None:
        bias = _f64(bias, "bias")
        _same_shape(bias, weight.shape[:1], "bias")
        y = y + bias
    if gelu:
        return gelu_forward(y), y
    return y, None


def linear_backward(dout, x, *, pre=None, weight, has_bias: bool = True):
    """Backward of :func:`linear_forward`.

    dout (..., M); x (..., K); weight (M, K); pre (..., M) when the layer had a GELU epilogue
    (the gradient is multiplied by gelu'(pre) first). Returns ``(dx, dweight, dbias)``:
    dx (..., K), dweight (M, K), dbias (M,) or None when ``has_bias`` is False.
    """
    dout, x, weight = _f64(dout, "dout"), _f64(x, "x"), _f64(weight, "weight")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x, weight: expected (..., K) and (M, K), got {x.shape} and {weight.shape}")
    M, K = weight.shape
    _same_shape(dout, x.shape[:-1] + (M,), "dout")
    if pre is not None:
        pre = _f64(pre, "pre")
        _same_shape(pre, dout.shape, "pre")
    g = dout if pre is None else gelu_backward(dout, pre)
    g2, x2 = g.reshape(-1, M), x.reshape(-1, K)
    dx = g @ weight
    dweight = g2.T @ x2
    dbias = g2.sum(axis=0) if has_bias else None
    return dx, dweight, dbias


# ---- the counter-based generator and dropout ------------------------------------------------
# splitmix64's finaliser over 64-bit counters, bit for bit the generator of csrc/core/hash.h
# (shared by the CPU and CUDA kernels). All arithmetic is uint64 modulo 2**64; signed counters
# enter as their two's complement bits.
#   key(seed, stream) = mix(mix(seed + G) + G * (stream + 1))
#   bits(key, i)      = mix(key + G * (i + 1))

_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_M1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _SPLITMIX_M1
    x = x ^ (x >> np.uint64(27))
    x = x * _SPLITMIX_M2
    return x ^ (x >> np.uint64(31))


def _u64(a) -> np.ndarray:
    """Integers (int64 or uint64, arrays or scalars) as their uint64 bits."""
    a = np.asarray(a)
    if a.dtype == np.uint64:
        return a
    if a.dtype.kind == "u" or (a.dtype.kind == "O"):
        return a.astype(np.uint64)
    return np.ascontiguousarray(a, dtype=np.int64).view(np.uint64)


def _hash_key(seed, stream) -> np.ndarray:
    """key(seed, stream) (broadcast over array arguments)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as intended
        h = _mix64(np.asarray(np.uint64(int(seed))) + _SPLITMIX_GAMMA)
        return _mix64(h + _SPLITMIX_GAMMA * (_u64(stream) + np.uint64(1)))


def _hash_bits(key, counters) -> np.ndarray:
    """bits(key, i) for each counter i."""
    with np.errstate(over="ignore"):
        return _mix64(_u64(key) + _SPLITMIX_GAMMA * (_u64(counters) + np.uint64(1)))


def _check_dropout_args(p, seed, stream, name: str) -> float:
    p = float(p)
    if not (0.0 <= p < 1.0):  # NaN fails too
        raise ValueError(f"{name}: expected a dropout probability with 0 <= {name} < 1, got {p}")
    for v, n in ((seed, "seed"), (stream, "stream")):
        if not 0 <= int(v) < 2 ** 64:
            raise ValueError(f"{n}: expected an int in [0, 2**64), got {v}")
    return p


def _dropout_keep(index, p: float, seed: int, stream: int) -> np.ndarray:
    """Keep bits (bool) of the elements with the given linear indices (int64 array)."""
    thr = np.uint64(math.floor(p * 2.0 ** 32))  # exact: a power-of-two product
    bits = _hash_bits(_hash_key(seed, stream), index)
    return (bits >> np.uint64(32)) >= thr


def _dropout_scale(p: float) -> float:
    """The kernels' scale: float32(1 / (1 - p)), as a float64 (exactly representable)."""
    return float(np.float32(1.0 / (1.0 - p)))


def dropout_mask(shape, p: float, seed: int, stream: int) -> np.ndarray:
    """The keep-mask (bool array of ``shape``) of dropout with probability p under (seed, stream).

    Element i (the row-major linear index) is kept iff ``(bits(key, i) >> 32) >= floor(p * 2**32)``
    with ``key = key(seed, stream)``. ``p == 0`` keeps everything.
    """
    p = _check_dropout_args(p, seed, stream, "p")
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64))
    return _dropout_keep(np.arange(n, dtype=np.int64), p, seed, stream).reshape(shape)


def dropout_forward(x, p: float, seed: int, stream: int) -> np.ndarray:
    """``x * mask * float32(1 / (1 - p))`` in float64; dropped elements are 0 (even inf/NaN)."""
    x = _f64(x, "x")
    keep = dropout_mask(x.shape, p, seed, stream)
    return np.where(keep, x * _dropout_scale(float(p)), 0.0)


def dropout_backward(dout, p: float, seed: int, stream: int) -> np.ndarray:
    """``dout * mask * float32(1 / (1 - p))``: the forward's mask, regenerated."""
    dout = _f64(dout, "dout")
    keep = dropout_mask(dout.shape, p, seed, stream)
    return np.where(keep, dout * _dropout_scale(float(p)), 0.0)


# ---- attention ------------------------------------------------------------------------------


def _split_heads(qkv: np.ndarray, n_head: int):
    """(B, T, 3C) -> q, k, v each (B, H, T, D), plus C and D."""
    if qkv.ndim != 3 or qkv.shape[2] % 3 != 0:
        raise ValueError(f"qkv: expected shape (B, T, 3C), got {qkv.shape}")
    B, T, C3 = qkv.shape
    C = C3 // 3
    if n_head < 1 or C % n_head != 0:
        raise ValueError(f"n_head: must be >= 1 and divide C={C}, got {n_head}")
    D = C // n_head
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, T, n_head, D).transpose(0, 2, 1, 3)
               for i in range(3))
    return q, k, v, C, D


def _attention_mask(T: int, window: Optional[int]) -> np.ndarray:
    """(T, T) bool: True where query t may see key s (s <= t, and t - window < s)."""
    if window is not None and window < 0:
        raise ValueError(f"window: must be None, 0 (dense) or positive, got {window}")
    t = np.arange(T)[:, None]
    s = np.arange(T)[None, :]
    allowed = s <= t
    if window:  # None or 0: dense causal
        allowed &= s > t - window
    return allowed


def _attention_probs(q_h, k_h, allowed, scale, lse_h=None):
    """Scaled, masked scores for one head (B, T, T); softmax probabilities and row lse."""
    scores = np.where(allowed, (q_h @ k_h.transpose(0, 2, 1)) * scale, -np.inf)
    if lse_h is None:
        mx = scores.max(axis=-1, keepdims=True)  # the diagonal is always allowed
        lse_h = (mx + np.log(np.exp(scores - mx).sum(axis=-1, keepdims=True)))[..., 0]
    # A key the query cannot see has probability exactly 0, whatever lse holds (a NaN or
    # infinite lse makes only the visible ones NaN).
    return np.where(allowed, np.exp(scores - lse_h[..., None]), 0.0), lse_h


def _attention_dropout(B: int, H: int, T: int, h: int, p: float, seed: int, stream: int):
    """z = mask * scale (B, T, T) for head h: probability (b, h, t, s) is element
    ((b*H + h)*T + t)*T + s of the generator; None when p == 0."""
    if p == 0.0:
        return None
    b = np.arange(B, dtype=np.int64)[:, None, None]
    t = np.arange(T, dtype=np.int64)[None, :, None]
    s = np.arange(T, dtype=np.int64)[None, None, :]
    keep = _dropout_keep(((b * H + h) * T + t) * T + s, p, seed, stream)
    return np.where(keep, _dropout_scale(p), 0.0)


def attention_forward(qkv, n_head: int, window: Optional[int] = None, *, dropout_p: float = 0.0,
                      seed: int = 0, stream: int = 0):
    """Causal multi-head self-attention.

    qkv (B, T, 3C) packed as [q | k | v]; head h uses columns h*D:(h+1)*D of each third,
    D = C / n_head. Query t attends to keys s <= t, and with ``window=w`` (w > 0) only to
    t - w < s <= t (None or 0: dense causal). Scores are scaled by 1/sqrt(D).
    Returns ``(out, lse)``: out (B, T, C) with heads concatenated; lse (B, n_head, T), the
    natural-log log-sum-exp of each row of scaled, masked scores.

    ``dropout_p > 0``: ``out = (P * Z) V`` with ``Z = mask * float32(1/(1-p))``, the mask of
    probability (b, h, t, s) being :func:`dropout_mask`'s element ``((b*H + h)*T + t)*T + s``
    under (seed, stream). lse is of the un-dropped softmax.
    """
    p_drop = _check_dropout_args(dropout_p, seed, stream, "dropout_p")
    qkv = _f64(qkv, "qkv")
    q, k, v, C, D = _split_heads(qkv, int(n_head))
    B, H, T, _ = q.shape
    allowed = _attention_mask(T, window)
    scale = 1.0 / math.sqrt(D)
    out = np.empty((B, H, T, D))
    lse = np.empty((B, H, T))
    for h in range(H):  # one (B, T, T) score matrix at a time
        p, lse[:, h] = _attention_probs(q[:, h], k[:, h], allowed, scale)
        z = _attention_dropout(B, H, T, h, p_drop, seed, stream)
        out[:, h] = (p if z is None else p * z) @ v[:, h]
    return out.transpose(0, 2, 1, 3).reshape(B, T, C), lse


def attention_backward(dout, qkv, out, lse, n_head: int, window: Optional[int] = None, *,
                       dropout_p: float = 0.0, seed: int = 0, stream: int = 0):
    """Backward of :func:`attention_forward`, from the saved ``out`` and ``lse``.

    dout, out (B, T, C); qkv (B, T, 3C); lse (B, n_head, T). Returns dqkv (B, T, 3C).
    The probabilities are rebuilt as ``exp(score - lse)``; with ``delta = rowsum(dout * out)``
    the score gradient is ``p * (dout @ v^T - delta)``. With dropout (the forward's dropout_p,
    seed, stream) the mask is regenerated: ``dv = (p * z)^T dout`` and the score gradient is
    ``p * (z * (dout @ v^T) - delta)``.
    """
    p_drop = _check_dropout_args(dropout_p, seed, stream, "dropout_p")
    qkv, dout, out, lse = _f64(qkv, "qkv"), _f64(dout, "dout"), _f64(out, "out"), _f64(lse, "lse")
    q, k, v, C, D = _split_heads(qkv, int(n_head))
    B, H, T, _ = q.shape
    _same_shape(dout, (B, T, C), "dout")
    _same_shape(out, (B, T, C), "out")
    _same_shape(lse, (B, H, T), "lse")
    allowed = _attention_mask(T, window)
    scale = 1.0 / math.sqrt(D)
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    delta = (dout * out).reshape(B, T, H, D).sum(axis=-1).transpose(0, 2, 1)  # (B, H, T)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    for h in range(H):
        p, _ = _attention_probs(q[:, h], k[:, h], allowed, scale, lse[:, h])
        z = _attention_dropout(B, H, T, h, p_drop, seed, stream)
        dp = do[:, h] @ v[:, h].transpose(0, 2, 1)
        if z is not None:
            dv[:, h] = (p * z).transpose(0, 2, 1) @ do[:, h]
            dp = dp * z
        else:
            dv[:, h] = p.transpose(0, 2, 1) @ do[:, h]
        ds = p * (dp - delta[:, h, :, None]) * scale  # gradient of the unscaled q.k
        dq[:, h] = ds @ k[:, h]
        dk[:, h] = ds.transpose(0, 2, 1) @ q[:, h]
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)


# ---- cross-entropy --------------------------------------------------------------------------


def _ce_prepare(logits, targets, vocab_size, ignore_index):
    """Flatten to (N, Vp) / (N,), check the targets, and take each row's log-sum-exp over the
    real classes. Returns (logits, real-class view (N, V), safe targets, valid mask, lse)."""
    logits, targets = _f64(logits, "logits"), _index(targets, "targets")
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits, targets: expected (..., Vp) and (...), got {logits.shape} "
                         f"and {targets.shape}")
    Vp = logits.shape[-1]
    V = Vp if vocab_size is None else int(vocab_size)
    if not 1 <= V <= Vp:
        raise ValueError(f"vocab_size: must lie in [1, {Vp}], got {V}")
    lg = logits.reshape(-1, Vp)[:, :V]
    t = targets.reshape(-1)
    valid = t != ignore_index
    if ((t[valid] < 0) | (t[valid] >= V)).any():
        raise ValueError(f"targets: must lie in [0, {V}) or equal ignore_index={ignore_index}")
    t_safe = np.where(valid, t, 0)
    mx = lg.max(axis=1, keepdims=True)
    shifted = lg - mx  # the one (N, V) temporary
    np.exp(shifted, out=shifted)
    lse = mx[:, 0] + np.log(shifted.sum(axis=1))
    return logits, lg, t_safe, valid, lse


def cross_entropy_forward(logits, targets, vocab_size: Optional[int] = None,
                          ignore_index: int = -1) -> np.ndarray:
    """Per-position softmax cross-entropy.

    logits (..., Vp); targets (...) integers. Only the first V = vocab_size (default Vp)
    columns are classes. Returns losses shaped like targets:
    ``logsumexp(logits[:V]) - logits[target]``, 0 where ``targets == ignore_index``.
    A target outside [0, V) that is not ignore_index raises ValueError.
    """
    _, lg, t, valid, lse = _ce_prepare(logits, targets, vocab_size, ignore_index)
    losses = np.where(valid, lse - lg[np.arange(lg.shape[0]), t], 0.0)
    return losses.reshape(np.shape(targets))


def cross_entropy_backward(logits, targets, vocab_size: Optional[int] = None,
                           ignore_index: int = -1, grad_scale: Optional[float] = None) -> np.ndarray:
    """Gradient of ``grad_scale * sum(losses)`` with respect to the logits.

    Returns dlogits shaped like logits: ``grad_scale * (softmax(logits[:V]) - onehot(target))``
    in the first V columns, 0 in padding columns and in ignored rows. grad_scale defaults to
    1 / (number of non-ignored targets), the gradient of the mean loss (all zeros when every
    target is ignored).
    """
    logits, lg, t, valid, lse = _ce_prepare(logits, targets, vocab_size, ignore_index)
    n_valid = int(valid.sum())
    if grad_scale is None:
        grad_scale = 1.0 / n_valid if n_valid else 0.0
    N, V = lg.shape
    dlogits = np.zeros((N, logits.shape[-1]))
    g = dlogits[:, :V]  # a view: padding columns stay 0
    np.subtract(lg, lse[:, None], out=g)
    np.exp(g, out=g)  # softmax
    g[np.arange(N), t] -= 1.0
    g *= float(grad_scale)
    g[~valid] = 0.0  # ignored rows: 0 even when their logits hold NaN or inf
    return dlogits.reshape(logits.shape)


def cross_entropy_forward_backward(logits, targets, vocab_size: Optional[int] = None,
                                   ignore_index: int = -1, grad_scale: Optional[float] = None):
    """The fused op's pair: ``(losses, dlogits)`` of :func:`cross_entropy_forward` and
    :func:`cross_entropy_backward`."""
    return (cross_entropy_forward(logits, targets, vocab_size, ignore_index),
            cross_entropy_backward(logits, targets, vocab_size, ignore_index, grad_scale))


# ---- optimiser ------------------------------------------------------------------------------


def adamw_step(param, grad, m, v, *, decay: bool = True, lr: float, beta1: float = 0.9,
               beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0, step: int,
               grad_scale: float = 1.0):
    """One AdamW step on one tensor, functional (the inputs are not modified).

    ``g = grad * grad_scale``; ``m' = b1 m + (1-b1) g``; ``v' = b2 v + (1-b2) g^2``;
    ``p' = p - lr * (mhat / (sqrt(vhat) + eps) + wd * p)`` with ``mhat = m' / (1 - b1^step)``,
    ``vhat = v' / (1 - b2^step)`` and ``wd = weight_decay if decay else 0``. ``step`` counts
    from 1. Returns ``(new_param, new_m, new_v)``, all shaped like param.
    """
    p, g = _f64(param, "param"), _f64(grad, "grad")
    m, v = _f64(m, "m"), _f64(v, "v")
    for a, name in ((g, "grad"), (m, "m"), (v, "v")):
        _same_shape(a, p.shape, name)
    if int(step) < 1:
        raise ValueError(f"step: counts from 1, got {step}")
    g = g * grad_scale
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * g * g
    mhat = m_new / (1.0 - beta1 ** step)
    vhat = v_new / (1.0 - beta2 ** step)
    wd = weight_decay if decay else 0.0
    p_new = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
    return p_new, m_new, v_new


def global_norm(tensors: Sequence) -> float:
    """sqrt of the sum of squares of every element of every array (float64 accumulation)."""
    total = 0.0
    for i, a in enumerate(tensors):
        a = _f64(a, f"tensors[{i}]").reshape(-1)
        total += float(a @ a)
    return math.sqrt(total)


# ---- KV-cache attention (decoding) ----------------------------------------------------------


def attention_kvcache(qkv, k_cache, v_cache, pos, n_head: int,
                      window: Optional[int] = None):
    """Decoding attention over a KV cache (the semantics of ``ops.attention_kvcache``).

    qkv (B, Tn, 3C) holds row b's Tn new tokens at absolute positions p_b .. p_b+Tn-1 (``pos``
    an int: every p_b; integer positions with one element, or one per row (B,): per-row);
    k_cache and v_cache are (B, n_head, Tmax, D). The new keys and values are written at those
    positions of row b, then its new token i attends to row b's cache positions s <= p_b+i
    (and, with ``window=w``, s > p_b+i-w). Pure: returns ``(out, k_cache_new, v_cache_new)``,
    out (B, Tn, C), leaving the inputs untouched (the op updates its caches in place).
    """
    if not isinstance(pos, numbers.Integral):  # per-row positions: each row on its own
        qkv_a = _f64(qkv, "qkv")
        kc_a, vc_a = _f64(k_cache, "k_cache"), _f64(v_cache, "v_cache")
        if qkv_a.ndim != 3 or kc_a.ndim != 4:
            raise ValueError(f"qkv, k_cache: expected (B, Tn, 3C) and (B, H, Tmax, D), "
                             f"got {qkv_a.shape} and {kc_a.shape}")
        B, Tn = qkv_a.shape[:2]
        p = _row_positions(pos, B, Tn, kc_a.shape[2])
        rows = [attention_kvcache(qkv_a[b:b + 1], kc_a[b:b + 1], vc_a[b:b + 1], int(p[b]),
                                  n_head, window) for b in range(B)]
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*rows))
    qkv = _f64(qkv, "qkv")
    q, k, v, C, D = _split_heads(qkv, int(n_head))
    B, H, Tn, _ = q.shape
    kc = _f64(k_cache, "k_cache").copy()
    vc = _f64(v_cache, "v_cache").copy()
    if kc.ndim != 4 or kc.shape[:2] != (B, H) or kc.shape[3] != D:
        raise ValueError(f"k_cache: expected shape ({B}, {H}, Tmax, {D}), got {kc.shape}")
    _same_shape(vc, kc.shape, "v_cache")
    Tmax = kc.shape[2]
    pos = int(pos)
    if pos < 0 or pos + Tn > Tmax:
        raise ValueError(f"pos: need 0 <= pos and pos + {Tn} <= {Tmax}, got pos={pos}")
    if window is not None and window < 1:
        raise ValueError(f"window: expected None or >= 1, got {window}")
    kc[:, :, pos:pos + Tn] = k
    vc[:, :, pos:pos + Tn] = v
    L = pos + Tn  # keys that exist after the append
    t = pos + np.arange(Tn)[:, None]
    s = np.arange(L)[None, :]
    allowed = s <= t
    if window is not None:
        allowed &= s > t - window
    scores = np.where(allowed, (q @ kc[:, :, :L].transpose(0, 1, 3, 2)) / math.sqrt(D), -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)  # each query sees itself
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    vis = vc[:, :, :L]
    if np.isfinite(vis).all():
        out = p @ vis  # (B, H, Tn, D)
    else:  # a key a query cannot see yet contributes nothing, not 0 * inf = NaN
        out = np.where(allowed[..., None], p[..., None] * vis[:, :, None], 0.0).sum(axis=-2)
    return out.transpose(0, 2, 1, 3).reshape(B, Tn, C), kc, vc


# ---- sampling -------------------------------------------------------------------------------
# The uniform number of a draw: three splitmix64 steps over (seed, row, counter) (the generator
# above), the same bits as csrc/cpu/sampling.cpp and csrc/cuda/sampling.cu (the formula is in
# csrc/core/ops.h).


def _sample_uniform(seed: int, rows, counters) -> np.ndarray:
    """u in [0, 1) for each (row, counter): the number the sampler draws with (float64)."""
    rows = np.asarray(rows, dtype=np.int64)
    counters = np.asarray(counters, dtype=np.int64)
    rows, counters = np.broadcast_arrays(rows, counters)
    h = _hash_bits(_hash_key(seed, rows), counters)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _sample_filter(z: np.ndarray, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> np.ndarray:
    """One row's unnormalised sampling weights (V,) after temperature, top-k and top-p: 0 for
    every token that cannot be drawn. z (V,) float64 adjusted logits, at least one finite."""
    finite = np.isfinite(z)
    zf = z[finite]
    keep = finite.copy()
    if top_k is not None and top_k < zf.size:
        kth = np.sort(zf)[zf.size - top_k]  # the k-th largest; ties with it stay
        keep &= np.where(finite, z, -np.inf) >= kth
    p = np.zeros(z.shape)
    p[keep] = np.exp((z[keep] - zf.max()) / temperature)
    if top_p is not None and top_p < 1:
        kp = p[keep]
        target = top_p * kp.sum()
        sp = np.sort(kp)[::-1]
        m = min(int(np.searchsorted(np.cumsum(sp), target, side="left")), sp.size - 1)
        p[p < sp[m]] = 0.0  # ties with the m-th stay
    return p


def sample_tokens(logits, *, counts=None, counter=None, logit_bias=None, forced=None,
                  vocab_size: Optional[int] = None, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: int = 0):
    """Next-token sampling, one token per row of logits (the semantics of
    :func:`gptcore.ops.sample_tokens`, computed in float64).

    Pure, unlike the op: returns ``(tokens, counts, counter)`` where tokens is (B,) int32 and
    counts, counter are updated copies of the given arrays (None where not given).
    """
    lg = _f64(logits, "logits")
    if lg.ndim != 2 or lg.size == 0:
        raise ValueError(f"logits: expected a non-empty (B, Vp) array, got shape {lg.shape}")
    B, Vp = lg.shape
    V = Vp if vocab_size is None else int(vocab_size)
    if not 1 <= V <= Vp:
        raise ValueError(f"vocab_size: must lie in [1, {Vp}], got {V}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected None or >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p}")
    for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v}")
    z = lg[:, :V].copy()
    if logit_bias is not None:
        bias = _f64(logit_bias, "logit_bias")
        _same_shape(bias, (V,), "logit_bias")
        z += bias
    if counts is not None:
        counts = _index(counts, "counts").copy()
        _same_shape(counts, (B, V), "counts")
        z -= counts * float(frequency_penalty) + (counts > 0) * float(presence_penalty)
    elif frequency_penalty != 0 or presence_penalty != 0:
        raise ValueError("counts: frequency_penalty and presence_penalty need counts (B, V)")
    if counter is not None:
        counter = _index(counter, "counter").copy()
        _same_shape(counter, (B,), "counter")
    c = counter if counter is not None else np.zeros(B, np.int64)
    f = np.full(B, -1, np.int64)
    if forced is not None:
        f = _index(forced, "forced")
        _same_shape(f, (B,), "forced")
        if (f >= V).any():
            raise ValueError(f"forced: token ids must be < vocab_size {V}, got {int(f.max())}")
    u = _sample_uniform(seed, np.arange(B), c)
    tokens = np.empty(B, np.int32)
    for b in range(B):
        if f[b] >= 0:  # forced: nothing else of the row changes
            tokens[b] = f[b]
            continue
        finite = np.isfinite(z[b])
        if not finite.any():
            t = -1
        elif temperature == 0:
            t = int(np.argmax(np.where(finite, z[b], -np.inf)))  # first of equal maxima
        else:
            w = _sample_filter(z[b], temperature, top_k, top_p)
            cum = np.cumsum(w)  # in index order
            t = int(np.searchsorted(cum, u[b] * cum[-1], side="right"))
            if t == V:  # u * sum rounded up to the sum: the last token that can be drawn
                t = int(np.flatnonzero(w > 0)[-1])
        tokens[b] = t
        if counts is not None and t >= 0:
            counts[b, t] += 1
        if counter is not None:
            counter[b] += 1
    return tokens, counts, counter
