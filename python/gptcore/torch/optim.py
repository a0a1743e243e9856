"""gptcore's fused multi-tensor AdamW kernel as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import ops as _ops
from .ops import _g, _on

__all__ = ["AdamW"]

# keys of our per-parameter state that stay float32 whatever the parameter's dtype
_FP32_STATE = ("exp_avg", "exp_avg_sq", "master")


class AdamW(torch.optim.Optimizer):
    """Drop-in for ``torch.optim.AdamW`` that updates all parameters of a group (sharing a
    device and step count) with one call of gptcore's fused AdamW kernel.

    Same arguments, defaults and update as ``torch.optim.AdamW`` (decoupled weight decay,
    bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``); ``amsgrad``, ``maximize`` and
    ``differentiable`` are not supported (ValueError); ``foreach``, ``fused`` and ``capturable``
    are accepted and kept in the param groups but change nothing (the kernel is always one fused
    multi-tensor pass). The state has torch's layout and names
    (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter, the same param_group keys), so state
    dicts load both ways between this class and ``torch.optim.AdamW``.

    bfloat16 parameters (CUDA) get float32 moments and float32 master weights (state key
    ``master``); the kernel updates the master and writes a stochastically rounded bfloat16 copy
    into the parameter. ``torch.optim.AdamW`` keeps bf16 moments instead, so for bf16 the two
    agree only to bf16 precision.

    ``max_grad_norm`` (an addition; default None): clip by the global gradient norm inside the
    step, as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` followed by the step
    would, but with one reading pass over the gradients (gptcore's ``global_norm``) and the
    scale folded into the update, so the gradients are never rewritten. The norm before
    clipping is kept in ``last_grad_norm``. On CUDA reading the norm waits for the device.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 foreach=None, capturable: bool = False, differentiable: bool = False,
                 fused=None, seed: int = 0, max_grad_norm: Optional[float] = None):
        lr_value = float(lr)
        if not (math.isfinite(lr_value) and lr_value >= 0):
            raise ValueError(f"lr: expected a finite value >= 0, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= float(b) < 1.0 for b in betas)):
            raise ValueError(f"betas: expected a pair with 0 <= beta < 1, got {betas!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps: expected > 0, got {eps!r}")
        if not (math.isfinite(float(weight_decay)) and float(weight_decay) >= 0):
            raise ValueError(f"weight_decay: expected a finite value >= 0, got {weight_decay!r}")
        for name, flag in (("amsgrad", amsgrad), ("maximize", maximize),
                           ("differentiable", differentiable)):
            if flag:
                raise ValueError(f"{name}=True: not supported by gptcore's AdamW kernel")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=False, foreach=foreach, capturable=capturable,
                        differentiable=False, fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        self.seed = int(seed)
        if max_grad_norm is not None and not (math.isfinite(float(max_grad_norm))
                                              and float(max_grad_norm) > 0):
            raise ValueError(f"max_grad_norm: expected a finite value > 0, got {max_grad_norm!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.last_grad_norm = None

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if p.dtype != torch.float32 and "master" not in state:
            state["master"] = p.detach().float().contiguous()
        for key in ("exp_avg", "exp_avg_sq"):  # e.g. loaded from torch's bf16 moments
            if state[key].dtype != torch.float32 or not state[key].is_contiguous():
                state[key] = state[key].float().contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter that has a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._clip_scale()
        for group in self.param_groups:
            b1, b2 = (float(b) for b in group["betas"])
            buckets = {}  # (device, step, needs master) -> one kernel call
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW: sparse gradients are not supported")
                if not p.is_contiguous():
                    raise ValueError("AdamW: parameters must be contiguous (updated in place)")
                state = self._state_of(p)
                state["step"] += 1
                key = (p.device, int(state["step"].item()), p.dtype != torch.float32)
                buckets.setdefault(key, []).append((p, state))
            for (_, step, master), items in buckets.items():
                params = [_g(p, "params") for p, _ in items]
                grads = [_g(p.grad.contiguous(), "grads") for p, _ in items]
                m = [_g(s["exp_avg"], "m") for _, s in items]
                v = [_g(s["exp_avg_sq"], "v") for _, s in items]
                masters = [_g(s["master"], "master") for _, s in items] if master else None
                with _on(items[0][0]):
                    _ops.adamw_step(params, grads, m, v, master=masters, lr=float(group["lr"]),
                                    beta1=b1, beta2=b2, eps=float(group["eps"]),
                                    weight_decay=float(group["weight_decay"]), step=step,
                                    grad_scale=scale, seed=self.seed * 1_000_003 + step)
        return loss

    def _clip_scale(self) -> float:
        """The gradient scale of ``max_grad_norm`` clipping (clip_grad_norm_'s coefficient)."""
        if self.max_grad_norm is None:
            return 1.0
        by_device = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad.contiguous())
        norms = []
        for grads in by_device.values():
            with _on(grads[0]):
                norms.append(_ops.global_norm([_g(t, "grads") for t in grads]))
        norm = math.sqrt(sum(n * n for n in norms))
        self.last_grad_norm = norm
        return min(1.0, self.max_grad_norm / (norm + 1e-6))

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` (torch.optim.AdamW's state dicts
        included), but float32 moments and master weights stay float32 for bf16 parameters
        (the base class would cast them to the parameter's dtype)."""
        saved = {pid: {k: v for k, v in s.items() if k in _FP32_STATE}
                 for pid, s in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32,
                                                  copy=True).contiguous()
