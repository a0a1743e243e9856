"""Continuous-batching decode steps: ``Decoder.step_rows`` (S rows, each at its own position, in
one batched pass) against S sequential batch-1 steps (what serving S clients costs without
per-row positions: one batch-1 Decoder per client, stepped in turn).

GPT-2 124M (random init: the speed does not depend on the weights). Row b holds a prompt of
PROMPT + GAP * b tokens, so every row sits at a different position; each round runs STEPS
decode steps of every row (the same cache slots are rewritten in every round). Reported: the
median time of one step of all S rows, tokens per second (S / step time), and the ratio
sequential / step_rows (how many times more clients one step serves in the same time).

    python benchmarks/bench_decode_rows.py [--device cpu|cuda] [--slots 1 4 16] [--steps N]
    pytest benchmarks/bench_decode_rows.py --benchmark-json=bench_decode_rows.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import pytest

import gptcore
from gptcore.models import GPT, GPTConfig
from gptcore.models.kvcache import Decoder

PROMPT, GAP = 16, 8  # row b's prompt: PROMPT + GAP * b tokens


def make_model(device="cpu", preset="gpt2"):
    dtype = "float32" if device == "cpu" else "bfloat16"
    return GPT(GPTConfig.preset(preset), device=device, dtype=dtype, seed=0).eval()


def _prompts(model, S):
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, PROMPT + GAP * b) for b in range(S)]


def rows_stepper(model, S, steps):
    """fn() running `steps` step_rows calls over S prefilled rows at different positions."""
    prompts = _prompts(model, S)
    dec = Decoder(model, S, PROMPT + GAP * (S - 1) + steps)
    start = np.array([len(p) for p in prompts])
    first = np.array([dec.prefill_row(b, p).argmax() for b, p in enumerate(prompts)])

    def fn():
        ids, pos = first, start.copy()
        for _ in range(steps):
            ids = dec.step_rows(ids, pos).argmax(axis=1)
            pos += 1

    return fn


def sequential_stepper(model, S, steps):
    """fn() running `steps` steps of S batch-1 Decoders, one after the other."""
    prompts = _prompts(model, S)
    decs = [Decoder(model, 1, len(p) + steps) for p in prompts]
    first = [int(d.forward(p[None, :]).argmax()) for d, p in zip(decs, prompts)]

    def fn():
        ids = list(first)
        for d, p in zip(decs, prompts):
            d.pos = len(p)  # the prompt's cache entries stay valid; later slots are rewritten
        for _ in range(steps):
            for b, d in enumerate(decs):
                ids[b] = int(d.forward([[ids[b]]]).argmax())

    return fn


def step_time(fn, steps, device, rounds=3, warmup=1):
    """Median seconds per step of fn() (which runs `steps` steps)."""
    def synced():
        fn()
        if device != "cpu":
            gptcore.cuda.synchronize()

    for _ in range(warmup):
        synced()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        synced()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / steps


def run(device="cpu", slots=(1, 4, 16), steps=8, rounds=3):
    if device != "cpu" and not gptcore.cuda.is_available():
        print("no CUDA GPU available: skipping the GPU figures")
        return []
    model = make_model(device)
    rows = []
    for S in slots:
        t_rows = step_time(rows_stepper(model, S, steps), steps, device, rounds)
        t_seq = step_time(sequential_stepper(model, S, steps), steps, device, rounds)
        rows.append((device, S, steps, t_rows, t_seq))
    return rows


def print_table(rows):
    print(f"GPT-2 124M, one decode step of S rows at different positions (prompts {PROMPT} + "
          f"{GAP}*b tokens); {gptcore.get_num_threads()} CPU threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| device | S | step_rows ms/step | tokens/s | S sequential batch-1 ms | tokens/s | "
          "sequential / step_rows |")
    print("|---|---|---|---|---|---|---|")
    for device, S, _, t_rows, t_seq in rows:
        print(f"| {device} | {S} | {t_rows * 1e3:.1f} | {S / t_rows:,.0f} | {t_seq * 1e3:.1f} | "
              f"{S / t_seq:,.0f} | {t_seq / t_rows:.2f}x |")


# ---- pytest-benchmark entries --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_model():
    return make_model("cpu")


@pytest.mark.parametrize("slots", [1, 4, 16])
@pytest.mark.parametrize("impl", ["step_rows", "sequential"])
def test_decode_rows_cpu(benchmark, cpu_model, impl, slots):
    steps = 4
    make = rows_stepper if impl == "step_rows" else sequential_stepper
    benchmark.group = f"decode rows | cpu | S {slots}"
    benchmark.extra_info.update(impl=impl, device="cpu", slots=slots, tokens=slots * steps)
    benchmark.pedantic(make(cpu_model, slots, steps), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = slots * steps / benchmark.stats.stats.median


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    a = ap.parse_args(argv)
    if a.threads:
        gptcore.set_num_threads(a.threads)
    rows = run(a.device, a.slots, a.steps, a.rounds)
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
