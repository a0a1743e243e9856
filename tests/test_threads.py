"""The thread count does not change any number: forward, backward, gradient-norm clipping and
the AdamW update give the same bits with 1, 2 and 3 threads, so a training run resumed with
another ``--threads`` continues exactly.

The kernels that reduce across a split (LayerNorm's dweight/dbias, the global norm, and the
OpenBLAS calls of the linear layers, whose summation order follows each call's shape) cut their
work into blocks whose size depends only on the problem, never on the thread count.
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from gptcore.models import GPT, GPTConfig
from gptcore.optim import AdamW


def run(threads: int, n_embd: int, B: int, T: int, steps: int = 2) -> dict:
    gptcore.set_num_threads(threads)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=n_embd, block_size=64, vocab_size=300)
    model = GPT(cfg, seed=1)
    opt = AdamW(model, lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    out = {"loss": [], "norm": []}
    for step in range(steps):
        model.zero_grad()
        out["loss"].append(model.forward(x, y))
        model.backward()
        if step == 0:
            out["grads"] = {k: v.numpy().copy() for k, v in model.grads().items()}
        out["norm"].append(opt.step(grad_clip=0.5))  # clipping active: the norm scales the update
    out["params"] = {k: v.numpy().copy() for k, v in model.parameters().items()}
    out["logits"] = model.logits(x)
    return out


# shapes that reach every split: one token (matrix-vector products), more tokens than features
# (linear layers split rows), several fixed blocks along every dimension (n_embd 160: the MLP's
# 640 columns, LayerNorm's 32-row partials over 256 rows, a 48,000-element embedding norm)
@pytest.mark.parametrize("n_embd, B, T", [(160, 1, 1), (160, 2, 40), (160, 4, 64), (64, 3, 7)])
def test_results_do_not_depend_on_thread_count(n_embd, B, T):
    before = gptcore.get_num_threads()
    try:
        results = {nt: run(nt, n_embd, B, T) for nt in (1, 2, 3)}
    finally:
        gptcore.set_num_threads(before)
    want = results[1]
    for nt in (2, 3):
        got = results[nt]
        assert got["loss"] == want["loss"], nt
        assert got["norm"] == want["norm"], nt
        for part in ("grads", "params"):
            bad = [k for k in want[part] if not np.array_equal(got[part][k], want[part][k])]
            assert not bad, (nt, part, bad)
        assert np.array_equal(got["logits"], want["logits"]), nt
