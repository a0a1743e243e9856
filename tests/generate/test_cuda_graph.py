"""gptcore.cuda.Graph: capture gptcore ops once, replay them with one launch.

Without a GPU (or without CUDA support) only the refusals run. The gpu tests capture ops writing
into buffers allocated before the capture, change the inputs and the device-side decode position
in place between replays, and compare every replay with the same ops run eagerly (or with the
NumPy reference); they check that the capture refuses what it cannot record (new GPU memory,
host copies, synchronisation, stream switches) with a RuntimeError, that the previous stream is
restored when the captured block raises, and that memory the graph uses is not handed to anyone
else while the graph lives.
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref
from tests.helpers import rel_err, to_cuda

TOL = 1e-5


def _set(buf, a):
    """Overwrite a CUDA buffer in place from a NumPy array (outside any capture)."""
    dtype = {"float32": np.float32, "int32": np.int32, "int64": np.int64}[buf.dtype]
    buf.copy_(gptcore.tensor(np.ascontiguousarray(a, dtype=dtype)))


# ---- without a GPU -------------------------------------------------------------------------------


@pytest.mark.skipif(gptcore.cuda.is_available(), reason="a GPU is available")
def test_graph_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        gptcore.cuda.Graph()


def test_not_capturing_outside_a_capture():
    assert gptcore.cuda.capturing() is False


# ---- replay equals eager ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [False, True])
def test_replay_linear_with_new_inputs(rng, gelu):
    N, K, M = 3, 37, 50
    x = to_cuda(rng.randn(N, K))
    w, b = to_cuda(rng.randn(M, K)), to_cuda(rng.randn(M))
    out, pre = gptcore.empty([N, M], device="cuda"), gptcore.empty([N, M], device="cuda")
    outs = (out, pre) if gelu else out
    ops.linear_forward(x, w, b, gelu=gelu, out=outs)  # warm-up (scratch into the cache)
    g = gptcore.cuda.Graph()
    with g.capture():
        ops.linear_forward(x, w, b, gelu=gelu, out=outs)
    assert g.captured and not gptcore.cuda.capturing()
    for step in range(4):
        xs = rng.randn(N, K)
        _set(x, xs)
        _set(out, np.full((N, M), np.nan, np.float32))  # poison: replay must write every element
        g.replay()
        want = ref.linear_forward(xs, np.asarray(w.numpy()), np.asarray(b.numpy()), gelu=gelu)
        want = want[0] if isinstance(want, tuple) else want
        err = rel_err(out.numpy(), want)
        assert err <= TOL, f"replay {step}: relative error {err:.3e} ({rng})"


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4])
def test_replay_attention_kvcache_with_device_pos(rng, window):
    """One captured decode-attention step serves every position: the position lives in a device
    tensor that is advanced between replays; each replay equals the int-position op run eagerly
    on a second pair of caches."""
    B, H, D, Tmax = 2, 3, 16, 70
    C = H * D
    qkv_all = rng.randn(B, Tmax, 3 * C)
    kc, vc = (gptcore.zeros([B, H, Tmax, D], device="cuda") for _ in range(2))
    kc2, vc2 = (gptcore.zeros([B, H, Tmax, D], device="cuda") for _ in range(2))
    qkv, out = gptcore.empty([B, 1, 3 * C], device="cuda"), gptcore.empty([B, 1, C], device="cuda")
    pos = to_cuda(np.array([0], np.int32))
    _set(qkv, qkv_all[:, :1])
    ops.attention_kvcache(qkv, kc, vc, pos, H, window, out=out)  # warm-up at position 0
    g = gptcore.cuda.Graph()
    with g.capture():
        ops.attention_kvcache(qkv, kc, vc, pos, H, window, out=out)
    for t in range(Tmax):
        _set(qkv, qkv_all[:, t:t + 1])
        _set(pos, np.array([t], np.int32))
        g.replay()
        want = ops.attention_kvcache(qkv, kc2, vc2, t, H, window)
        err = rel_err(out.numpy(), want.numpy())
        assert err <= TOL, f"position {t}: relative error {err:.3e} ({rng})"
    np.testing.assert_array_equal(np.asarray(kc.numpy()), np.asarray(kc2.numpy()))
    np.testing.assert_array_equal(np.asarray(vc.numpy()), np.asarray(vc2.numpy()))


@pytest.mark.gpu
def test_replay_small_decode_step(rng):
    """embedding (device pos) -> qkv linear -> KV-cache attention (device pos) -> projection:
    a miniature decode step captured once and replayed over a whole sequence, against the same
    ops run eagerly with int positions."""
    V, C, H, Tmax, B = 23, 24, 2, 12, 2
    D = C // H
    wte, wpe = to_cuda(rng.randn(V, C)), to_cuda(rng.randn(Tmax, C))
    w_qkv, b_qkv = to_cuda(rng.randn(3 * C, C, scale=0.2)), to_cuda(rng.randn(3 * C))
    w_o = to_cuda(rng.randn(C, C, scale=0.2))
    ids = rng.integers(0, V, size=(B, Tmax)).astype(np.int32)

    def step(idx, pos, kc, vc, bufs):
        x, qkv, att, y = bufs
        ops.embedding_forward(idx, wte, wpe, pos, out=x)
        ops.linear_forward(x.view([B, C]), w_qkv, b_qkv, out=qkv.view([B, 3 * C]))
        ops.attention_kvcache(qkv, kc, vc, pos, H, out=att)
        ops.linear_forward(att.view([B, C]), w_o, None, out=y)
        return y

    def buffers():
        return (gptcore.empty([B, 1, C], device="cuda"), gptcore.empty([B, 1, 3 * C], device="cuda"),
                gptcore.empty([B, 1, C], device="cuda"), gptcore.empty([B, C], device="cuda"))

    idx, pos = to_cuda(ids[:, :1]), to_cuda(np.array([0], np.int32))
    kc, vc = (gptcore.zeros([B, H, Tmax, D], device="cuda") for _ in range(2))
    bufs = buffers()
    step(idx, pos, kc, vc, bufs)  # warm-up
    g = gptcore.cuda.Graph()
    with g.capture():
        y = step(idx, pos, kc, vc, bufs)
    kc2, vc2 = (gptcore.zeros([B, H, Tmax, D], device="cuda") for _ in range(2))
    for t in range(Tmax):
        _set(idx, ids[:, t:t + 1])
        _set(pos, np.array([t], np.int32))
        g.replay()
        want = step(to_cuda(ids[:, t:t + 1]), t, kc2, vc2, buffers())
        err = rel_err(y.numpy(), want.numpy())
        assert err <= TOL, f"position {t}: relative error {err:.3e} ({rng})"


@pytest.mark.gpu
def test_replay_is_ordered_with_the_stream(rng):
    """Replays queue on the current stream: several back to back, each reading what the previous
    one wrote, and eager work after them sees the last result."""
    n = 1000
    a = to_cuda(rng.randn(1, n))
    w = to_cuda(np.eye(n, dtype=np.float32) * 0.5)
    b = gptcore.empty([1, n], device="cuda")
    ops.linear_forward(a, w, None, out=b)
    g = gptcore.cuda.Graph()
    with g.capture():  # a <- 0.5 a, through b
        ops.linear_forward(a, w, None, out=b)
        a.copy_(b)
    start = np.asarray(a.numpy()).copy()
    for _ in range(5):
        g.replay()
    np.testing.assert_allclose(np.asarray(a.numpy()), start / 32, rtol=1e-6)


# ---- what a capture refuses ---------------------------------------------------------------------


@pytest.mark.gpu
def test_allocation_during_capture_raises_and_restores():
    before = gptcore.cuda.current_stream()
    gptcore.cuda.empty_cache()
    g = gptcore.cuda.Graph()
    with pytest.raises(RuntimeError, match="captur"):
        with g.capture():
            gptcore.empty([12345679], device="cuda")  # nothing cached is that large: cudaMalloc
    assert gptcore.cuda.current_stream() == before
    assert not gptcore.cuda.capturing() and not g.captured
    with pytest.raises(RuntimeError, match="nothing captured"):
        g.replay()
    # eager work goes on, and the graph can capture again
    x = gptcore.tensor(np.ones((2, 3), np.float32), device="cuda")
    w = gptcore.tensor(np.ones((4, 3), np.float32), device="cuda")
    out = gptcore.empty([2, 4], device="cuda")
    ops.linear_forward(x, w, None, out=out)
    with g.capture():
        ops.linear_forward(x, w, None, out=out)
    _set(out, np.zeros((2, 4), np.float32))
    g.replay()
    np.testing.assert_array_equal(np.asarray(out.numpy()), np.full((2, 4), 3.0, np.float32))


@pytest.mark.gpu
def test_stream_restored_after_an_exception():
    before = gptcore.cuda.current_stream()
    g = gptcore.cuda.Graph()
    with pytest.raises(KeyError, match="inside"):
        with g.capture():
            assert gptcore.cuda.capturing()
            assert gptcore.cuda.current_stream() != before  # the private capture stream
            raise KeyError("inside")
    assert gptcore.cuda.current_stream() == before
    assert not gptcore.cuda.capturing() and not g.captured


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["to_host", "from_host", "synchronize", "set_stream",
                                  "empty_cache", "global_norm"])
def test_host_interaction_during_capture_raises(what):
    before = gptcore.cuda.current_stream()
    t = gptcore.zeros([16], device="cuda")
    g = gptcore.cuda.Graph()
    actions = {
        "to_host": lambda: t.numpy(),
        "from_host": lambda: t.copy_(gptcore.tensor(np.ones(16, np.float32))),
        "synchronize": gptcore.cuda.synchronize,
        "set_stream": lambda: gptcore.cuda.set_stream(0),
        "empty_cache": gptcore.cuda.empty_cache,
        "global_norm": lambda: ops.global_norm([t]),
    }
    with pytest.raises(RuntimeError, match="captur"):
        with g.capture():
            actions[what]()
    assert gptcore.cuda.current_stream() == before and not gptcore.cuda.capturing()
    assert float(np.abs(np.asarray(t.numpy())).sum()) == 0.0  # nothing ran


@pytest.mark.gpu
def test_nested_capture_is_refused():
    g1, g2 = gptcore.cuda.Graph(), gptcore.cuda.Graph()
    with g1.capture():
        with pytest.raises(RuntimeError, match="nest"):
            with g2.capture():
                pass
        with pytest.raises(RuntimeError, match="capture"):
            g1.replay()
    assert g1.captured and not g2.captured


# ---- memory kept for the graph ------------------------------------------------------------------


@pytest.mark.gpu
def test_memory_freed_during_capture_stays_with_the_graph(rng):
    """A temporary allocated and dropped inside the capture is rewritten by every replay; it must
    not be handed to a tensor allocated afterwards."""
    N, K = 4, 64
    x, w = to_cuda(rng.randn(N, K)), to_cuda(rng.randn(K, K))
    out = gptcore.empty([N, K], device="cuda")
    tmp = ops.linear_forward(x, w, None)[0]  # warm-up: a block of tmp's size goes to the cache
    del tmp
    g = gptcore.cuda.Graph()
    with g.capture():
        tmp = ops.linear_forward(x, w, None)[0]  # from the cache, freed inside the capture
        ops.linear_forward(tmp, w, None, out=out)
        del tmp
    others = [to_cuda(np.full((N, K), 7.0, np.float32)) for _ in range(4)]
    for _ in range(3):
        g.replay()
    for o in others:
        np.testing.assert_array_equal(np.asarray(o.numpy()), np.full((N, K), 7.0, np.float32))
    xs = np.asarray(x.numpy(), np.float64)
    ws = np.asarray(w.numpy(), np.float64)
    assert rel_err(out.numpy(), xs @ ws.T @ ws.T) <= TOL
    g.reset()
    assert not g.captured
    with pytest.raises(RuntimeError, match="nothing captured"):
        g.replay()


@pytest.mark.gpu
def test_output_allocated_during_capture_is_the_replay_output(rng):
    N, K = 3, 40
    x, w = to_cuda(rng.randn(N, K)), to_cuda(rng.randn(K, K))
    y = ops.linear_forward(x, w, None)[0]
    del y
    g = gptcore.cuda.Graph()
    with g.capture():
        y = ops.linear_forward(x, w, None)[0]
    for _ in range(2):
        xs = rng.randn(N, K)
        _set(x, xs)
        g.replay()
        assert rel_err(y.numpy(), xs.astype(np.float64) @ np.asarray(w.numpy(), np.float64).T) <= TOL


@pytest.mark.gpu
def test_graph_repr_and_recapture(rng):
    g = gptcore.cuda.Graph()
    assert "empty" in repr(g)
    x = to_cuda(rng.randn(2, 8))
    w = to_cuda(rng.randn(8, 8))
    out = gptcore.empty([2, 8], device="cuda")
    ops.linear_forward(x, w, None, out=out)
    with g.capture():
        assert "capturing" in repr(g)
        ops.linear_forward(x, w, None, out=out)
    assert "captured" in repr(g)
    with g.capture():  # a second capture replaces the first: out = x @ w^T + 0 -> out = x
        out.copy_(x)
    _set(out, np.zeros((2, 8), np.float32))
    g.replay()
    np.testing.assert_array_equal(np.asarray(out.numpy()), np.asarray(x.numpy()))
