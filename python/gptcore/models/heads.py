"""Heads: small modules on top of the trunk's final hidden states.

The trunk (:class:`gptcore.models.gpt.GPT`) maps ids to hidden states ``h`` (B, T, C) and takes
a gradient on them back (``model.backward(dh=...)``). A head reads ``h`` at chosen positions,
owns its parameters (named ``<head name>.weight`` / ``.bias`` in the model's ``parameters()``
and in checkpoints once attached with ``model.add_head``), and returns the gradient on ``h``.

* :class:`LinearHead` -- a linear map from the hidden state of one token per row: GPT-1's task
  classifier on the extract token (``n_out`` classes), a scalar reward or value (``n_out=1``),
  one score per choice for multiple choice.
* The LM head is the model's own (tied to the token embedding, with the fused cross-entropy):
  ``model.forward(idx, targets, loss_scale=lam)`` adds ``lam * LM loss`` to a combined loss.
  :class:`LMHead` is the same head seen from outside, for losses made of per-token
  log-probabilities (scoring a continuation, preference losses).

Losses on head outputs are small host computations (:func:`softmax_cross_entropy`,
:func:`mse_loss`), each returning the loss and its gradient.

    >>> head = LinearHead(cfg.n_embd, 2, name="score", dropout=0.1); model.add_head(head)
    >>> h = model.hidden_states(ids)                     # or model.forward(ids, targets, loss_scale=0.5)
    >>> logits = head.forward(gather_rows(h, extract))   # (B, 2)
    >>> loss, dlogits = softmax_cross_entropy(logits, labels)
    >>> model.backward(dh=scatter_rows(head.backward(dlogits), extract, h.shape))
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .. import ops
from ..tensor import Tensor, float_input, from_numpy, upload, zeros

__all__ = ["LinearHead", "LMHead", "gather_rows", "scatter_rows", "softmax_cross_entropy", "mse_loss"]

# the dropout stream of a head is (step << 12) | _HEAD_SITE, apart from the trunk's sites
_HEAD_SITE = 4095


class LinearHead:
    """``out = dropout(x) @ weight.T + bias`` on rows x (N, C) taken from the hidden states.

    ``weight`` (n_out, C) starts N(0, ``init_std``), ``bias`` zero. Dropout (GPT-1 used 0.1
    before its classifier) applies while ``training`` is True, with masks keyed by (seed, the
    head's forward count), regenerated in backward. Parameter gradients accumulate into
    ``grads()`` until ``zero_grad()`` (the model's zero_grad covers attached heads).
    """

    def __init__(self, n_embd: int, n_out: int, name: str = "score", *, bias: bool = True,
                 dropout: float = 0.0, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 init_std: float = 0.02):
        for arg, v in (("n_embd", n_embd), ("n_out", n_out)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{arg}: expected an int >= 1, got {v!r}")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"name: expected a non-empty name without dots, got {name!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.name, self.n_embd, self.n_out = name, int(n_embd), int(n_out)
        self.dropout, self.seed, self.training = float(dropout), int(seed), True
        self.device, self.dtype = device, dtype
        rng = np.random.default_rng(self.seed)
        w = (rng.standard_normal((self.n_out, self.n_embd), dtype=np.float32) * np.float32(init_std))
        self._params: Dict[str, Tensor] = {"weight": upload(w, device, dtype)}
        self._grads: Dict[str, Tensor] = {"weight": zeros([self.n_out, self.n_embd], "float32", device)}
        if bias:
            self._params["bias"] = zeros([self.n_out], dtype, device)
            self._grads["bias"] = zeros([self.n_out], "float32", device)
        self.step = 0  # forwards run with dropout so far (keys the masks)
        self._saved: Optional[Tuple[Tensor, Optional[int]]] = None

    def parameters(self) -> Dict[str, Tensor]:
        return dict(self._params)

    def grads(self) -> Dict[str, Tensor]:
        return dict(self._grads)

    def zero_grad(self) -> None:
        for g in self._grads.values():
            g.zero_()

    def train(self, mode: bool = True) -> "LinearHead":
        self.training = bool(mode)
        return self

    def eval(self) -> "LinearHead":
        return self.train(False)

    def _stream(self, step: int) -> int:
        return (step << 12) | _HEAD_SITE

    def forward(self, rows) -> np.ndarray:
        """rows (N, C) (NumPy or Tensor) -> float32 NumPy outputs (N, n_out); keeps what
        :meth:`backward` needs."""
        x = _rows_tensor(rows, self.n_embd, self.device, self.dtype)
        step = None
        if self.training and self.dropout > 0:
            step, self.step = self.step, self.step + 1
            x = ops.dropout_forward(x, self.dropout, self.seed, self._stream(step))
        out, _ = ops.linear_forward(x, self._params["weight"], self._params.get("bias"))
        self._saved = (x, step)
        return np.array(out.numpy(), dtype=np.float32)

    __call__ = forward

    def backward(self, dout) -> np.ndarray:
        """Gradient (N, n_out) of the loss on the last forward's outputs -> gradient on its rows
        (N, C), float32 NumPy; accumulates the parameter gradients."""
        if self._saved is None:
            raise RuntimeError(f"{self.name}.backward: call forward first (once per forward)")
        x, step = self._saved
        d = np.ascontiguousarray(np.asarray(dout, dtype=np.float32))
        if d.shape != (x.shape[0], self.n_out):
            raise ValueError(f"dout: expected shape {(x.shape[0], self.n_out)}, got {d.shape}")
        self._saved = None
        d_t = float_input(d, "dout", self.device, self.dtype)
        dx = ops.linear_backward(d_t, x, weight=self._params["weight"],
                                 dweight=self._grads["weight"], dbias=self._grads.get("bias"))
        if step is not None:
            dx = ops.dropout_backward(dx, self.dropout, self.seed, self._stream(step), inplace=True)
        return np.array(dx.numpy(), dtype=np.float32)



class LMHead:
    """The model's tied LM head as a head: ``logits = h @ wte.T`` over the real vocabulary.

    It owns no parameters (``wte`` is the trunk's, and its gradient lands in the model's
    ``wte`` gradient). Plain LM training should call ``model.forward(idx, targets)``, where the
    same head runs with the fused cross-entropy writing the gradient in place; this object is
    for losses built from per-token log-probabilities:

        >>> lm = LMHead(model)
        >>> h = model.hidden_states(ids)
        >>> logp = lm.token_logprobs(h, targets)          # (B, T), 0 where targets < 0
        >>> model.backward(dh=lm.backward(dloss_dlogp))   # any per-token weights
    """

    name = "lm_head"

    def __init__(self, model):
        if not hasattr(model, "hidden_states") or "wte" not in model.parameters():
            raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
        self.model = model
        self._saved = None

    def token_logprobs(self, h, targets) -> np.ndarray:
        """log p(targets[b, t] | the sequence up to t) for hidden states h (B, T, C) and integer
        targets (B, T): float32 (B, T), 0 where a target is negative (ignored). Keeps the softmax
        gradient for :meth:`backward` (in the (B*T, padded vocab) logits buffer)."""
        model = self.model
        V, C = model.config.vocab_size, model.config.n_embd
        h_t = float_input(h, "h", model.device, model.dtype)
        if h_t.ndim != 3 or h_t.shape[2] != C:
            raise ValueError(f"h: expected hidden states (B, T, {C}), got {tuple(h_t.shape)}")
        B, T = h_t.shape[0], h_t.shape[1]
        tgt = np.asarray(targets)
        if tgt.dtype == np.bool_ or not np.issubdtype(tgt.dtype, np.integer) or tgt.shape != (B, T):
            raise ValueError(f"targets: expected integer ids of shape {(B, T)}, got {tgt.dtype} {tgt.shape}")
        if tgt.size and tgt.max() >= V:
            raise ValueError(f"targets: id {int(tgt.max())} is outside the vocabulary [0, {V})")
        tgt = np.where(tgt < 0, -1, tgt).astype(np.int32)
        tgt_t = from_numpy(np.ascontiguousarray(tgt.reshape(-1)), "targets")
        if model.device != "cpu":
            tgt_t = tgt_t.to(device=model.device)
        h2 = h_t.view([B * T, C])
        logits, _ = ops.linear_forward(h2, model.parameters()["wte"], None)
        # dlogits = softmax - onehot (grad_scale 1) overwrites the logits: d(-logp)/dlogits
        losses, _ = ops.cross_entropy_forward_backward(logits, tgt_t, V, -1, grad_scale=1.0,
                                                       inplace=True)
        self._saved = (h2, logits, (B, T))
        return -np.asarray(losses.numpy(), dtype=np.float32).reshape(B, T)

    def backward(self, dlogprobs) -> Tensor:
        """Gradient (B, T) of the loss on the last :meth:`token_logprobs` -> gradient on the
        hidden states (B, T, C) (a Tensor for ``model.backward(dh=...)``); accumulates the
        model's ``wte`` gradient. Ignored positions get none."""
        if self._saved is None:
            raise RuntimeError("lm_head.backward: call token_logprobs first (once per call)")
        h2, dlogits, (B, T) = self._saved
        w = np.asarray(dlogprobs, dtype=np.float32)
        if w.shape != (B, T):
            raise ValueError(f"dlogprobs: expected shape {(B, T)}, got {w.shape}")
        self._saved = None
        # d(sum w * logp)/dlogits = -w * (softmax - onehot): scale each row of the kept gradient
        # (on the host: there is no row-scaling op, so CUDA takes a round trip here)
        if dlogits.device == "cpu":
            np.asarray(dlogits.numpy())[...] *= -w.reshape(-1, 1)
        else:
            scaled = np.asarray(dlogits.numpy(), np.float32) * -w.reshape(-1, 1)
            dlogits.copy_(upload(scaled, dlogits.device, dlogits.dtype))
        model = self.model
        dh = ops.linear_backward(dlogits, h2, weight=model.parameters()["wte"],
                                 dweight=model.grads()["wte"])
        return dh.view([B, T, model.config.n_embd])


def _rows_tensor(rows, C: int, device: str, dtype: str) -> Tensor:
    t = float_input(rows, "rows", device, dtype)
    if t.ndim != 2 or t.shape[1] != C:
        raise ValueError(f"rows: expected shape (N, {C}), got {tuple(t.shape)}")
    return t


def _positions(positions, B: int, T: int) -> np.ndarray:
    pos = np.asarray(positions)
    if pos.dtype == np.bool_ or not np.issubdtype(pos.dtype, np.integer):
        raise TypeError(f"positions: expected integer positions, got dtype {pos.dtype}")
    if pos.shape != (B,):
        raise ValueError(f"positions: expected one position per row, shape ({B},), got {pos.shape}")
    if B and (pos.min() < 0 or pos.max() >= T):
        raise ValueError(f"positions: expected values in [0, {T}), got {pos.min()}..{pos.max()}")
    return pos.astype(np.int64)


def gather_rows(h, positions) -> np.ndarray:
    """The hidden state of one position per row: h (B, T, C), positions (B,) -> (B, C) float32."""
    arr = np.asarray(h.numpy() if isinstance(h, Tensor) else h)
    if arr.ndim != 3:
        raise ValueError(f"h: expected (B, T, C) hidden states, got shape {arr.shape}")
    pos = _positions(positions, arr.shape[0], arr.shape[1])
    return np.array(arr[np.arange(arr.shape[0]), pos], dtype=np.float32)


def scatter_rows(drows, positions, shape: Sequence[int]) -> np.ndarray:
    """The gradient on hidden states of shape (B, T, C) that is ``drows`` (B, C) at one position
    per row and zero elsewhere (what :func:`gather_rows`'s backward is)."""
    B, T, C = (int(s) for s in shape)
    d = np.asarray(drows, dtype=np.float32)
    if d.shape != (B, C):
        raise ValueError(f"drows: expected shape {(B, C)}, got {d.shape}")
    pos = _positions(positions, B, T)
    out = np.zeros((B, T, C), np.float32)
    np.add.at(out, (np.arange(B), pos), d)
    return out


def softmax_cross_entropy(logits, labels) -> Tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of (N, K) scores against (N,) integer labels (classification,
    or multiple choice with one score per choice). Returns (loss, dlogits of the mean)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"labels: expected shape ({z.shape[0]},) for logits {z.shape}, got {y.shape}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer) or (
            y.size and (y.min() < 0 or y.max() >= z.shape[1])):
        raise ValueError(f"labels: expected integers in [0, {z.shape[1]})")
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    n = z.shape[0]
    loss = float((lse - z[np.arange(n), y]).mean())
    d = np.exp(z - lse[:, None])
    d[np.arange(n), y] -= 1.0
    return loss, (d / n).astype(np.float32)


def mse_loss(pred, target) -> Tuple[float, np.ndarray]:
    """Mean squared error of (N, 1) or (N,) predictions (regression, e.g. similarity scores).
    Returns (loss, dpred of the mean) shaped like ``pred``."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64).reshape(p.shape)
    diff = p - t
    return float((diff ** 2).mean()), (2.0 * diff / diff.size).astype(np.float32)
