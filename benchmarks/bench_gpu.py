"""GPU benchmarks: each gptcore CUDA kernel beside PyTorch's figure for the same op, same run.

    python benchmarks/bench_gpu.py [--quick] [--json results.json]

Compute-bound kernels report TFLOP/s, memory-bound ones GB/s (the fewest bytes the op must move:
each input read once, each output written once). Timing: CUDA events around each repetition
(PyTorch's events when torch is importable; gptcore then launches on torch's current stream),
otherwise gptcore.cuda.synchronize() + time.perf_counter(); warm-up first, the median of the
repetitions reported. Each row also gives the fraction of the H100 ceilings measured for the
issue: 3.0 TB/s copy bandwidth and 736 TFLOP/s for a large bf16 GEMM. Shapes are the issue's
target table (GPT-2 124M, B=16, T=1024). Exits 0 with a note when no GPU is available.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

import gptcore
from gptcore import ops

PEAK_BW = 3.0e12      # bytes/s, H100 SXM device-to-device copy measured for the issue
PEAK_FLOPS = 736e12   # bf16 GEMM measured for the issue

try:
    import torch
    import torch.nn.functional as F

    HAVE_TORCH = torch.cuda.is_available()
except Exception:  # torch missing or broken: gptcore-only figures
    torch = None
    HAVE_TORCH = False


# ---- timing -------------------------------------------------------------------------------------


def timeit(fn, warmup: int, reps: int) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if HAVE_TORCH:
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            gptcore.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            gptcore.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def to_torch(t):
    """A gptcore CUDA tensor viewed by torch (zero-copy, DLPack)."""
    return torch.from_dlpack(t)


# ---- benchmarks -------------------------------------------------------------------------------
# Each returns rows: (name, unit, gptcore value, torch value or None, target or None, kind)
# kind is "flops" or "bytes" (which ceiling the fraction refers to).


def bench_linear(rng, quick, W, R):
    N, K, M = (4096 if quick else 16384), 768, 3072
    x = gptcore.tensor(rand(rng, N, K), device="cuda", dtype="bfloat16")
    w = gptcore.tensor(rand(rng, M, K, scale=0.02), device="cuda", dtype="bfloat16")
    b = gptcore.tensor(rand(rng, M), device="cuda", dtype="bfloat16")
    flops = 2.0 * N * K * M
    rows = []
    t = timeit(lambda: ops.linear_forward(x, w, b), W, R)
    tt = None
    if HAVE_TORCH:
        xt, wt, bt = to_torch(x), to_torch(w), to_torch(b)
        tt = timeit(lambda: F.linear(xt, wt, bt), W, R)
    rows.append((f"linear fwd {N}x{K}->{M}", "TFLOP/s", flops / t / 1e12,
                 tt and flops / tt / 1e12, 450, "flops"))
    t = timeit(lambda: ops.linear_forward(x, w, b, gelu=True), W, R)
    tt = None
    if HAVE_TORCH:
        tt = timeit(lambda: F.gelu(F.linear(xt, wt, bt), approximate="tanh"), W, R)
    rows.append(("linear+GELU fwd, same", "TFLOP/s", flops / t / 1e12,
                 tt and flops / tt / 1e12, 430, "flops"))
    # backward: dx, dW, db (with the GELU derivative)
    out, pre = ops.linear_forward(x, w, b, gelu=True)
    dout = gptcore.tensor(rand(rng, N, M), device="cuda", dtype="bfloat16")
    dw = gptcore.zeros([M, K], dtype="float32", device="cuda")
    db = gptcore.zeros([M], dtype="float32", device="cuda")
    t = timeit(lambda: ops.linear_backward(dout, x, pre=pre, weight=w, dweight=dw, dbias=db), W, R)
    tt = None
    if HAVE_TORCH:
        xg = xt.detach().clone().requires_grad_(True)
        wg = wt.detach().clone().requires_grad_(True)
        bg = bt.detach().clone().requires_grad_(True)
        y = F.gelu(F.linear(xg, wg, bg), approximate="tanh")
        g = to_torch(dout)
        tt = timeit(lambda: torch.autograd.grad(y, (xg, wg, bg), g, retain_graph=True), W, R)
    rows.append(("linear+GELU bwd, same", "TFLOP/s", 2 * flops / t / 1e12,
                 tt and 2 * flops / tt / 1e12, None, "flops"))
    return rows


def bench_gemm_peak(rng, quick, W, R):
    n = 4096 if quick else 8192
    x = gptcore.tensor(rand(rng, n, n), device="cuda", dtype="bfloat16")
    w = gptcore.tensor(rand(rng, n, n, scale=0.01), device="cuda", dtype="bfloat16")
    flops = 2.0 * n ** 3
    t = timeit(lambda: ops.linear_forward(x, w), W, R)
    tt = None
    if HAVE_TORCH:
        xt, wt = to_torch(x), to_torch(w)
        tt = timeit(lambda: F.linear(xt, wt), W, R)
    return [(f"GEMM {n}^3 bf16", "TFLOP/s", flops / t / 1e12, tt and flops / tt / 1e12, None,
             "flops")]


def bench_attention(rng, quick, W, R):
    B, H, T, D = (4 if quick else 16), 12, 1024, 64
    C = H * D
    qkv = gptcore.tensor(rand(rng, B, T, 3 * C), device="cuda", dtype="bfloat16")
    flops_f = 4.0 * B * H * T * T * D / 2  # causal: half the score matrix
    t = timeit(lambda: ops.attention_forward(qkv, H), W, R)
    out, lse = ops.attention_forward(qkv, H)
    dout = gptcore.tensor(rand(rng, B, T, C), device="cuda", dtype="bfloat16")
    tb = timeit(lambda: ops.attention_backward(dout, qkv, out, lse, H), W, R)
    tt = ttb = None
    if HAVE_TORCH:
        q, k, v = to_torch(qkv).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        tt = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), W, R)
        qg, kg, vg = (a.detach().clone().requires_grad_(True) for a in (q, k, v))
        y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        g = torch.randn_like(y)
        ttb = timeit(lambda: torch.autograd.grad(y, (qg, kg, vg), g, retain_graph=True), W, R)
    flops_b = 2.5 * flops_f
    return [
        (f"attention fwd B{B} H{H} T{T} D{D}", "TFLOP/s", flops_f / t / 1e12,
         tt and flops_f / tt / 1e12, 250, "flops"),
        ("attention bwd, same", "TFLOP/s", flops_b / tb / 1e12, ttb and flops_b / ttb / 1e12, 200,
         "flops"),
    ]


def bench_dropout(rng, quick, W, R):
    """Dropout (forward; backward is the same kernel) on a (B*T, 4C) bf16 activation in GB/s, and
    attention with attn_pdrop = 0.1 fused in, beside PyTorch's dropout and SDPA with dropout_p."""
    B, H, T, D = (4 if quick else 16), 12, 1024, 64
    C = H * D
    x = gptcore.tensor(rand(rng, B * T, 4 * C), device="cuda", dtype="bfloat16")
    nbytes = 2 * x.nbytes
    t = timeit(lambda: ops.dropout_forward(x, 0.1, 1, 2), W, R)
    tt = None
    if HAVE_TORCH:
        xt = to_torch(x)
        tt = timeit(lambda: F.dropout(xt, 0.1, training=True), W, R)
    rows = [(f"dropout 0.1 ({B * T}, {4 * C}) bf16", "GB/s", nbytes / t / 1e9,
             tt and nbytes / tt / 1e9, None, "bytes")]
    qkv = gptcore.tensor(rand(rng, B, T, 3 * C), device="cuda", dtype="bfloat16")
    kw = dict(dropout_p=0.1, seed=1, stream=2)
    flops_f = 4.0 * B * H * T * T * D / 2
    t = timeit(lambda: ops.attention_forward(qkv, H, **kw), W, R)
    out, lse = ops.attention_forward(qkv, H, **kw)
    dout = gptcore.tensor(rand(rng, B, T, C), device="cuda", dtype="bfloat16")
    tb = timeit(lambda: ops.attention_backward(dout, qkv, out, lse, H, **kw), W, R)
    tt = ttb = None
    if HAVE_TORCH:
        q, k, v = to_torch(qkv).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, dropout_p=0.1,  # noqa: E731
                                                              is_causal=True)
        tt = timeit(lambda: sdpa(q, k, v), W, R)
        qg, kg, vg = (a.detach().clone().requires_grad_(True) for a in (q, k, v))
        y = sdpa(qg, kg, vg)
        g = torch.randn_like(y)
        ttb = timeit(lambda: torch.autograd.grad(y, (qg, kg, vg), g, retain_graph=True), W, R)
    flops_b = 2.5 * flops_f
    rows += [
        (f"attention dropout 0.1 fwd B{B} H{H} T{T} D{D}", "TFLOP/s", flops_f / t / 1e12,
         tt and flops_f / tt / 1e12, None, "flops"),
        ("attention dropout 0.1 bwd, same", "TFLOP/s", flops_b / tb / 1e12,
         ttb and flops_b / ttb / 1e12, None, "flops"),
    ]
    return rows


def bench_layernorm(rng, quick, W, R):
    N, C = (4096 if quick else 16384), 768
    x = gptcore.tensor(rand(rng, N, C), device="cuda", dtype="bfloat16")
    w = gptcore.tensor(rand(rng, C), device="cuda", dtype="bfloat16")
    b = gptcore.tensor(rand(rng, C), device="cuda", dtype="bfloat16")
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    dout = gptcore.tensor(rand(rng, N, C), device="cuda", dtype="bfloat16")
    dw = gptcore.zeros([C], dtype="float32", device="cuda")
    db = gptcore.zeros([C], dtype="float32", device="cuda")
    bytes_f = 2 * N * C * 2 + N * 8          # x in, out, mean and rstd out
    bytes_b = 3 * N * C * 2 + N * 8          # x, dout in, dx out, mean and rstd in
    t = timeit(lambda: ops.layernorm_forward(x, w, b), W, R)
    tb = timeit(lambda: ops.layernorm_backward(dout, x, mean, rstd, weight=w, dweight=dw,
                                                   dbias=db), W, R)
    tt = ttb = None
    if HAVE_TORCH:
        xt, wt, bt = to_torch(x), to_torch(w), to_torch(b)
        tt = timeit(lambda: F.layer_norm(xt, (C,), wt, bt, 1e-5), W, R)
        xg, wg, bg = (a.detach().clone().requires_grad_(True) for a in (xt, wt, bt))
        y = F.layer_norm(xg, (C,), wg, bg, 1e-5)
        g = to_torch(dout)
        ttb = timeit(lambda: torch.autograd.grad(y, (xg, wg, bg), g, retain_graph=True), W, R)
    return [
        (f"LayerNorm fwd {N}x{C}", "GB/s", bytes_f / t / 1e9, tt and bytes_f / tt / 1e9, 2000,
         "bytes"),
        ("LayerNorm bwd, same", "GB/s", bytes_b / tb / 1e9, ttb and bytes_b / ttb / 1e9, 1500,
         "bytes"),
    ]


def bench_cross_entropy(rng, quick, W, R):
    N, V, Vp = (4096 if quick else 16384), 50257, 50304
    logits_np = rand(rng, N, Vp)
    tg_np = rng.integers(0, V, size=N).astype(np.int64)
    logits = gptcore.tensor(logits_np, device="cuda", dtype="bfloat16")
    tg = gptcore.tensor(tg_np, device="cuda")
    nbytes = 2 * N * Vp * 2  # read the logits, write dlogits (in place)
    t = timeit(lambda: ops.cross_entropy_forward_backward(logits, tg, V, grad_scale=1.0 / N,
                                                          inplace=True), W, R)
    tt = None
    if HAVE_TORCH:
        lt = to_torch(gptcore.tensor(logits_np, device="cuda", dtype="bfloat16"))[:, :V]
        lt = lt.contiguous().requires_grad_(True)
        tgt = to_torch(tg)

        def torch_ce():
            loss = F.cross_entropy(lt, tgt)
            torch.autograd.grad(loss, lt)

        tt = timeit(torch_ce, W, R)
    return [(f"cross-entropy fwd+bwd {N}x{V}", "GB/s", nbytes / t / 1e9, tt and nbytes / tt / 1e9,
             2000, "bytes")]


def gpt2_param_shapes():
    C, L, V, T = 768, 12, 50304, 1024
    shapes = [(V, C), (T, C)]
    for _ in range(L):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C),
                   (4 * C,), (C, 4 * C), (C,)]
    return shapes + [(C,), (C,)]


def bench_adamw(rng, quick, W, R):
    shapes = gpt2_param_shapes()
    if quick:
        shapes = shapes[:14]
    n = sum(math.prod(s) for s in shapes)
    P = [gptcore.tensor(rand(rng, *s, scale=0.02), device="cuda") for s in shapes]
    G = [gptcore.tensor(rand(rng, *s, scale=0.01), device="cuda") for s in shapes]
    M = [gptcore.zeros(list(s), device="cuda") for s in shapes]
    Vv = [gptcore.zeros(list(s), device="cuda") for s in shapes]
    decay = [len(s) == 2 for s in shapes]
    nbytes = 28 * n  # read p, g, m, v; write p, m, v (fp32)
    step = [0]

    def ours():
        step[0] += 1
        ops.adamw_step(P, G, M, Vv, lr=1e-4, step=step[0], weight_decay=0.1, decay=decay)

    t = timeit(ours, W, R)
    tt = None
    if HAVE_TORCH:
        tp = [torch.nn.Parameter(to_torch(p).clone()) for p in P]
        for p, g in zip(tp, G):
            p.grad = to_torch(g).clone()
        opt = torch.optim.AdamW(tp, lr=1e-4, weight_decay=0.1, fused=True)
        tt = timeit(opt.step, W, R)
    return [(f"AdamW {n / 1e6:.0f}M fp32 params", "GB/s", nbytes / t / 1e9,
             tt and nbytes / tt / 1e9, 2600, "bytes")]


def bench_copy(rng, quick, W, R):
    n = (64 if quick else 512) << 20  # floats
    src = gptcore.zeros([n], dtype="float32", device="cuda")
    dst = gptcore.zeros([n], dtype="float32", device="cuda")
    t = timeit(lambda: dst.copy_(src), W, R)
    return [(f"copy {4 * n >> 20} MiB d2d", "GB/s", 2 * 4 * n / t / 1e9, None, None, "bytes")]


def bench_training(rng, quick, W, R):
    GPT, AdamW, GPTConfig = (getattr(gptcore, n, None) for n in ("GPT", "AdamW", "GPTConfig"))
    if GPT is None or AdamW is None or GPTConfig is None:
        return []
    B, T = (4 if quick else 16), 1024
    cfg = GPTConfig.preset("gpt2") if hasattr(GPTConfig, "preset") else GPTConfig()
    model = GPT(cfg, device="cuda", dtype="bfloat16", seed=0)
    opt = AdamW(model, lr=1e-4)
    data = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
    x, y = data[:, :-1], data[:, 1:]

    def step():
        model.zero_grad()
        model.forward(x, y)
        model.backward()
        opt.step(grad_clip=1.0)

    t = timeit(step, 2, max(3, R // 4))
    return [(f"GPT-2 124M train step B{B} T{T}", "Ktok/s", B * T / t / 1e3, None, 450, "")]


def bench_sample_tokens(rng, quick, W, R):
    """Device-side next-token sampling (temperature + top-p) on GPT-2 logits, per call; the torch
    figure is the usual sort / cumsum / multinomial nucleus sampler. Lower is better."""
    V, Vp = 50257, 50304
    rows = []
    for B in (1, 8):
        x_np = rand(rng, B, Vp, scale=3.0)
        x = gptcore.tensor(x_np, device="cuda", dtype="bfloat16")
        counter = gptcore.zeros([B], dtype="int64", device="cuda")
        out = gptcore.empty([B], dtype="int32", device="cuda")
        t = timeit(lambda: ops.sample_tokens(x, vocab_size=V, temperature=0.8, top_p=0.95,
                                             counter=counter, out=out), W, R)
        tt = None
        if HAVE_TORCH:
            xt = to_torch(x)[:, :V]

            def torch_sample():
                probs = torch.softmax(xt.float() / 0.8, dim=-1)
                sp, si = torch.sort(probs, dim=-1, descending=True)
                cum = torch.cumsum(sp, dim=-1)
                sp = sp.masked_fill(cum - sp >= 0.95, 0.0)
                return si.gather(-1, torch.multinomial(sp, 1))

            tt = timeit(torch_sample, W, R)
        rows.append((f"sample_tokens top_p B{B} V{V} (lower=better)", "us", t * 1e6,
                     tt and tt * 1e6, None, ""))
    return rows


def bench_generate(rng, quick, W, R):
    """GPT-2 124M bf16 decode throughput of gptcore.generate() (greedy, prompt 16, every step a
    replayed CUDA graph: forward + device sampling) beside the plain PyTorch KV-cache loop, at
    batch 1 and 32 (the issue's targets: 3,000 and 40,000 tokens/s). Uses bench_generate.py."""
    import bench_generate as bg

    model = bg.make_model("cuda")
    steps = 32 if quick else 128
    rows = []
    for B in (1, 32):
        ours = bg.rate(bg.gptcore_generate_fn(model, B, steps), B * steps, "cuda", rounds=3)
        theirs = None
        if HAVE_TORCH:
            theirs = bg.rate(bg.torch_stepper(model, B, steps, "cuda"), B * steps, "cuda", rounds=3)
        rows.append((f"generate() GPT-2 124M bf16 B{B}", "tok/s", ours, theirs,
                     bg.TARGETS[("cuda", B)], ""))
    return rows


BENCHES = [bench_copy, bench_gemm_peak, bench_linear, bench_attention, bench_dropout, bench_layernorm,
           bench_cross_entropy, bench_adamw, bench_training, bench_sample_tokens, bench_generate]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--only", help="comma-separated substrings of benchmark names to run")
    args = ap.parse_args(argv)
    if not gptcore.cuda.is_available():
        print("bench_gpu: no CUDA GPU available (gptcore.cuda.is_available() is False); nothing to do")
        return 0
    W, R = (3, 10) if args.quick else (10, 50)
    if HAVE_TORCH:
        gptcore.cuda.set_stream(torch.cuda.current_stream().cuda_stream)
    rng = np.random.default_rng(0)
    rows, failures = [], []
    for bench in BENCHES:
        if args.only and not any(s in bench.__name__ for s in args.only.split(",")):
            continue
        try:
            rows += bench(rng, args.quick, W, R)
        except Exception as e:  # one failing benchmark must not hide the others
            failures.append(f"{bench.__name__}: {type(e).__name__}: {e}")
        gptcore.cuda.empty_cache()
        if HAVE_TORCH:
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if HAVE_TORCH else "cuda:0"
    print(f"\ngptcore GPU benchmarks on {dev} ({'torch ' + torch.__version__ if HAVE_TORCH else 'no torch'})")
    hdr = f"{'op':<40} {'unit':>8} {'gptcore':>9} {'torch':>9} {'target':>7} {'of peak':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, unit, ours, theirs, target, kind in rows:
        frac = ""
        if kind == "flops":
            frac = f"{ours * 1e12 / PEAK_FLOPS:7.0%}"
        elif kind == "bytes":
            frac = f"{ours * 1e9 / PEAK_BW:7.0%}"
        th = f"{theirs:9.1f}" if theirs else f"{'-':>9}"
        tg = f"{target:7d}" if target else f"{'-':>7}"
        print(f"{name:<40} {unit:>8} {ours:9.1f} {th} {tg} {frac:>8}")
    print("(of peak: fraction of 3.0 TB/s for GB/s rows, of 736 TFLOP/s for TFLOP/s rows)")
    for f in failures:
        print("FAILED", f)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "rows": rows, "failures": failures}, fh, indent=1)
    return 1 if failures else 0


def test_bench_gpu_quick():
    """`pytest benchmarks/bench_gpu.py -s` prints the quick table (skipped without a GPU)."""
    import pytest

    if not gptcore.cuda.is_available():
        pytest.skip("no CUDA GPU available")
    assert main(["--quick"]) == 0


if __name__ == "__main__":
    sys.exit(main())
