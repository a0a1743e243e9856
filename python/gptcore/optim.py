"""AdamW over a GPT's parameters, gradient clipping by global norm, and LR schedules.

The update itself is one fused op (``ops.adamw_step``) over every tensor; clipping costs one
``ops.global_norm`` and is folded into the update as ``grad_scale``, so gradients are never
rewritten. With bfloat16 parameters (CUDA) the optimiser keeps float32 master weights and the
op writes a stochastically rounded bfloat16 copy back into the model.

Gradient accumulation needs nothing here: parameter gradients accumulate (+=) across
``model.backward()`` calls until ``model.zero_grad()``; scale each micro-batch's loss by
``1 / accum`` (``model.forward(x, y, loss_scale=1 / accum)``) so the sum is the mean.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from . import ops
from .tensor import from_numpy, zeros

__all__ = ["AdamW", "lr_at", "cosine_lr", "linear_lr"]


def _finite_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
    return value


class AdamW:
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) for a :class:`gptcore.GPT`.

    Weight decay applies only to 2-D weights (the embeddings and every linear weight), never to
    biases or LayerNorm gains. ``step(lr=None, grad_clip=None)`` applies one update from the
    model's accumulated gradients and returns the global gradient norm before clipping.
    """

    def __init__(self, model, lr: float = 6e-4, betas: Tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, seed: int = 0):
        if not (hasattr(model, "parameters") and hasattr(model, "grads")):
            raise TypeError(f"model: expected a gptcore.GPT (with parameters() and grads()), "
                            f"got {type(model).__name__}")
        self.lr = _finite_nonneg("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas: expected 0 <= beta < 1, got {betas!r}")
        self.betas = (b1, b2)
        self.eps = _finite_nonneg("eps", eps)
        if self.eps == 0.0:
            raise ValueError("eps: expected > 0")
        self.weight_decay = _finite_nonneg("weight_decay", weight_decay)
        self.seed = int(seed)
        params, grads = model.parameters(), model.grads()
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.grads = [grads[n] for n in self.names]
        self.decay = [p.ndim == 2 for p in self.params]
        device = self.params[0].device
        self.m = [zeros(list(p.shape), "float32", device) for p in self.params]
        self.v = [zeros(list(p.shape), "float32", device) for p in self.params]
        # float32 master weights when the parameters are bfloat16
        self.master = None
        if any(p.dtype != "float32" for p in self.params):
            self.master = [p.to(dtype="float32") for p in self.params]
        self.t = 0  # completed steps (AdamW's bias correction counts from 1)

    def sync_master(self) -> None:
        """Refresh the float32 master weights from the parameters (after loading new weights)."""
        if self.master is not None:
            for mw, p in zip(self.master, self.params):
                mw.copy_(p.to(dtype="float32"))

    def grad_norm(self) -> float:
        """The global L2 norm of every gradient."""
        return ops.global_norm(self.grads)

    def step(self, lr: Optional[float] = None, grad_clip: Optional[float] = None) -> float:
        """One AdamW update; returns the gradient norm (before clipping).

        ``lr`` overrides the optimiser's lr for this step (schedules pass it every step).
        ``grad_clip``: when the global norm exceeds it, gradients are scaled to that norm.
        A non-finite gradient norm skips the update (the step is not counted) and is returned
        so the caller can decide what to do.
        """
        lr = self.lr if lr is None else _finite_nonneg("lr", lr)
        norm = ops.global_norm(self.grads)
        if not math.isfinite(norm):
            return norm
        scale = 1.0
        if grad_clip is not None:
            clip = _finite_nonneg("grad_clip", grad_clip)
            if clip > 0 and norm > clip:
                scale = clip / (norm + 1e-6)
        self.t += 1
        ops.adamw_step(self.params, self.grads, self.m, self.v, lr=lr, step=self.t,
                       beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                       weight_decay=self.weight_decay, decay=self.decay, grad_scale=scale,
                       master=self.master, seed=self.seed * 1_000_003 + self.t)
        return norm

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> Dict:
        """Hyper-parameters, the step count and float32 NumPy copies of m, v (and master)."""
        def host(ts):
            return {n: np.array(t.numpy(), dtype=np.float32, copy=True) for n, t in zip(self.names, ts)}
        state = {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                 "weight_decay": self.weight_decay, "seed": self.seed,
                 "m": host(self.m), "v": host(self.v)}
        if self.master is not None:
            state["master"] = host(self.master)
        return state

    def load_state_dict(self, state: Dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        for key in ("t", "m", "v"):
            if key not in state:
                raise ValueError(f"state: missing {key!r}")
        staged = {}
        groups = ("m", "v") + (("master",) if self.master is not None else ())
        for group in groups:
            src = state.get(group)
            if src is None:  # bf16 model restored from a float32 run: start master from params
                continue
            missing = [n for n in self.names if n not in src]
            if missing:
                raise ValueError(f"state[{group!r}]: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
            for n, p in zip(self.names, self.params):
                arr = np.ascontiguousarray(np.asarray(src[n], dtype=np.float32))
                if tuple(arr.shape) != tuple(p.shape):
                    raise ValueError(f"state[{group!r}][{n!r}]: expected shape {tuple(p.shape)}, got {arr.shape}")
                staged[(group, n)] = arr
        if self.master is not None and state.get("master") is None:
            self.sync_master()  # a float32 checkpoint: the masters start from the parameters
        for (group, n), arr in staged.items():
            i = self.names.index(n)
            target = getattr(self, group)[i]
            target.copy_(from_numpy(arr, n).to(device=target.device))
        self.t = int(state["t"])
        for key in ("lr", "eps", "weight_decay"):
            if key in state:
                setattr(self, key, float(state[key]))
        if "betas" in state:
            self.betas = tuple(float(b) for b in state["betas"])
        if "seed" in state:
            self.seed = int(state["seed"])


# ---- learning-rate schedules ---------------------------------------------------------------


def cosine_lr(step: int, max_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps to ``max_lr``, then cosine decay to ``min_lr`` at ``total``.

    ``step`` counts from 0; the first step already has a non-zero rate (max_lr / warmup).
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    frac = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (max_lr - min_lr)


def linear_lr(step: int, max_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup to ``max_lr``, then linear decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    frac = (step - warmup) / max(total - warmup, 1)
    return max_lr + frac * (min_lr - max_lr)


def lr_at(schedule: str, step: int, max_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """``schedule`` is 'cosine', 'linear' or 'constant' (warmup applies to all three)."""
    if schedule == "cosine":
        return cosine_lr(step, max_lr, warmup, total, min_lr)
    if schedule == "linear":
        return linear_lr(step, max_lr, warmup, total, min_lr)
    if schedule == "constant":
        return max_lr * (step + 1) / warmup if step < warmup else max_lr
    raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', got {schedule!r}")
