"""gptcore.Tensor: construction, conversion, bfloat16 rounding, DLPack with NumPy and PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

import gptcore

INT_DTYPES = [np.int32, np.int64, np.uint16]


# ---- construction and properties ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, *INT_DTYPES])
def test_tensor_from_numpy_copies(rng, dtype):
    src = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    t = gptcore.tensor(src)
    assert isinstance(t, gptcore.Tensor)
    assert t.shape == (3, 5, 7) and t.ndim == 3 and len(t) == 3
    assert t.dtype == np.dtype(dtype).name and t.device == "cpu"
    assert t.numel() == src.size and t.nbytes == src.nbytes
    out = t.numpy()
    assert out.dtype == dtype and out.shape == src.shape
    np.testing.assert_array_equal(out, src, err_msg=f"{rng}")
    src[0, 0, 0] += 1  # tensor() copies: the source is independent of the tensor
    assert out[0, 0, 0] != src[0, 0, 0]
    assert "shape=(3, 5, 7)" in repr(t) and "cpu" in repr(t)


def test_tensor_from_python_data():
    t = gptcore.tensor([[1.5, 2.0], [3.0, -4.25]])
    assert t.dtype == "float32" and t.shape == (2, 2)  # float64 data becomes float32
    np.testing.assert_array_equal(t.numpy(), [[1.5, 2.0], [3.0, -4.25]])
    t = gptcore.tensor([1, 2, 3])
    assert t.dtype == "int64"
    np.testing.assert_array_equal(t.numpy(), [1, 2, 3])
    t = gptcore.tensor([True, False])
    assert t.dtype == "int32"
    np.testing.assert_array_equal(t.numpy(), [1, 0])
    t = gptcore.tensor(np.arange(4, dtype=np.int8))  # unsupported ints widen to int64
    assert t.dtype == "int64"
    t = gptcore.tensor([0.5, 1.5], dtype="int32")
    assert t.dtype == "int32"
    np.testing.assert_array_equal(t.numpy(), [0, 1])


def test_tensor_of_tensor_copies(rng):
    a = gptcore.tensor(rng.randn(4, 4))
    b = gptcore.tensor(a)
    assert b.data_ptr() != a.data_ptr()
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    a.numpy()[0, 0] = 123.0
    assert b.numpy()[0, 0] != 123.0


def test_numpy_views_cpu_memory(rng):
    t = gptcore.tensor(rng.randn(6, 3))
    view = t.numpy()
    view[2, 1] = 42.0
    assert t.numpy()[2, 1] == 42.0
    assert np.asarray(t)[2, 1] == 42.0


def test_array_protocol(rng):
    x = rng.randn(2, 3)
    t = gptcore.tensor(x)
    a = np.asarray(t)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, x)
    a64 = np.asarray(t, dtype=np.float64)
    assert a64.dtype == np.float64
    np.testing.assert_array_equal(a64, x.astype(np.float64))
    c = np.array(t, copy=True)
    c[0, 0] = -1.0
    assert t.numpy()[0, 0] == x[0, 0]


def test_empty_zeros_view_copy(rng):
    z = gptcore.zeros((3, 4))
    assert z.dtype == "float32" and z.shape == (3, 4)
    np.testing.assert_array_equal(z.numpy(), np.zeros((3, 4), np.float32))
    e = gptcore.empty((2, 5), dtype="int32")
    assert e.dtype == "int32" and e.shape == (2, 5)
    assert e.data_ptr() % 64 == 0  # CPU buffers are 64-byte aligned
    x = rng.randn(3, 4)
    z.copy_(gptcore.tensor(x))
    np.testing.assert_array_equal(z.numpy(), x)
    v = z.view([4, -1])
    assert v.shape == (4, 3) and v.data_ptr() == z.data_ptr()
    np.testing.assert_array_equal(v.numpy(), x.reshape(4, 3))
    z.zero_()
    np.testing.assert_array_equal(v.numpy(), 0)
    with pytest.raises(ValueError, match="view"):
        z.view([5, 5])
    with pytest.raises(ValueError, match="copy_"):
        z.copy_(gptcore.zeros((4, 3), dtype="int32"))


def test_zero_size_tensor():
    t = gptcore.tensor(np.zeros((0, 3), np.float32))
    assert t.shape == (0, 3) and t.numel() == 0
    assert t.numpy().shape == (0, 3)
    assert t.to(dtype="bfloat16").numpy().shape == (0, 3)


# ---- .to(): dtype conversions ---------------------------------------------------------------


def test_to_same_is_self(rng):
    t = gptcore.tensor(rng.randn(3))
    assert t.to().data_ptr() == t.data_ptr()
    assert t.to(device="cpu", dtype="float32").data_ptr() == t.data_ptr()


def test_to_int_float_conversions(rng):
    x = np.array([-2.75, -0.5, 0.0, 0.5, 1.999, 1e6], np.float32)
    i32 = gptcore.tensor(x).to(dtype="int32")
    assert i32.dtype == "int32"
    np.testing.assert_array_equal(i32.numpy(), x.astype(np.int32))  # C truncation toward zero
    ints = rng.integers(-(2**40), 2**40, size=50)
    t64 = gptcore.tensor(ints)
    np.testing.assert_array_equal(t64.to(dtype="float32").numpy(), ints.astype(np.float32))
    small = rng.integers(0, 65535, size=50)
    u = gptcore.tensor(small, dtype="uint16")
    assert u.dtype == "uint16"
    np.testing.assert_array_equal(u.to(dtype="int64").numpy(), small)
    np.testing.assert_array_equal(u.to(dtype="int32").to(dtype="uint16").numpy(), small)
    big = np.array([2**40 + 3, -(2**35) - 1], np.int64)  # int64 -> float32 -> int64 stays close
    np.testing.assert_array_equal(gptcore.tensor(big).to(dtype="int32").to(dtype="int64").numpy(),
                                  big.astype(np.int32).astype(np.int64))


# ---- bfloat16 -------------------------------------------------------------------------------


def bf16_round_numpy(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32 with round-to-nearest-even, written from the definition:
    keep the top 16 bits; if the dropped 16 bits are above half an ulp round up, below round
    down, exactly half round to the even neighbour. NaN stays NaN."""
    x = np.ascontiguousarray(x, np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    upper, lower = bits >> 16, bits & 0xFFFF
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & 1) == 1))
    upper = upper + round_up.astype(np.uint64)
    out = (upper << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)


def test_bf16_round_to_nearest_even_cases():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # bf16 spacing at 1.0
    cases = np.array([
        one + ulp / 2,            # tie, 1.0 is even -> 1.0
        one + 3 * ulp / 2,        # tie, 1 + ulp is odd -> 1 + 2 ulp
        one + ulp / 2 + 2.0**-20,  # just above the tie -> 1 + ulp
        -(one + 3 * ulp / 2),     # sign symmetric
        np.float32(3.4e38),        # rounds up past the largest bf16 -> inf
        np.inf, -np.inf, 0.0, -0.0,
        np.float32(1e-40),         # subnormal
    ], np.float32)
    expected = np.array([1.0, 1.0 + 2.0**-6, 1.0 + 2.0**-7, -(1.0 + 2.0**-6), np.inf,
                         np.inf, -np.inf, 0.0, -0.0], np.float32)
    got = gptcore.tensor(cases).to(dtype="bfloat16").numpy()
    np.testing.assert_array_equal(got[:-1], expected)
    np.testing.assert_array_equal(got, bf16_round_numpy(cases))
    assert np.signbit(got[8])
    nan = gptcore.tensor(np.array([np.nan, -np.nan], np.float32)).to(dtype="bfloat16").numpy()
    assert np.isnan(nan).all()


def test_bf16_round_trip_random(rng):
    # Wide exponent range, plus values built to sit exactly on a rounding tie.
    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-60, 60, 4096))).astype(np.float32)
    ties = (rng.integers(0, 2**15, 1024, dtype=np.uint32) << 17 | 0x8000 | (0x3F << 24)).view(np.float32)
    x = np.concatenate([x, ties])
    t = gptcore.tensor(x, dtype="bfloat16")
    assert t.dtype == "bfloat16" and t.nbytes == 2 * x.size
    want = bf16_round_numpy(x)
    got = t.numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want, err_msg=f"{rng}")
    np.testing.assert_array_equal(t.to(dtype="float32").numpy(), want)
    # A second round trip is exact: bf16 values are representable in bf16.
    np.testing.assert_array_equal(gptcore.tensor(want, dtype="bfloat16").numpy(), want)
    np.testing.assert_array_equal(np.asarray(t), want)


def test_bf16_to_int(rng):
    x = np.array([1.5, -2.5, 300.0], np.float32)
    t = gptcore.tensor(x, dtype="bfloat16").to(dtype="int32")
    np.testing.assert_array_equal(t.numpy(), [1, -2, 300])


# ---- DLPack with NumPy ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, *INT_DTYPES])
def test_dlpack_numpy_zero_copy_both_ways(rng, dtype):
    src = (rng.standard_normal((4, 6)) * 50).astype(dtype)
    t = gptcore.from_dlpack(src)  # NumPy -> gptcore
    assert t.shape == src.shape and t.dtype == np.dtype(dtype).name
    assert t.data_ptr() == src.ctypes.data
    back = np.from_dlpack(t)  # gptcore -> NumPy
    assert back.ctypes.data == src.ctypes.data
    back[1, 2] = 7
    assert src[1, 2] == 7 and t.numpy()[1, 2] == 7
    src[3, 5] = 9
    assert back[3, 5] == 9
    assert t.__dlpack_device__() == (1, 0)


def test_dlpack_keeps_memory_alive(rng):
    x = rng.randn(1000)
    want = x.copy()
    t = gptcore.from_dlpack(x)
    del x
    np.testing.assert_array_equal(t.numpy(), want)
    g = gptcore.tensor(want)
    arr = np.from_dlpack(g)
    del g
    np.testing.assert_array_equal(arr, want)


def test_from_dlpack_capsule_and_reuse(rng):
    t = gptcore.tensor(rng.randn(5))
    cap = t.__dlpack__()
    u = gptcore.from_dlpack(cap)
    assert u.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="consumed"):
        gptcore.from_dlpack(cap)
    versioned = t.__dlpack__(max_version=(1, 0))
    assert gptcore.from_dlpack(versioned).data_ptr() == t.data_ptr()


def test_from_dlpack_non_contiguous_raises(rng):
    x = rng.randn(6, 8)
    for bad in (x[:, ::2], x.T, x[::2]):
        with pytest.raises(ValueError, match="contiguous"):
            gptcore.from_dlpack(bad)
    # size-1 dimensions may carry any stride: still a dense buffer
    one = x[2:3, :]
    assert gptcore.from_dlpack(one).shape == (1, 8)


def test_from_dlpack_unsupported_dtype():
    with pytest.raises(TypeError, match="dtype"):
        gptcore.from_dlpack(np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="DLPack"):
        gptcore.from_dlpack(object())


def test_as_tensor_accepts_buffers(rng):
    x = rng.randn(3, 4)
    t = gptcore.as_tensor(x)
    assert t.data_ptr() == x.ctypes.data
    m = gptcore.as_tensor(memoryview(x))
    assert m.data_ptr() == x.ctypes.data
    assert gptcore.as_tensor(t) is t


# ---- PyTorch (only when installed) -----------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "int64"])
def test_torch_round_trip_zero_copy(rng, torch, dtype):
    tt = torch.from_numpy(rng.randn(5, 7) * 10).to(getattr(torch, dtype))
    g = gptcore.from_dlpack(tt)  # torch -> gptcore
    assert g.dtype == dtype and g.shape == (5, 7)
    assert g.data_ptr() == tt.data_ptr()
    back = torch.from_dlpack(g)  # gptcore -> torch
    assert back.dtype == tt.dtype and back.data_ptr() == tt.data_ptr()
    back[0, 0] = 3
    assert tt[0, 0].item() == 3
    np.testing.assert_array_equal(g.numpy(), tt.float().numpy() if dtype == "bfloat16" else tt.numpy())


def test_torch_bf16_rounding_matches(rng, torch):
    x = (rng.standard_normal(2048) * np.exp2(rng.integers(-30, 30, 2048))).astype(np.float32)
    ours = torch.from_dlpack(gptcore.tensor(x, dtype="bfloat16"))
    theirs = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(ours, theirs), f"{rng}"


def test_torch_non_contiguous_raises(rng, torch):
    tt = torch.randn(4, 6).t()
    with pytest.raises(ValueError, match="contiguous"):
        gptcore.from_dlpack(tt)
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        gptcore.ops.layernorm_forward(tt, torch.ones(4), torch.zeros(4))


def test_torch_tensors_into_ops(rng, torch):
    x = torch.randn(3, 16)
    w, b = torch.ones(16), torch.zeros(16)
    out, mean, rstd = gptcore.ops.layernorm_forward(x, w, b)
    want = torch.nn.functional.layer_norm(x, (16,), w, b, eps=1e-5)
    assert torch.allclose(torch.from_dlpack(out), want, atol=1e-5)


# ---- CUDA availability ----------------------------------------------------------------------


def test_cuda_flags():
    assert isinstance(gptcore.cuda.is_compiled(), bool)
    assert isinstance(gptcore.cuda.is_available(), bool)
    assert gptcore.cuda.is_available() == (gptcore.cuda.is_compiled() and gptcore.cuda.device_count() > 0)
    if not gptcore.cuda.is_compiled():
        assert gptcore.cuda.device_count() == 0
        assert gptcore.cuda.current_stream() == 0
    # why CUDA cannot be used is said exactly when it cannot
    reason = gptcore.cuda.unavailable_reason()
    assert isinstance(reason, str) and (reason == "") == gptcore.cuda.is_available()
    if not gptcore.cuda.is_compiled():
        assert "no CUDA support" in reason


def test_cuda_request_without_gpu_raises():
    if gptcore.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    x = np.ones(3, np.float32)
    for make in (lambda: gptcore.tensor(x, device="cuda"),
                 lambda: gptcore.tensor(x).to(device="cuda:0"),
                 lambda: gptcore.zeros((2,), device="cuda"),
                 lambda: gptcore.empty((2,), device="cuda:1")):
        with pytest.raises(RuntimeError, match="CUDA"):
            make()


def test_bad_device_and_dtype_names():
    with pytest.raises(ValueError, match="device"):
        gptcore.tensor([1.0], device="gpu")
    with pytest.raises(ValueError, match="device"):
        gptcore.zeros((2,), device="cuda:x")
    with pytest.raises(TypeError, match="dtype"):
        gptcore.tensor([1.0], dtype="float16")
    with pytest.raises(TypeError, match="dtype"):
        gptcore.zeros((2,), dtype="complex64")
    with pytest.raises(TypeError, match="data"):
        gptcore.tensor(np.array([1 + 2j]))


def test_freeing_a_consumed_dlpack_capsule_keeps_a_pending_exception():
    """A consumed capsule freed while an exception propagates must not clear it (Python would
    then report a SystemError instead of the real error)."""
    t = gptcore.tensor(np.ones(3, np.float32))

    def consumed():
        cap = t.__dlpack__()
        gptcore._C.from_dlpack_capsule(cap)
        return cap

    with pytest.raises(TypeError):
        len(consumed())


# ---- read-only memory, size overflow, thread counts (hardening) --------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402


def _run(snippet: str) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter: a crash shows as a signal, not a test-run abort."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(snippet)], capture_output=True,
                          text=True, timeout=120)


def _ro(a):
    a.setflags(write=False)
    return a


def test_read_only_numpy_gives_read_only_tensor():
    a = _ro(np.arange(12, dtype=np.float32).reshape(3, 4))
    t = gptcore.from_numpy(a)
    assert t.read_only and not gptcore.from_numpy(np.zeros(3, np.float32)).read_only
    assert not t.numpy().flags.writeable  # the view does not open a back door
    assert t.narrow(1, 1).read_only and t.view([12]).read_only
    with pytest.raises(ValueError, match="read-only"):
        t.zero_()
    with pytest.raises(ValueError, match="read-only"):
        t.copy_(gptcore.zeros([3, 4]))
    np.testing.assert_array_equal(a, np.arange(12, dtype=np.float32).reshape(3, 4))
    # reading it is fine, and a copy of it is writable
    assert not gptcore.tensor(t).read_only
    gptcore.zeros([3, 4]).copy_(t)


def test_read_only_dlpack_flag_round_trip():
    t = gptcore.from_numpy(_ro(np.ones(4, np.float32)))
    back = gptcore._C.from_dlpack_capsule(t.__dlpack__(max_version=(1, 0)))
    assert back.read_only  # the versioned capsule carries DLPack's read-only flag both ways


def test_ops_refuse_read_only_tensors_as_outputs_caches_and_state():
    from gptcore import ops
    ro = lambda *s: gptcore.from_numpy(_ro(np.zeros(s, np.float32)))  # noqa: E731
    x = np.ones((2, 3, 8), np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    qkv = np.ones((1, 2, 24), np.float32)
    cases = {
        "out": lambda: ops.layernorm_forward(x, w, b, out=(ro(2, 3, 8), None, None)),
        "k_cache": lambda: ops.attention_kvcache(qkv, ro(1, 2, 4, 4), np.zeros((1, 2, 4, 4), np.float32), 0, 2),
        "v_cache": lambda: ops.attention_kvcache(qkv, np.zeros((1, 2, 4, 4), np.float32), ro(1, 2, 4, 4), 0, 2),
        "dweight": lambda: ops.linear_backward(np.ones((2, 3, 4), np.float32), x,
                                               weight=np.ones((4, 8), np.float32), dweight=ro(4, 8)),
        "params": lambda: ops.adamw_step([ro(5)], [np.ones(5, np.float32)], [np.zeros(5, np.float32)],
                                         [np.zeros(5, np.float32)], lr=0.1, step=1),
        "v": lambda: ops.adamw_step([np.ones(5, np.float32)], [np.ones(5, np.float32)],
                                    [np.zeros(5, np.float32)], [ro(5)], lr=0.1, step=1),
        "counts": lambda: ops.sample_tokens(np.ones((1, 4), np.float32),
                                            counts=gptcore.from_numpy(_ro(np.zeros((1, 4), np.int32)))),
        "x": lambda: ops.dropout_forward(ro(16), 0.5, 0, 0, inplace=True),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError, match=f"^{name}.*read-only"):
            call()


def test_read_only_memory_map_cache_does_not_crash(tmp_path):
    # np.load(mmap_mode="r") maps the file PROT_READ: writing the KV cache through it segfaulted
    path = tmp_path / "cache.npy"
    np.save(path, np.zeros((1, 2, 4, 4), np.float32))
    proc = _run(f"""
        import numpy as np, gptcore
        from gptcore import ops
        k = np.load({str(path)!r}, mmap_mode="r")
        v = np.zeros((1, 2, 4, 4), np.float32)
        qkv = np.ones((1, 2, 24), np.float32)
        for cache in (k, gptcore.from_numpy(k)):
            try:
                ops.attention_kvcache(qkv, cache, v, 0, 2)
            except ValueError as e:
                print("refused:", e)
        try:
            ops.layernorm_forward(qkv[..., :8].copy(), np.ones(8, np.float32), np.zeros(8, np.float32),
                                  out=(gptcore.from_numpy(np.load({str(path)!r}, mmap_mode="r").reshape(8, 4)[:1].reshape(1, 1, 4)), None, None))
        except ValueError as e:
            print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("refused: k_cache: is read-only") == 2, proc.stdout


@pytest.mark.parametrize("shape", [[2 ** 31, 2 ** 31], [2 ** 62, 4], [4, 2 ** 62], [0, 2 ** 62, 4],
                                   [2 ** 40, 2 ** 40, 0]])
def test_overflowing_shapes_refused_at_creation(shape):
    for make in (gptcore.empty, gptcore.zeros):
        with pytest.raises(ValueError, match="too large"):
            make(shape)


def test_overflowing_shapes_do_not_crash_later():
    proc = _run("""
        import gptcore
        for shape in ([2**31, 2**31], [2**62, 4]):
            try:
                t = gptcore.zeros(shape)
                print("created", t.nbytes)
            except ValueError as e:
                print("refused")
        t = gptcore.zeros([4, 4])
        for bad in ([2**32, 2**32], [-1, 2**62, 4]):
            try:
                t.view(bad)
            except ValueError:
                print("refused")
        try:
            t.narrow(2**62, 2**62)
        except ValueError:
            print("refused")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused"] * 5, proc.stdout


def test_shape_dimensions_outside_int64_are_named():
    with pytest.raises(ValueError, match=r"^shape\[1\]"):
        gptcore.empty([2, 2 ** 64])
    with pytest.raises(TypeError, match=r"^shape\[0\]"):
        gptcore.zeros([2.5])


def test_set_num_threads_limit():
    limit = gptcore._C.max_num_threads()
    assert 1 <= limit and gptcore.get_num_threads() <= limit
    n0 = gptcore.get_num_threads()
    for bad in (limit + 1, 1000, -1, 2 ** 64):
        with pytest.raises(ValueError, match=f"num_threads: expected 0 .* to {limit}"):
            gptcore.set_num_threads(bad)
    assert gptcore.get_num_threads() == n0  # a refused call changes nothing


def test_set_num_threads_1000_does_not_crash():
    proc = _run("""
        import numpy as np, gptcore
        from gptcore import ops
        try:
            gptcore.set_num_threads(1000)
        except ValueError as e:
            print("refused:", e)
        x = np.ones((512, 64), np.float32)
        ops.linear_forward(x, np.ones((64, 64), np.float32))
        print("ran")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused: num_threads" in proc.stdout and "ran" in proc.stdout


@pytest.mark.parametrize("snippet, message", [
    # the crash cases, run as a user would: each must end in a Python exception, not a signal
    ("gptcore.ops.layernorm_forward(gptcore.empty([2**31, 2**31]), np.ones(2**31, np.float32), "
     "np.zeros(2**31, np.float32))", "too large"),
    ("t = gptcore.zeros([2**62, 4]); gptcore.ops.global_norm([t])", "too large"),
    ("gptcore.set_num_threads(1000); gptcore.ops.linear_forward(np.ones((64, 64), np.float32), "
     "np.ones((64, 64), np.float32))", "num_threads"),
])
def test_crash_cases_end_in_an_exception_in_a_fresh_process(snippet, message):
    proc = _run("import numpy as np, gptcore\n" + snippet)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # < 0: killed by a signal
    assert "ValueError" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
