"""The CUDA runtime (gptcore.cuda, CUDA tensors): the poisoned allocator the op tests rely on,
copies and casts, streams, the caching allocator, DLPack export. All ``gpu``-marked (skipped
where ``gptcore.cuda.is_available()`` is False, conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops
from tests.helpers import to_cuda

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Read by the CUDA allocator on every allocation: new and reused blocks start as NaN.
    monkeypatch.setenv("GPTCORE_POISON_ALLOC", "1")


def test_poisoned_allocation_is_nan():
    t = gptcore.empty([1000], dtype="float32", device="cuda")
    assert np.isnan(t.numpy()).all()
    t = gptcore.empty([1000], dtype="bfloat16", device="cuda")
    assert np.isnan(t.numpy()).all()


@pytest.mark.parametrize("n", [1, 1023, 70001])
def test_copy_and_cast_round_trip(rng, n):
    x = rng.randn(n, scale=100.0)
    t = gptcore.tensor(x, device="cuda")
    np.testing.assert_array_equal(t.numpy(), x)
    # float32 -> bfloat16 on the device rounds to nearest even like the host conversion
    on_dev = t.to(dtype="bfloat16").numpy()
    on_host = gptcore.tensor(x, dtype="bfloat16").numpy()
    np.testing.assert_array_equal(on_dev, on_host)
    # integers <-> floats truncate as C does
    ints = rng.integers(-50000, 50000, size=n).astype(np.int64)
    ti = gptcore.tensor(ints, device="cuda")
    np.testing.assert_array_equal(ti.to(dtype="int32").numpy(), ints.astype(np.int32))
    np.testing.assert_array_equal(ti.to(dtype="float32").numpy(), ints.astype(np.float32))
    np.testing.assert_array_equal(t.to(dtype="int64").numpy(), x.astype(np.int64))
    # device to device copy
    u = gptcore.tensor(t, device="cuda")
    np.testing.assert_array_equal(u.numpy(), x)


def test_stream_setting():
    s0 = gptcore.cuda.current_stream()
    gptcore.cuda.set_stream(0)
    assert gptcore.cuda.current_stream() == 0
    gptcore.cuda.synchronize()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        gptcore.cuda.set_stream(s0)
        return
    s = torch.cuda.Stream()
    gptcore.cuda.set_stream(s.cuda_stream)
    try:
        assert gptcore.cuda.current_stream() == s.cuda_stream
        x = np.arange(4096, dtype=np.float32)
        t = gptcore.tensor(x, device="cuda")
        out, _, _ = ops.layernorm_forward(t, to_cuda(np.ones(4096, np.float32)),
                                          to_cuda(np.zeros(4096, np.float32)))
        gptcore.cuda.synchronize()
        assert np.isfinite(out.numpy()).all()
    finally:
        gptcore.cuda.set_stream(s0)


def test_cached_allocator_reuses_blocks():
    gptcore.cuda.empty_cache()
    a = gptcore.empty([1 << 20], dtype="float32", device="cuda")
    ptr = a.data_ptr()
    del a
    assert gptcore._C.cuda.cached_bytes() >= 4 << 20
    b = gptcore.empty([1 << 20], dtype="float32", device="cuda")
    assert b.data_ptr() == ptr  # the freed block comes back, no cudaMalloc


def test_dlpack_export_of_a_cuda_tensor(rng):
    # The array-API stream values: None (legacy default), 1 (legacy), 2 (per-thread), -1 (no
    # synchronisation) all hand back a zero-copy capsule of finished data; asking for another
    # device than the tensor's is refused with BufferError (gptcore does not copy there).
    x = rng.randn(1000)
    t = gptcore.tensor(x, device="cuda")
    assert t.__dlpack_device__() == (2, 0)
    for stream in (None, 1, 2, -1):
        u = gptcore.from_dlpack(t.__dlpack__(stream=stream, dl_device=(2, 0)))
        assert u.data_ptr() == t.data_ptr() and u.device == "cuda:0"
        np.testing.assert_array_equal(u.numpy(), x)
    with pytest.raises(BufferError, match="another device"):
        t.__dlpack__(dl_device=(1, 0))
