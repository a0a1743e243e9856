"""Decode throughput of gptcore's KV-cache sampler, beside a plain PyTorch KV-cache loop.

GPT-2 124M (random init: the speed does not depend on the weights), a prompt of PROMPT tokens
prefilled once, then one position per step for every row. A decode step is what each generated
token costs: the model forward for one position over the KV cache and the LM head, plus the
choice of the next token (greedy argmax here, on the host for both). Throughput is
batch * steps / time, the median over rounds, in tokens per second.

* ``gptcore``: :class:`gptcore.models.kvcache.Decoder`, the forward that ``gptcore.generate`` runs.
* ``gptcore generate()``: the whole ``generate`` call (prefill + steps + sampling controls),
  end to end, tokens / s over the generated tokens.
* ``torch``: the same weights in a plain PyTorch loop -- ``F.layer_norm``, ``F.linear``,
  preallocated K/V caches written by slice assignment, ``F.scaled_dot_product_attention`` over
  the filled part, tanh-GELU -- under ``torch.inference_mode`` with the same thread count.
  Skipped where torch is not importable.

CPU: batch 1 and batch 32 (target: batch 1 at least as fast as PyTorch's CPU loop). GPU (only
where one is available): bf16, batch 1 and 32, targets 3,000 and 40,000 tokens/s on an H100.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--steps N] [--batch 1 32]
    pytest benchmarks/bench_generate.py --benchmark-json=bench_generate.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import pytest

import gptcore
from gptcore.models import GPTConfig
from gptcore.models import GPT
from gptcore.generate import generate
from gptcore.models.kvcache import Decoder

PROMPT = 16
TARGETS = {("cpu", 1): "torch CPU loop", ("cuda", 1): 3000, ("cuda", 32): 40000}

try:
    import torch
    import torch.nn.functional as F

    HAVE_TORCH = True
except Exception:  # torch absent or broken: gptcore figures only
    torch = F = None
    HAVE_TORCH = False


def _sync(device):
    if device != "cpu":
        gptcore.cuda.synchronize()
        if HAVE_TORCH and torch.cuda.is_available():
            torch.cuda.synchronize()


def make_model(device="cpu", preset="gpt2"):
    dtype = "float32" if device == "cpu" else "bfloat16"
    return GPT(GPTConfig.preset(preset), device=device, dtype=dtype, seed=0)


# ---- gptcore ------------------------------------------------------------------------------------


def gptcore_stepper(model, batch, steps):
    """fn() running `steps` greedy decode steps after a prefilled prompt."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, size=(batch, PROMPT))
    dec = Decoder(model, batch, PROMPT + steps)
    first = dec.forward(prompt).argmax(axis=1)

    def fn():
        dec.pos = PROMPT  # the prompt's cache entries stay valid; later slots are rewritten
        tok = first
        for _ in range(steps):
            tok = dec.forward(tok[:, None]).argmax(axis=1)

    return fn


def gptcore_generate_fn(model, batch, steps):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, size=(batch, PROMPT))

    def fn():
        generate(model, prompt, steps, temperature=0)

    return fn


# ---- PyTorch ------------------------------------------------------------------------------------


class TorchKVCache:
    """GPT-2 in plain PyTorch with a preallocated KV cache (the baseline of the issue)."""

    def __init__(self, model, batch, max_len, device="cpu"):
        cfg = model.config
        self.cfg = cfg
        dt = torch.float32 if device == "cpu" else torch.bfloat16
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device=device, dtype=dt)
                  for k, v in model.state_dict().items()}
        H, D = cfg.n_head, cfg.n_embd // cfg.n_head
        self.k = [torch.empty(batch, H, max_len, D, device=device, dtype=dt) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(batch, H, max_len, D, device=device, dtype=dt) for _ in range(cfg.n_layer)]
        self.device = device

    def forward(self, idx, pos):
        cfg, w = self.cfg, self.w
        B, T = idx.shape
        C, H = cfg.n_embd, cfg.n_head
        D = C // H
        x = w["wte"][idx] + w["wpe"][pos:pos + T]
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            h = F.layer_norm(x, (C,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.ln_eps)
            q, k, v = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]).split(C, dim=2)
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
            self.k[i][:, :, pos:pos + T] = k
            self.v[i][:, :, pos:pos + T] = v
            a = F.scaled_dot_product_attention(q, self.k[i][:, :, :pos + T], self.v[i][:, :, :pos + T],
                                               is_causal=T > 1)
            a = a.transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(a, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
            h = F.layer_norm(x, (C,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.ln_eps)
            h = F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]), approximate="tanh")
            x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x[:, -1], (C,), w["ln_f.weight"], w["ln_f.bias"], cfg.ln_eps)
        return F.linear(x, w["wte"])


def torch_stepper(model, batch, steps, device="cpu"):
    tdev = "cpu" if device == "cpu" else "cuda"
    net = TorchKVCache(model, batch, PROMPT + steps, tdev)
    rng = np.random.default_rng(0)
    prompt = torch.from_numpy(rng.integers(0, model.config.vocab_size, size=(batch, PROMPT))).to(tdev)
    with torch.inference_mode():
        first = net.forward(prompt, 0).argmax(dim=1)

    def fn():
        with torch.inference_mode():
            tok = first
            for s in range(steps):
                tok = net.forward(tok[:, None], PROMPT + s).argmax(dim=1)

    return fn


# ---- timing -----------------------------------------------------------------------------------------


def rate(fn, tokens, device, rounds=3, warmup=1):
    """Median tokens per second of fn() (which produces `tokens` tokens)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def run(device="cpu", batches=(1, 32), steps=None, rounds=3):
    if device != "cpu" and not gptcore.cuda.is_available():
        print("no CUDA GPU available: skipping the GPU figures")
        return []
    if HAVE_TORCH and device == "cpu":
        torch.set_num_threads(gptcore.get_num_threads())
    model = make_model(device)
    rows = []
    for B in batches:
        n = steps or (32 if device == "cpu" and B == 1 else 16 if device == "cpu" else 128)
        r_gc = rate(gptcore_stepper(model, B, n), B * n, device, rounds)
        r_gen = rate(gptcore_generate_fn(model, B, n), B * n, device, rounds)
        r_t = None
        if HAVE_TORCH and (device == "cpu" or torch.cuda.is_available()):
            r_t = rate(torch_stepper(model, B, n, device), B * n, device, rounds)
        rows.append((device, B, n, r_gc, r_gen, r_t, TARGETS.get((device, B))))
    return rows


def print_table(rows):
    print(f"GPT-2 124M decode throughput (tokens/s; prompt {PROMPT}, greedy), "
          f"{gptcore.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}")
    print("| device | batch | steps | gptcore decode | gptcore generate() | PyTorch KV loop | "
          "generate() / torch | target |")
    print("|---|---|---|---|---|---|---|---|")
    for device, B, n, r_gc, r_gen, r_t, target in rows:
        ratio = f"{r_gen / r_t:.2f}x" if r_t else "-"
        t = "-" if r_t is None else f"{r_t:,.1f}"
        print(f"| {device} | {B} | {n} | {r_gc:,.1f} | {r_gen:,.1f} | {t} | {ratio} | "
              f"{target if target is not None else '-'} |")


# ---- pytest-benchmark entries --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_model():
    return make_model("cpu")


def _bench(benchmark, fn, tokens, impl, device, batch):
    benchmark.group = f"decode | {device} | batch {batch}"
    benchmark.extra_info.update(impl=impl, device=device, batch=batch, tokens=tokens)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median


# impl: "decoder" = Decoder.forward steps with a host argmax (the model's forward alone);
# "generate" = gptcore.generate(), what users get (device sampling; on a GPU, CUDA-graph steps);
# "torch" = the plain PyTorch KV-cache loop.
@pytest.mark.parametrize("batch, steps", [(1, 16), (32, 8)])
@pytest.mark.parametrize("impl", ["decoder", "generate", "torch"])
def test_decode_cpu(benchmark, cpu_model, impl, batch, steps):
    if impl == "torch":
        if not HAVE_TORCH:
            pytest.skip("torch is not importable")
        torch.set_num_threads(gptcore.get_num_threads())
        fn = torch_stepper(cpu_model, batch, steps)
    elif impl == "generate":
        fn = gptcore_generate_fn(cpu_model, batch, steps)
    else:
        fn = gptcore_stepper(cpu_model, batch, steps)
    _bench(benchmark, fn, batch * steps, impl, "cpu", batch)


@pytest.mark.parametrize("batch, steps", [(1, 128), (32, 128)])
@pytest.mark.parametrize("impl", ["decoder", "generate", "torch"])
def test_decode_gpu(benchmark, impl, batch, steps):
    if not gptcore.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model = make_model("cuda")
    if impl == "torch":
        if not (HAVE_TORCH and torch.cuda.is_available()):
            pytest.skip("torch with CUDA is not importable")
        fn = torch_stepper(model, batch, steps, "cuda")
    elif impl == "generate":
        fn = gptcore_generate_fn(model, batch, steps)
    else:
        fn = gptcore_stepper(model, batch, steps)

    def synced():
        fn()
        _sync("cuda")

    _bench(benchmark, synced, batch * steps, impl, "cuda", batch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=None, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for gptcore and torch alike (default: all cores)")
    a = ap.parse_args(argv)
    if a.threads:
        gptcore.set_num_threads(a.threads)
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    rows = []
    for d in devices:
        rows += run(d, a.batch, a.steps, a.rounds)
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
