"""What the thread count changes, and what it must not.

The reductions that gptcore splits itself sum in an order that depends only on the problem:
LayerNorm's dweight/dbias (fixed 32-row partials) and the global gradient norm (fixed blocks),
so gradient clipping and the LayerNorm gradients give the same bits with any thread count. The
linear layers split their OpenBLAS calls by thread (cutting them into problem-sized blocks made
every GEMM 10-14% slower), and OpenBLAS's order of summation follows each call's shape, so the
last bits of a linear layer's output can depend on the thread count. A training run therefore
records its thread count, and a resume with another one says that it will not be bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore import ops


def _with_threads(n, fn):
    before = gptcore.get_num_threads()
    gptcore.set_num_threads(n)
    try:
        return fn()
    finally:
        gptcore.set_num_threads(before)


@pytest.mark.parametrize("N, C", [(1, 160), (7, 64), (256, 160), (1000, 96)])
def test_layernorm_gradients_and_global_norm_do_not_depend_on_thread_count(N, C):
    rng = np.random.default_rng(N * 1000 + C)
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal(C, dtype=np.float32)
    b = rng.standard_normal(C, dtype=np.float32)
    dout = rng.standard_normal((N, C), dtype=np.float32)
    big = [rng.standard_normal(n, dtype=np.float32) for n in (48_000, 17, 100_003)]

    def run():
        _, mean, rstd = ops.layernorm_forward(x, w, b)
        dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)
        dx = ops.layernorm_backward(dout, x, mean=mean, rstd=rstd, weight=w, dweight=dw, dbias=db)
        return dx.numpy().copy(), dw, db, ops.global_norm(big)

    want = _with_threads(1, run)
    for n in (2, 3):
        got = _with_threads(n, run)
        for a, b_ in zip(got[:3], want[:3]):
            assert np.array_equal(a, b_), n
        assert got[3] == want[3], n


def test_a_resume_with_another_thread_count_says_it_is_not_exact(tmp_path, capsys):
    from gptcore.train import load_checkpoint, train

    from .train.test_train import run_cfg

    data = tmp_path / "d"
    src = tmp_path / "a.py"
    src.write_text("def f(x):\n    return x + 1\n" * 300)
    gptcore.data.prepare([str(src)], str(data), val_fraction=0.1, tokenizer="byte", progress=False)
    out = tmp_path / "run"
    _with_threads(1, lambda: train(run_cfg(str(data), out, threads=1, stop_after=3)))
    assert load_checkpoint(str(out / "checkpoint"))["state"]["threads"] == 1
    capsys.readouterr()
    _with_threads(2, lambda: train(run_cfg(str(data), out, resume=True, threads=2)))
    err = capsys.readouterr().err
    assert "trained with 1 CPU threads and resumes with 2" in err and "--threads 1" in err
    capsys.readouterr()
    _with_threads(1, lambda: train(run_cfg(str(data), tmp_path / "run2", threads=1, stop_after=3)))
    _with_threads(1, lambda: train(run_cfg(str(data), tmp_path / "run2", resume=True, threads=1)))
    assert "CPU threads" not in capsys.readouterr().err
