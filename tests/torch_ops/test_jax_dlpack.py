"""gptcore with JAX (CPU): arrays cross both ways through DLPack without a copy, and an op fed
JAX arrays agrees with the same function written in jax.numpy."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import gptcore
from gptcore import ops


def _ptr(a) -> int:
    return a.unsafe_buffer_pointer()


def test_jax_to_gptcore_is_zero_copy():
    x = jnp.arange(24, dtype=jnp.float32).reshape(4, 6)
    t = gptcore.from_dlpack(x)
    assert t.data_ptr() == _ptr(x)
    assert tuple(t.shape) == (4, 6) and t.dtype == "float32"
    np.testing.assert_array_equal(t.numpy(), np.asarray(x))
    ids = jnp.array([[1, 2, 3]], dtype=jnp.int32)
    assert gptcore.from_dlpack(ids).data_ptr() == _ptr(ids)


def test_gptcore_to_jax_is_zero_copy():
    """gptcore's own buffers are 64-byte aligned, which JAX needs to import without a copy (a
    Tensor wrapping a NumPy array keeps NumPy's alignment; JAX copies it when that is less)."""
    t = gptcore.zeros([3, 4])
    t.copy_(gptcore.tensor(np.arange(12, dtype=np.float32).reshape(3, 4)))
    y = jnp.from_dlpack(t)
    assert _ptr(y) == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(y), t.numpy())


def test_op_on_jax_arrays_matches_jax(rng):
    x = jnp.asarray(rng.randn(5, 7, 32))
    w, b = jnp.asarray(rng.randn(32)), jnp.asarray(rng.randn(32))
    out, _, _ = ops.layernorm_forward(x, w, b, 1e-5)
    got = jnp.from_dlpack(out)  # the op's output read by JAX in place
    assert _ptr(got) == out.data_ptr()
    mu = x.mean(-1, keepdims=True)
    want = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # and a jitted JAX computation consumes it like any array
    np.testing.assert_allclose(float(jax.jit(lambda a: (a * a).sum())(got)),
                               float((want * want).sum()), rtol=1e-5)
