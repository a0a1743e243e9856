"""Helpers shared by the tests: float64 views, the relative L2 error every comparison with the
NumPy reference uses, the seed every random test starts from, and the backends
(device, dtype) the op tests are parametrized over.

Import as ``from tests.helpers import rel_err`` (tests/ is a package; pytest puts the repository
root on sys.path).
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest


def f64(x) -> np.ndarray:
    """``x`` (an array, a gptcore CPU tensor, anything NumPy reads) as a float64 array."""
    return np.asarray(x, dtype=np.float64)


def mixing_weights(model, seed: int) -> dict:
    """A state dict for ``model`` whose blocks mix tokens: GPT-2's init makes a tiny random model
    copy its input token (the tied embeddings dominate); weights of fan-in scale let the blocks
    mix, and next-token logits spread over a few units."""
    r = np.random.default_rng(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k in ("wte", "wpe"):
            sd[k] = r.standard_normal(v.shape) * 0.3
        elif v.ndim == 2:
            sd[k] = r.standard_normal(v.shape) / np.sqrt(v.shape[1])
        elif k.endswith("bias"):
            sd[k] = r.standard_normal(v.shape) * 0.1
        else:
            sd[k] = v
    return sd


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (``b`` the reference; ||b|| = 0 is guarded)."""
    a, b = f64(a), f64(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name, got, want, rng=None, tol=1e-5, floor=0.0):
    """Assert ``got`` matches the reference ``want``: same shape, every element finite (an
    unwritten or garbage element fails here), relative L2 error at most ``tol``. ``floor``
    bounds ||want|| from below, for parts of a result that are (near) zero in exact arithmetic.
    ``rng`` (the seeded generator) is named in every message, so a failure can be replayed."""
    got, want = f64(got), f64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape} ({rng})"
    bad = ~np.isfinite(got)
    assert not bad.any(), (f"{name}: {bad.sum()} non-finite elements (unwritten?) first at "
                           f"{np.argwhere(bad)[0].tolist()} ({rng})")
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor, 1e-30))
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({rng})"


def fresh_seed() -> int:
    """A fresh random seed, or GPTCORE_TEST_SEED when set (to replay a failing run)."""
    env = os.environ.get("GPTCORE_TEST_SEED")
    return int(env) if env else secrets.randbits(32)


# ---- CUDA tensors -------------------------------------------------------------------------------


def to_cuda(x, dtype=None):
    """A CUDA tensor holding ``x``: floats as float32, or ``dtype`` ("bfloat16"); integer arrays
    keep their dtype."""
    import gptcore

    x = np.asarray(x)
    if x.dtype.kind == "f":
        return gptcore.tensor(np.ascontiguousarray(x, np.float32), device="cuda",
                              dtype=dtype or "float32")
    return gptcore.tensor(np.ascontiguousarray(x), device="cuda")


def host(t) -> np.ndarray:
    """A gptcore tensor (any device) or array as float64 on the host (bfloat16 widens exactly)."""
    return f64(t.numpy() if hasattr(t, "numpy") else t)


# ---- backends the op tests run on ---------------------------------------------------------------


class Backend:
    """Where an op test runs: ``cpu`` (float32 NumPy arrays handed straight to the ops, as a
    NumPy caller does) or ``cuda`` in float32 or bfloat16 (tensors uploaded first). ``tol`` is
    the relative error allowed for values the op computes in ``dtype``."""

    TOL = {"float32": 1e-5, "bfloat16": 1e-2}

    def __init__(self, device: str, dtype: str = "float32"):
        self.device, self.dtype = device, dtype
        self.tol = self.TOL[dtype]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def put(self, x, dtype=None):
        """``x`` as the op's input: floats in ``dtype`` (default: the backend's), integers as
        they are. On the CPU a fresh float32 NumPy array (a buffer the op may write into)."""
        if self.cuda:
            return to_cuda(x, dtype or self.dtype)
        x = np.asarray(x)
        return np.array(x, np.float32) if x.dtype.kind == "f" else np.ascontiguousarray(x)

    def rounded(self, x) -> np.ndarray:
        """``x`` as the op sees it after ``put`` (bf16-rounded on a bfloat16 backend), float64:
        what the reference is fed."""
        return host(self.put(x))

    @staticmethod
    def ptr(x) -> int:
        """The address of an op argument's data (a tensor or a NumPy array)."""
        return x.ctypes.data if isinstance(x, np.ndarray) else x.data_ptr()

    def __repr__(self) -> str:
        return f"{self.device}-{self.dtype}"


def _param(device, dtype):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return pytest.param(Backend(device, dtype), marks=marks, id=f"{device}-{dtype}")


# The devices, for tests that run the same on each (gpu-marked CUDA: skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Every backend: the CPU, and CUDA in float32 and bfloat16 (gpu-marked: skipped without a GPU).
BACKENDS = [_param("cpu", "float32"), _param("cuda", "float32"), _param("cuda", "bfloat16")]
# The float32 ones, for checks whose tolerances only float32 arithmetic meets.
FP32_BACKENDS = BACKENDS[:2]
