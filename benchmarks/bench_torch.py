"""gptcore's kernels inside PyTorch (gptcore.torch) beside plain PyTorch, side by side in one run.

* ``step``: a GPT-2 training step (zero_grad, forward with the mean cross-entropy, backward,
  ``clip_grad_norm_(1.0)``, AdamW) of :class:`gptcore.torch.GPT` with
  :class:`gptcore.torch.AdamW`, against the same module with a plain-PyTorch forward
  (``F.embedding``, ``F.layer_norm``, ``F.linear``, ``F.scaled_dot_product_attention``,
  ``F.gelu(approximate='tanh')``, ``F.cross_entropy``: nanoGPT's model) and
  ``torch.optim.AdamW`` (its default foreach implementation). Same weights, same batch, same
  threads; both start from the same loss (checked). Eager mode, float32.
* ``ops``: forward + backward of each gptcore.torch op against its PyTorch counterpart at the
  shapes one GPT-2 step uses (B x T tokens, C = 768, 12 heads, vocabulary 50257), and one
  optimiser step over 124M parameters.
* On a CUDA machine (both ``torch.cuda`` and ``gptcore.cuda`` available) the ops also run on the
  GPU in float32 and bfloat16 against SDPA and ``torch.compile``'d layer_norm / cross_entropy,
  timed with CUDA events. (Written for the GPU machine; not yet run on one.)

Timings are medians over interleaved rounds after a warm-up (each side runs once per round,
alternating, so background load hits both alike). Ratios are PyTorch time / gptcore time:
above 1 means gptcore.torch is faster.

    python benchmarks/bench_torch.py [--shape gpt2|small] [-B 4] [-T 64] [--rounds 5]
                                     [--threads N] [--only step|ops]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import gptcore

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the torch extra is absent: nothing to compare
    torch = None

SHAPES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768),
          "small": dict(n_layer=6, n_head=6, n_embd=384)}


def _plain_gpt_class():
    from gptcore.torch import GPT

    class PlainGPT(GPT):
        """gptcore.torch.GPT's parameters, forward written with torch.nn.functional only."""

        def forward(self, idx, targets=None, ignore_index=-1):
            cfg = self.config
            B, T = idx.shape
            C, H = cfg.n_embd, cfg.n_head
            x = F.embedding(idx, self.wte) + self.wpe[:T]
            for b in self.h:
                h = F.layer_norm(x, (C,), b.ln_1.weight, b.ln_1.bias, cfg.ln_eps)
                q, k, v = (t.view(B, T, H, C // H).transpose(1, 2)
                           for t in F.linear(h, b.attn.c_attn.weight, b.attn.c_attn.bias)
                           .split(C, -1))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                a = a.transpose(1, 2).reshape(B, T, C)
                x = x + F.linear(a, b.attn.c_proj.weight, b.attn.c_proj.bias)
                h = F.layer_norm(x, (C,), b.ln_2.weight, b.ln_2.bias, cfg.ln_eps)
                m = F.gelu(F.linear(h, b.mlp.c_fc.weight, b.mlp.c_fc.bias), approximate="tanh")
                x = x + F.linear(m, b.mlp.c_proj.weight, b.mlp.c_proj.bias)
            h = F.layer_norm(x, (C,), self.ln_f.weight, self.ln_f.bias, cfg.ln_eps)
            logits = F.linear(h, self.wte)
            loss = None if targets is None else F.cross_entropy(
                logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=ignore_index)
            return logits, loss

    return PlainGPT


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """name -> list of wall times of fn(), the functions alternating within each round."""
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def _row(name, t_ours, t_torch, unit="ms", scale=1e3):
    mo, mt = statistics.median(t_ours), statistics.median(t_torch)
    print(f"| {name} | {mo * scale:.2f} {unit} | {mt * scale:.2f} {unit} | {mt / mo:.2f}x |")


# ---- the training step ----------------------------------------------------------------------------


def bench_step(shape: str, B: int, T: int, rounds: int) -> None:
    from gptcore.torch import GPT, AdamW

    cfg = gptcore.GPTConfig(**SHAPES[shape], block_size=1024, vocab_size=50257)
    ours = GPT(cfg, seed=0)
    plain = _plain_gpt_class()(cfg)
    plain.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    with torch.no_grad():
        l_ours, l_plain = ours(x, y)[1].item(), plain(x, y)[1].item()
    assert abs(l_ours - l_plain) < 1e-4, (l_ours, l_plain)
    opt = AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.1)
    # the same module again, clipping folded into the optimiser (AdamW's max_grad_norm)
    ours2 = GPT(cfg)
    ours2.load_state_dict(ours.state_dict())
    opt2 = AdamW(ours2.parameters(), lr=1e-4, weight_decay=0.1, max_grad_norm=1.0)

    def step(model, o, clip=True):
        def run():
            o.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            o.step()
        return run

    # gptcore's own model and optimiser (no PyTorch at all): what the integration costs
    native = gptcore.GPT(cfg, seed=0)
    native.load_state_dict({k: v.detach().numpy() for k, v in ours.state_dict().items()})
    opt_native = gptcore.optim.AdamW(native, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
    xn, yn = x.numpy(), y.numpy()

    def native_step():
        native.zero_grad()
        native.forward(xn, yn)
        native.backward()
        opt_native.step(grad_clip=1.0)

    variants = {
        "plain PyTorch (F.*, clip_grad_norm_, torch.optim.AdamW)": step(plain, opt_plain),
        "gptcore.torch.GPT + clip_grad_norm_ + gptcore.torch.AdamW": step(ours, opt),
        "gptcore.torch.GPT + gptcore.torch.AdamW(max_grad_norm=1)": step(ours2, opt2, False),
        "gptcore.GPT + gptcore.optim.AdamW (no PyTorch)": native_step,
    }
    times = interleaved(variants, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[next(iter(variants))]
    print(f"\nGPT-2 training step ({shape}: {cfg.n_layer} layers x {cfg.n_embd}, vocab 50257), "
          f"B={B}, T={T}, fp32, forward + backward + clip at 1.0 + AdamW; first loss "
          f"{l_ours:.5f} (gptcore.torch) vs {l_plain:.5f} (plain); {rounds} rounds\n")
    print("| step | median | min | speed-up vs plain PyTorch |\n|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.3f} s | {min(t):.3f} s | {base / med[name]:.2f}x |")


# ---- the ops --------------------------------------------------------------------------------------


def _fwd_bwd(fn, inputs):
    """forward + backward of fn(*inputs) with a fixed upstream gradient."""
    def run():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out) if out.dim() else None)
    return run


def op_cases(B: int, T: int, device: str, dtype):
    """(name, gptcore.torch fn, PyTorch fn, inputs) at one GPT-2 (124M) step's shapes."""
    import gptcore.torch as gt

    C, H, V = 768, 12, 50257
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, grad=True, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype) \
            .requires_grad_(grad)

    def sdpa(qkv, n_head):
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, -1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2) \
            .reshape(B, T, C)

    idx = torch.randint(0, V, (B, T), generator=g, device=device)
    targets = torch.randint(0, V, (B * T,), generator=g, device=device)
    w, b = r(C), r(C)
    return [
        ("attention (causal, 12 heads)", lambda q: gt.attention(q, H), lambda q: sdpa(q, H),
         (r(B, T, 3 * C),)),
        ("layer_norm", gt.layer_norm, lambda x, w, b: F.layer_norm(x, (C,), w, b),
         (r(B, T, C), w, b)),
        ("residual + layer_norm", lambda x, s, w, b: gt.residual_layer_norm(x, s, w, b)[1],
         lambda x, s, w, b: F.layer_norm(x + s, (C,), w, b), (r(B, T, C), r(B, T, C), w, b)),
        ("linear 768->2304 (c_attn)", gt.linear, F.linear,
         (r(B, T, C), r(3 * C, C, scale=0.02), r(3 * C))),
        ("linear + GELU 768->3072 (c_fc)", gt.linear_gelu,
         lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
         (r(B, T, C), r(4 * C, C, scale=0.02), r(4 * C))),
        ("cross_entropy (vocab 50257)", lambda lg: gt.cross_entropy(lg, targets),
         lambda lg: F.cross_entropy(lg.float(), targets), (r(B * T, V),)),
        ("LM head + cross_entropy (fused linear_cross_entropy)",
         lambda h, wte: gt.linear_cross_entropy(h, wte, targets),
         lambda h, wte: F.cross_entropy(F.linear(h, wte).float(), targets),
         (r(B * T, C), r(V, C, scale=0.02))),
        ("embedding (wte + wpe)", lambda wte, wpe: gt.embedding(idx, wte, wpe),
         lambda wte, wpe: F.embedding(idx, wte) + wpe[:T], (r(V, C), r(1024, C))),
    ]


def bench_ops(B: int, T: int, rounds: int) -> None:
    print(f"\nOps, forward + backward, CPU fp32, GPT-2 (124M) shapes B={B}, T={T}, {rounds} rounds"
          "\n\n| op | gptcore.torch | PyTorch | speed-up |\n|---|---:|---:|---:|")
    for name, ours, ref, inputs in op_cases(B, T, "cpu", torch.float32):
        times = interleaved({"ours": _fwd_bwd(ours, inputs), "ref": _fwd_bwd(ref, inputs)},
                            rounds)
        _row(name, times["ours"], times["ref"])
    bench_adamw(rounds)


def bench_adamw(rounds: int) -> None:
    from gptcore.torch import AdamW

    shapes = SHAPES["gpt2"]
    C, L = shapes["n_embd"], shapes["n_layer"]
    sizes = [(50257, C), (1024, C)] + [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L
    params = {k: [torch.randn(s).requires_grad_() for s in sizes] for k in ("ours", "ref")}
    for group in params.values():
        for p in group:
            p.grad = torch.randn(p.shape) * 1e-3
    ours = AdamW(params["ours"], lr=1e-4, weight_decay=0.1)
    ref = torch.optim.AdamW(params["ref"], lr=1e-4, weight_decay=0.1)
    times = interleaved({"ours": ours.step, "ref": ref.step}, rounds)
    n = sum(p.numel() for p in params["ours"]) / 1e6
    _row(f"AdamW step ({n:.0f}M params; torch: foreach)", times["ours"], times["ref"])


# ---- CUDA ---------------------------------------------------------------------------------------


def bench_ops_cuda(B: int, T: int, rounds: int) -> None:
    """The ops on the GPU, fp32 and bf16, against SDPA / eager / torch.compile'd PyTorch."""
    def cuda_time(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(rounds):
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / reps / 1e3)
        return times

    for dtype in (torch.float32, torch.bfloat16):
        print(f"\nOps on CUDA ({torch.cuda.get_device_name()}), {dtype}, forward + backward, "
              f"B={B}, T={T}\n\n| op | gptcore.torch | PyTorch eager | torch.compile | "
              "speed-up vs eager | vs compile |\n|---|---:|---:|---:|---:|---:|")
        for name, ours, ref, inputs in op_cases(B, T, "cuda", dtype):
            if name.startswith(("embedding", "linear")):
                continue  # the GPU list: attention, LayerNorm, cross-entropy
            t_ours = cuda_time(_fwd_bwd(ours, inputs))
            t_ref = cuda_time(_fwd_bwd(ref, inputs))
            t_comp = cuda_time(_fwd_bwd(torch.compile(ref), inputs))
            mo, me, mc = (statistics.median(t) for t in (t_ours, t_ref, t_comp))
            print(f"| {name} | {mo * 1e3:.3f} ms | {me * 1e3:.3f} ms | {mc * 1e3:.3f} ms | "
                  f"{me / mo:.2f}x | {mc / mo:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["step", "ops"], default=None)
    args = ap.parse_args()
    if torch is None:
        raise SystemExit("bench_torch.py needs PyTorch (pip install 'gptcore[torch]')")
    if args.threads:
        torch.set_num_threads(args.threads)
        gptcore.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{gptcore.get_num_threads()} gptcore threads, load average {os.getloadavg()}")
    if args.only in (None, "step"):
        bench_step(args.shape, args.B, args.T, args.rounds)
    if args.only in (None, "ops"):
        bench_ops(args.B, args.T, args.rounds)
        if torch.cuda.is_available() and gptcore.cuda.is_available():
            bench_ops_cuda(args.B, args.T, args.rounds)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
