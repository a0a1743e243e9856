"""GPT-2 124M training step on the CPU: forward + backward + AdamW, float32, B=4, T=64.

Target: <= 0.9 s per step on a 2-core machine (issue 3). Run with

    pytest benchmarks/bench_train_cpu.py              # pytest-benchmark timing
    python benchmarks/bench_train_cpu.py [--steps N] [--preset NAME] [-B 4] [-T 64]
                                                      # median step time and a per-op profile

The step is what `gptcore train` does each step: zero_grad, forward with the fused
cross-entropy, backward, global-norm clipping and the fused AdamW update.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import gptcore
from gptcore.models import GPTConfig
from gptcore.models import GPT
from gptcore.optim import AdamW
from op_profile import print_op_table, profile_ops

B, T = 4, 64


def make_step(preset: str = "gpt2", batch: int = B, seq: int = T, seed: int = 0):
    cfg = GPTConfig.preset(preset)
    model = GPT(cfg, seed=seed)
    opt = AdamW(model, lr=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)

    def step():
        model.zero_grad()
        loss = model.forward(x, y)
        model.backward()
        opt.step(grad_clip=1.0)
        return loss

    return step, model


@pytest.fixture(scope="module")
def gpt2_step():
    step, _ = make_step()
    step()  # warm-up: first-touch page faults, BLAS buffers
    return step


def test_gpt2_124m_train_step_cpu(benchmark, gpt2_step):
    benchmark.extra_info.update({"model": "gpt2 (124M)", "batch": B, "seq": T, "dtype": "float32",
                                 "threads": gptcore.get_num_threads(), "target_s": 0.9})
    loss = benchmark.pedantic(gpt2_step, rounds=5, iterations=1, warmup_rounds=1)
    assert np.isfinite(loss)


# ---- per-op profile (python benchmarks/bench_train_cpu.py) ---------------------------------------


def profile(preset: str, batch: int, seq: int, steps: int) -> None:
    step, model = make_step(preset, batch, seq)
    med, per_op, calls = profile_ops(step, steps)
    flops = model.config.flops_per_token(seq) * batch * seq
    print(f"{preset}: B={batch} T={seq}, {gptcore.get_num_threads()} threads: step median {med:.3f} s; "
          f"{flops / med / 1e9:.1f} GFLOP/s model FLOPs")
    inside = sum(per_op.values())
    print(f"  time inside ops {inside:.3f} s/step; outside (Python, allocation) {med - inside:+.3f} s")
    print_op_table(med, per_op, calls)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("-B", type=int, default=B)
    ap.add_argument("-T", type=int, default=T)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        gptcore.set_num_threads(a.threads)
    profile(a.preset, a.B, a.T, a.steps)
