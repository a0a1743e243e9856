"""gptcore.torch on CUDA (``gpu``: skipped without a GPU): values and gradients against PyTorch
in float32 and bfloat16, work ordered on PyTorch's current (non-default) stream, AdamW with
bf16 parameters. Not yet run on a GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gptcore.torch as gt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _cases(dtype):
    B, T, H, C, V = 2, 37, 4, 64, 1000
    dev = "cuda"

    def r(*s):
        return torch.randn(s, device=dev).to(dtype).requires_grad_()

    def sdpa(qkv):
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, -1))
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True) \
            .transpose(1, 2).reshape(B, T, C)

    t = torch.randint(0, V, (B * T,), device=dev)
    t[::5] = -100
    w, b = r(C), r(C)
    return [
        ("attention", lambda q: gt.attention(q, H), sdpa, (r(B, T, 3 * C),)),
        ("layer_norm", gt.layer_norm,
         lambda x, w, b: F.layer_norm(x.float(), (C,), w.float(), b.float()), (r(B, T, C), w, b)),
        ("linear_gelu", gt.linear_gelu,
         lambda x, w: F.gelu(F.linear(x.float(), w.float()), approximate="tanh"),
         (r(B, T, C), r(4 * C, C))),
        ("cross_entropy", lambda lg: gt.cross_entropy(lg, t),
         lambda lg: F.cross_entropy(lg.float(), t), (r(B * T, V),)),
        ("embedding", lambda wte, wpe: gt.embedding(t[:T].clamp_min(0).view(1, T), wte, wpe),
         lambda wte, wpe: F.embedding(t[:T].clamp_min(0).view(1, T), wte.float()) + wpe[:T].float(),
         (r(V, C), r(64, C))),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_match_torch_on_cuda(dtype):
    for name, ours, ref, inputs in _cases(dtype):
        out, want = ours(*inputs), ref(*inputs)
        assert _rel(out, want) <= TOL[dtype], name
        g = torch.randn_like(want)
        got = torch.autograd.grad(out, inputs, g.to(out.dtype) if out.dim() else None)
        exp = torch.autograd.grad(want, inputs, g if want.dim() else None)
        for a, e in zip(got, exp):
            assert a.dtype == e.dtype and _rel(a, e) <= 2 * TOL[dtype], name


def test_runs_on_torchs_current_stream():
    """Inputs written on a side stream and consumed there by a gptcore op, then read back on
    that stream: the result is right only if gptcore launched on the same stream."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(64, 1024, device="cuda")
        x.mul_(2.0)  # queued on s
        out = gt.layer_norm(x, torch.ones(1024, device="cuda"), torch.zeros(1024, device="cuda"))
        want = F.layer_norm(x, (1024,))
    s.synchronize()
    assert _rel(out, want) < 1e-5


def test_adamw_bf16_params_track_fp32_torch():
    ref = [torch.randn(256, 64, device="cuda", requires_grad=True)]
    ours = [ref[0].detach().to(torch.bfloat16).requires_grad_()]
    opt, opt_ref = gt.AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    for _ in range(10):
        g = torch.randn(256, 64, device="cuda")
        ref[0].grad, ours[0].grad = g, g.to(torch.bfloat16)
        opt.step()
        opt_ref.step()
    assert opt.state[ours[0]]["master"].dtype == torch.float32
    assert _rel(opt.state[ours[0]]["master"], ref[0].detach()) < 1e-2
