"""Bad input to every op: a ValueError/TypeError whose message names the argument, never a crash.

Each case builds otherwise valid arguments, breaks one of them and checks the exception type
and that the message starts with (or names) that argument.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gptcore
from gptcore import ops


def f32(*shape):
    return np.zeros(shape, np.float32)


def ones(*shape):
    return np.ones(shape, np.float32)


def i32(*shape, fill=0):
    return np.full(shape, fill, np.int32)


def noncontig(*shape):
    """A float32 array of ``shape`` that is not C-contiguous (every other column)."""
    base = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)
    return base[..., ::2]


# ---- a fake CUDA tensor (DLPack capsule built by hand) ----------------------------------------
# It never reaches a kernel in these tests: mixing it with CPU tensors must fail the device check
# first. Its data pointer is bogus, so any kernel that touched it would crash the test.


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_KEEP_ALIVE = []
_FAKE_CUDA_SRC = None  # this module's source of fake_cuda, reused by the subprocess test


def fake_cuda(*shape, dtype="float32"):
    """A gptcore Tensor that claims to live on cuda:0 (no memory behind it)."""
    code, bits = {"float32": (2, 32), "int32": (0, 32), "int64": (0, 64)}[dtype]
    shp = (ctypes.c_int64 * len(shape))(*shape)
    m = _DLManagedTensor()
    # a distinct fake address per tensor: ops refuse outputs that share memory with an input
    m.dl_tensor.data = 0x1000 + 0x100000 * len(_KEEP_ALIVE)
    m.dl_tensor.device = _DLDevice(2, 0)  # kDLCUDA
    m.dl_tensor.ndim = len(shape)
    m.dl_tensor.dtype = _DLDataType(code, bits, 1)
    m.dl_tensor.shape = shp
    _KEEP_ALIVE.append((m, shp))
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return gptcore.from_dlpack(new_capsule(ctypes.addressof(m), b"dltensor", None))


# ---- the cases --------------------------------------------------------------------------------
# (id, call, exception, regex on the message)

V, T, C, MAXT = 10, 3, 8, 4
idx_ok = i32(2, T, fill=1)
ln_stats = dict(mean=f32(4), rstd=ones(4))
H = 2
qkv_ok = f32(2, 5, 3 * C)


def _ln_bwd(**kw):
    args = dict(dout=f32(4, C), x=f32(4, C), weight=ones(C), mean=f32(4), rstd=ones(4),
                dweight=f32(C), dbias=f32(C))
    args.update(kw)
    return lambda: ops.layernorm_backward(**args)


def _res_ln_bwd(**kw):
    args = dict(dout=f32(4, C), dsum=f32(4, C), sum=f32(4, C), weight=ones(C), mean=f32(4),
                rstd=ones(4), dweight=f32(C), dbias=f32(C))
    args.update(kw)
    return lambda: ops.residual_layernorm_backward(**args)


def _lin_bwd(**kw):
    args = dict(dout=f32(4, 6), x=f32(4, C), weight=f32(6, C), dweight=f32(6, C), dbias=f32(6))
    args.update(kw)
    return lambda: ops.linear_backward(**args)


def _attn_bwd(**kw):
    args = dict(dout=f32(2, 5, C), qkv=qkv_ok, out=f32(2, 5, C), lse=f32(2, H, 5), n_head=H)
    args.update(kw)
    return lambda: ops.attention_backward(**args)


def _ce(fn=ops.cross_entropy_forward_backward, **kw):
    args = dict(logits=f32(4, 16), targets=i32(4, fill=3))
    args.update(kw)
    return lambda: fn(**args)


def _adamw(n=2, **kw):
    args = dict(params=[f32(5) for _ in range(n)], grads=[f32(5) for _ in range(n)],
                m=[f32(5) for _ in range(n)], v=[f32(5) for _ in range(n)], lr=1e-3, step=1)
    args.update(kw)
    return lambda: ops.adamw_step(**args)


CASES = [
    # embedding
    ("emb idx float", lambda: ops.embedding_forward(f32(2, T), f32(V, C), f32(MAXT, C)), TypeError, "^idx"),
    ("emb idx 1-D", lambda: ops.embedding_forward(i32(T), f32(V, C), f32(MAXT, C)), ValueError, "^idx"),
    ("emb idx empty", lambda: ops.embedding_forward(i32(2, 0), f32(V, C), f32(MAXT, C)), ValueError, "^idx"),
    ("emb idx too big", lambda: ops.embedding_forward(i32(2, T, fill=V), f32(V, C), f32(MAXT, C)), ValueError, "^idx.*vocabulary"),
    ("emb idx negative", lambda: ops.embedding_forward(np.full((2, T), -1, np.int64), f32(V, C), f32(MAXT, C)), ValueError, "^idx"),
    ("emb T > positions", lambda: ops.embedding_forward(i32(2, MAXT + 1), f32(V, C), f32(MAXT, C)), ValueError, "^idx.*positions"),
    ("emb wte int", lambda: ops.embedding_forward(idx_ok, i32(V, C), f32(MAXT, C)), TypeError, "^wte"),
    ("emb wte float64", lambda: ops.embedding_forward(idx_ok, np.zeros((V, C)), f32(MAXT, C)), TypeError, "^wte"),
    ("emb wte 1-D", lambda: ops.embedding_forward(idx_ok, f32(V), f32(MAXT, C)), ValueError, "^wte"),
    ("emb wte noncontig", lambda: ops.embedding_forward(idx_ok, noncontig(V, C), f32(MAXT, C)), ValueError, "^wte.*contiguous"),
    ("emb wte list", lambda: ops.embedding_forward(idx_ok, [[0.0] * C] * V, f32(MAXT, C)), TypeError, "^wte"),
    ("emb wpe width", lambda: ops.embedding_forward(idx_ok, f32(V, C), f32(MAXT, C + 1)), ValueError, "^wpe"),
    ("emb bwd dout shape", lambda: ops.embedding_backward(f32(2, T, C + 1), idx_ok, f32(V, C), f32(MAXT, C)), ValueError, "^dout"),
    ("emb bwd dout int", lambda: ops.embedding_backward(i32(2, T, C), idx_ok, f32(V, C), f32(MAXT, C)), TypeError, "^dout"),
    ("emb bwd idx range", lambda: ops.embedding_backward(f32(2, T, C), i32(2, T, fill=V), f32(V, C), f32(MAXT, C)), ValueError, "^idx"),
    ("emb bwd dwte dtype", lambda: ops.embedding_backward(f32(2, T, C), idx_ok, i32(V, C), f32(MAXT, C)), TypeError, "^dwte"),
    ("emb bwd dwpe width", lambda: ops.embedding_backward(f32(2, T, C), idx_ok, f32(V, C), f32(MAXT, C + 2)), ValueError, "^dwpe"),
    # layernorm
    ("ln x int", lambda: ops.layernorm_forward(i32(4, C), ones(C), f32(C)), TypeError, "^x"),
    ("ln x empty", lambda: ops.layernorm_forward(f32(0, C), ones(C), f32(C)), ValueError, "^x.*empty"),
    ("ln x 0-d", lambda: ops.layernorm_forward(np.float32(1.0) * np.ones((), np.float32), ones(C), f32(C)), ValueError, "^x"),
    ("ln x noncontig", lambda: ops.layernorm_forward(noncontig(4, C), ones(C), f32(C)), ValueError, "^x.*contiguous"),
    ("ln weight shape", lambda: ops.layernorm_forward(f32(4, C), ones(C - 1), f32(C)), ValueError, "^weight"),
    ("ln weight float64", lambda: ops.layernorm_forward(f32(4, C), np.ones(C), f32(C)), TypeError, "^weight"),
    ("ln bias shape", lambda: ops.layernorm_forward(f32(4, C), ones(C), f32(C, 1)), ValueError, "^bias"),
    ("ln bias bf16", lambda: ops.layernorm_forward(f32(4, C), ones(C), gptcore.tensor(f32(C), dtype="bf16")), TypeError, "^bias"),
    ("ln eps negative", lambda: ops.layernorm_forward(f32(4, C), ones(C), f32(C), eps=-1.0), ValueError, "^eps"),
    ("ln eps nan", lambda: ops.layernorm_forward(f32(4, C), ones(C), f32(C), eps=float("nan")), ValueError, "^eps"),
    ("ln bwd dout shape", _ln_bwd(dout=f32(4, C + 1)), ValueError, "^dout"),
    ("ln bwd mean shape", _ln_bwd(mean=f32(5)), ValueError, "^mean"),
    ("ln bwd rstd dtype", _ln_bwd(rstd=i32(4)), TypeError, "^rstd"),
    ("ln bwd dweight shape", _ln_bwd(dweight=f32(C + 1)), ValueError, "^dweight"),
    ("ln bwd dbias dtype", _ln_bwd(dbias=i32(C)), TypeError, "^dbias"),
    ("ln bwd dresidual shape", _ln_bwd(dresidual=f32(3, C)), ValueError, "^dresidual"),
    ("res ln residual shape", lambda: ops.residual_layernorm_forward(f32(4, C), f32(4, C + 1), ones(C), f32(C)), ValueError, "^residual"),
    ("res ln residual int", lambda: ops.residual_layernorm_forward(f32(4, C), i32(4, C), ones(C), f32(C)), TypeError, "^residual"),
    ("res ln bwd dsum shape", _res_ln_bwd(dsum=f32(3, C)), ValueError, "^dsum"),
    ("res ln bwd sum dtype", _res_ln_bwd(sum=i32(4, C)), TypeError, "^sum"),
    # linear
    ("lin x int", lambda: ops.linear_forward(i32(4, C), f32(6, C)), TypeError, "^x"),
    ("lin x empty", lambda: ops.linear_forward(f32(0, C), f32(6, C)), ValueError, "^x"),
    ("lin weight 1-D", lambda: ops.linear_forward(f32(4, C), f32(C)), ValueError, "^weight"),
    ("lin weight in mismatch", lambda: ops.linear_forward(f32(4, C), f32(6, C + 1)), ValueError, "^weight.*in_features"),
    ("lin weight transposed", lambda: ops.linear_forward(f32(4, C), f32(C, 6)), ValueError, "^weight"),
    ("lin weight empty", lambda: ops.linear_forward(f32(4, C), f32(0, C)), ValueError, "^weight"),
    ("lin weight noncontig", lambda: ops.linear_forward(f32(4, C), noncontig(6, C)), ValueError, "^weight.*contiguous"),
    ("lin bias shape", lambda: ops.linear_forward(f32(4, C), f32(6, C), f32(C)), ValueError, "^bias"),
    ("lin bias int", lambda: ops.linear_forward(f32(4, C), f32(6, C), i32(6)), TypeError, "^bias"),
    ("lin bwd dout shape", _lin_bwd(dout=f32(4, 7)), ValueError, "^dout"),
    ("lin bwd dweight shape", _lin_bwd(dweight=f32(C, 6)), ValueError, "^dweight"),
    ("lin bwd dweight int", _lin_bwd(dweight=i32(6, C)), TypeError, "^dweight"),
    ("lin bwd dbias shape", _lin_bwd(dbias=f32(7)), ValueError, "^dbias"),
    ("lin bwd pre shape", _lin_bwd(pre=f32(4, 7)), ValueError, "^pre"),
    ("lin bwd x noncontig", _lin_bwd(x=noncontig(4, C)), ValueError, "^x.*contiguous"),
    # attention
    ("attn qkv 2-D", lambda: ops.attention_forward(f32(5, 3 * C), H), ValueError, "^qkv"),
    ("attn qkv not 3C", lambda: ops.attention_forward(f32(2, 5, 3 * C + 1), H), ValueError, "^qkv"),
    ("attn qkv empty", lambda: ops.attention_forward(f32(2, 0, 3 * C), H), ValueError, "^qkv"),
    ("attn qkv int", lambda: ops.attention_forward(i32(2, 5, 3 * C), H), TypeError, "^qkv"),
    ("attn qkv noncontig", lambda: ops.attention_forward(noncontig(2, 5, 3 * C), H), ValueError, "^qkv.*contiguous"),
    ("attn n_head not dividing", lambda: ops.attention_forward(qkv_ok, 3), ValueError, "^n_head.*divide"),
    ("attn n_head zero", lambda: ops.attention_forward(qkv_ok, 0), ValueError, "^n_head"),
    ("attn n_head negative", lambda: ops.attention_forward(qkv_ok, -2), ValueError, "^n_head"),
    ("attn window zero", lambda: ops.attention_forward(qkv_ok, H, window=0), ValueError, "^window"),
    ("attn window negative", lambda: ops.attention_forward(qkv_ok, H, window=-4), ValueError, "^window"),
    ("attn bwd window zero", _attn_bwd(window=0), ValueError, "^window"),
    ("attn bwd dout shape", _attn_bwd(dout=f32(2, 5, C + 1)), ValueError, "^dout"),
    ("attn bwd out shape", _attn_bwd(out=f32(2, 4, C)), ValueError, "^out"),
    ("attn bwd lse shape", _attn_bwd(lse=f32(2, 5, H)), ValueError, "^lse"),
    ("attn bwd lse dtype", _attn_bwd(lse=i32(2, H, 5)), TypeError, "^lse"),
    # cross-entropy
    ("ce logits 1-D", _ce(logits=f32(16), targets=i32(1)), ValueError, "^logits"),
    ("ce logits empty", _ce(logits=f32(0, 16), targets=i32(0)), ValueError, "^logits"),
    ("ce logits int", _ce(logits=i32(4, 16)), TypeError, "^logits"),
    ("ce logits noncontig", _ce(logits=noncontig(4, 16)), ValueError, "^logits.*contiguous"),
    ("ce targets float", _ce(targets=f32(4)), TypeError, "^targets"),
    ("ce targets shape", _ce(targets=i32(5)), ValueError, "^targets"),
    ("ce target too big", _ce(targets=i32(4, fill=16)), ValueError, "^targets"),
    ("ce target in padding", _ce(targets=i32(4, fill=12), vocab_size=12), ValueError, "^targets"),
    ("ce target negative", _ce(targets=i32(4, fill=-2)), ValueError, "^targets"),
    ("ce fwd target too big", _ce(ops.cross_entropy_forward, targets=np.full(4, 99, np.int64)), ValueError, "^targets"),
    ("ce vocab zero", _ce(vocab_size=0), ValueError, "^vocab_size"),
    ("ce vocab too big", _ce(vocab_size=17), ValueError, "^vocab_size"),
    ("ce ignore_index real class", _ce(ignore_index=3), ValueError, "^ignore_index"),
    # AdamW and the global norm
    ("adamw no params", _adamw(n=0), ValueError, "^params"),
    ("adamw grads length", _adamw(grads=[f32(5)]), ValueError, "^grads"),
    ("adamw m length", _adamw(m=[f32(5)] * 3), ValueError, "^m:"),
    ("adamw v length", _adamw(v=[f32(5)]), ValueError, "^v:"),
    ("adamw decay length", _adamw(decay=[True]), ValueError, "^decay"),
    ("adamw grads shape", _adamw(grads=[f32(5), f32(6)]), ValueError, r"^grads\[1\]"),
    ("adamw m dtype", _adamw(m=[f32(5), i32(5)]), TypeError, r"^m\[1\]"),
    ("adamw v shape", _adamw(v=[f32(4), f32(5)]), ValueError, r"^v\[0\]"),
    ("adamw params int", _adamw(params=[i32(5), f32(5)]), TypeError, r"^params\[0\]"),
    ("adamw params bf16", _adamw(params=[gptcore.tensor(f32(5), dtype="bf16"), f32(5)]), TypeError, r"^params\[0\]"),
    ("adamw params noncontig", _adamw(params=[noncontig(5), f32(5)]), ValueError, "^params.*contiguous"),
    ("adamw step zero", _adamw(step=0), ValueError, "^step"),
    ("adamw lr negative", _adamw(lr=-1.0), ValueError, "^lr"),
    ("adamw beta1 one", _adamw(beta1=1.0), ValueError, "^beta1"),
    ("adamw beta2 negative", _adamw(beta2=-0.1), ValueError, "^beta2"),
    ("adamw eps zero", _adamw(eps=0.0), ValueError, "^eps"),
    ("adamw weight_decay negative", _adamw(weight_decay=-0.1), ValueError, "^weight_decay"),
    ("adamw grad_scale inf", _adamw(grad_scale=float("inf")), ValueError, "^grad_scale"),
    ("norm empty list", lambda: ops.global_norm([]), ValueError, "^tensors"),
    ("norm int tensor", lambda: ops.global_norm([f32(3), i32(3)]), TypeError, r"^tensors\[1\]"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ---- devices ------------------------------------------------------------------------------------

DEVICE_CASES = [
    ("emb wte", lambda: ops.embedding_forward(idx_ok, fake_cuda(V, C), f32(MAXT, C)), "^wte.*cuda"),
    ("ln weight", lambda: ops.layernorm_forward(f32(4, C), fake_cuda(C), f32(C)), "^weight.*cuda"),
    ("ln bwd dbias", _ln_bwd(dbias=fake_cuda(C)), "^dbias.*cuda"),
    ("lin bias", lambda: ops.linear_forward(f32(4, C), f32(6, C), fake_cuda(6)), "^bias.*cuda"),
    ("lin bwd dweight", _lin_bwd(dweight=fake_cuda(6, C)), "^dweight.*cuda"),
    ("attn bwd lse", _attn_bwd(lse=fake_cuda(2, H, 5)), "^lse.*cuda"),
    ("ce targets", _ce(targets=fake_cuda(4, dtype="int32")), "^targets.*cuda"),
    ("adamw grads", _adamw(grads=[f32(5), fake_cuda(5)]), r"^grads\[1\].*cuda"),
    ("norm", lambda: ops.global_norm([f32(3), fake_cuda(3)]), r"^tensors\[1\].*cuda"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in DEVICE_CASES], ids=[c[0] for c in DEVICE_CASES])
def test_mixed_devices(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_cuda_tensor_without_usable_gpu_does_not_crash():
    """A CUDA tensor (from PyTorch/CuPy via DLPack) handed to a build without CUDA, or to a CUDA
    build on a machine without a GPU, must raise, also for the ops that allocate nothing
    (in-place updates, reductions)."""
    if gptcore.cuda.is_available():
        pytest.skip("a GPU is present: CUDA tensors are legitimate here")
    import inspect

    helpers = "\n".join(inspect.getsource(o) for o in (
        _DLDevice, _DLDataType, _DLTensor, _DLManagedTensor, fake_cuda))
    script = textwrap.dedent("""
        import ctypes, gptcore
        from gptcore import ops
        _KEEP_ALIVE = []
        {helpers}
        calls = {{
            "global_norm": lambda: ops.global_norm([fake_cuda(8)]),
            "adamw_step": lambda: ops.adamw_step([fake_cuda(8)], [fake_cuda(8)], [fake_cuda(8)],
                                                 [fake_cuda(8)], lr=1e-3, step=1),
            "embedding_backward": lambda: ops.embedding_backward(
                fake_cuda(1, 2, 8), fake_cuda(1, 2, dtype="int32"), fake_cuda(10, 8), fake_cuda(4, 8)),
            "linear_backward": lambda: ops.linear_backward(
                fake_cuda(4, 6), fake_cuda(4, 8), weight=fake_cuda(6, 8), need_dx=False,
                dweight=fake_cuda(6, 8)),
            "layernorm_forward": lambda: ops.layernorm_forward(fake_cuda(4, 8), fake_cuda(8), fake_cuda(8)),
        }}
        for name, call in calls.items():
            try:
                call()
            except (RuntimeError, ValueError, TypeError) as e:
                print(name, "raised", type(e).__name__, "CUDA" in str(e), flush=True)
            else:
                print(name, "returned", flush=True)
    """).format(helpers=helpers)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"crashed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5 and all(" raised " in ln and ln.endswith("True") for ln in lines), proc.stdout


# ---- outputs that cannot be written ---------------------------------------------------------------


def _readonly(a):
    a.setflags(write=False)
    return a


READONLY_CASES = [
    ("emb bwd dwte", lambda: ops.embedding_backward(ones(2, T, C), idx_ok, _readonly(f32(V, C)), f32(MAXT, C)), "^dwte"),
    ("ln bwd dweight", _ln_bwd(dweight=_readonly(f32(C))), "^dweight"),
    ("lin bwd dbias", _lin_bwd(dbias=_readonly(f32(6))), "^dbias"),
    ("adamw params", _adamw(params=[f32(5), _readonly(f32(5))]), "^params"),
    ("adamw m", _adamw(m=[_readonly(f32(5)), f32(5)]), "^m"),
    ("ce inplace logits", _ce(logits=_readonly(f32(4, 16)), inplace=True), "^logits"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in READONLY_CASES], ids=[c[0] for c in READONLY_CASES])
def test_readonly_outputs_rejected(call, pattern):
    # A read-only array (e.g. np.load(..., mmap_mode="r")) must not be written through.
    with pytest.raises(ValueError, match=pattern):
        call()


def test_non_native_byte_order_rejected():
    x = np.zeros((4, C), dtype=">f4")
    with pytest.raises(TypeError, match="^x"):
        ops.layernorm_forward(x, ones(C), f32(C))


def test_bad_input_leaves_outputs_untouched(rng):
    """A rejected call must not have half-updated the accumulated gradients."""
    dwte, dwpe = rng.randn(V, C), rng.randn(MAXT, C)
    before = dwte.copy(), dwpe.copy()
    idx = i32(2, T, fill=1)
    idx[1, 2] = V + 5
    with pytest.raises(ValueError, match="^idx"):
        ops.embedding_backward(ones(2, T, C), idx, dwte, dwpe)
    np.testing.assert_array_equal(dwte, before[0])
    np.testing.assert_array_equal(dwpe, before[1])
    params = [rng.randn(5), rng.randn(6)]
    saved = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"^grads\[1\]"):
        ops.adamw_step(params, [f32(5), f32(7)], [f32(5), f32(6)], [f32(5), f32(6)], lr=0.1, step=1)
    for p, s in zip(params, saved):
        np.testing.assert_array_equal(p, s)


# ---- aliasing of written tensors, and integer arguments outside int64 --------------------------


def test_adamw_refuses_aliased_state():
    p, g, m, v = (np.zeros(6, np.float32) for _ in range(4))
    step = dict(lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"^v\[0\]: shares memory with m\[0\]"):
        ops.adamw_step([p], [g], [m], [m], **step)
    with pytest.raises(ValueError, match=r"^params\[0\]: shares memory with grads\[0\]"):
        ops.adamw_step([p], [p], [m], [v], **step)
    q, m2, v2 = (np.zeros(6, np.float32) for _ in range(3))
    with pytest.raises(ValueError, match=r"params\[1\]"):  # one tensor listed twice
        ops.adamw_step([p, p], [g, q], [m, m2], [v, v2], **step)
    with pytest.raises(ValueError, match=r"^m\[1\]: shares memory with v\[0\]"):  # overlapping views
        big = np.zeros(12, np.float32)
        ops.adamw_step([p, q], [g, g], [m, big[3:9]], [big[:6], v2], **step)
    assert not p.any() and not m.any() and not big.any()  # refused before anything was written
    ops.adamw_step([p, q], [g, g], [m, m2], [v, v2], **step)  # shared gradients are only read


def test_gradient_buffers_must_not_overlap_inputs():
    buf = np.ones(48, np.float32)
    dout, dweight = buf[:24].reshape(4, 6), buf.reshape(6, 8)  # dweight's memory holds dout
    with pytest.raises(ValueError, match="^dweight: output buffer overlaps the input dout"):
        ops.linear_backward(dout, np.ones((4, 8), np.float32), weight=np.ones((6, 8), np.float32),
                            dweight=dweight)
    dwte = np.zeros((V, C), np.float32)
    with pytest.raises(ValueError, match="^dwpe: output buffer overlaps the output dwte"):
        ops.embedding_backward(ones(2, T, C), idx_ok, dwte, dwte[:MAXT])
    assert (buf == 1).all() and not dwte.any()


@pytest.mark.parametrize("name, call", [
    ("pos", lambda: ops.attention_kvcache(f32(1, 1, 24), f32(1, 2, 4, 4), f32(1, 2, 4, 4), 2 ** 64, 2)),
    ("n_head", lambda: ops.attention_forward(f32(1, 2, 24), 2 ** 64)),
    ("window", lambda: ops.attention_forward(f32(1, 2, 24), 2, window=-2 ** 70)),
    ("vocab_size", lambda: ops.cross_entropy_forward(f32(2, 5), i32(2, fill=1), vocab_size=2 ** 63)),
    ("ignore_index", lambda: ops.cross_entropy_forward(f32(2, 5), i32(2, fill=1), ignore_index=-2 ** 63 - 1)),
    ("step", lambda: ops.adamw_step([f32(3)], [f32(3)], [f32(3)], [f32(3)], lr=0.1, step=2 ** 64)),
    ("seed", lambda: ops.adamw_step([f32(3)], [f32(3)], [f32(3)], [f32(3)], lr=0.1, step=1, seed=2 ** 64)),
    ("top_k", lambda: ops.sample_tokens(f32(1, 4), top_k=2 ** 64)),
])
def test_integer_arguments_outside_int64_are_named(name, call):
    # pybind11 used to answer "incompatible function arguments" without naming the argument
    with pytest.raises(ValueError, match=f"^{name}: "):
        call()


def test_non_integer_settings_are_refused():
    with pytest.raises(TypeError, match="^n_head: expected an int"):
        ops.attention_forward(f32(1, 2, 24), 2.5)  # int(2.5) would silently be 2
