"""gptcore.torch.AdamW against torch.optim.AdamW: the same parameters after every step, state
dicts that load both ways."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gptcore.torch import AdamW


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 6), (1,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _groups(params, **kw):
    # two groups with different settings, as GPT training decays only the matrices
    return [dict(params=[params[0], params[2]], weight_decay=0.1, **kw),
            dict(params=[params[1], params[3]], weight_decay=0.0, lr=3e-3)]


def _set_grads(params, gen, step):
    for i, p in enumerate(params):
        # parameter 3 gets no gradient every third step: it falls behind in step count
        p.grad = None if (i == 3 and step % 3 == 0) else torch.randn(p.shape, generator=gen)


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.8, 0.95), 1e-6)])
def test_matches_torch_adamw_step_for_step(betas, eps):
    ours, ref = _params(0), _params(0)
    opt = AdamW(_groups(ours), lr=1e-2, betas=betas, eps=eps)
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2, betas=betas, eps=eps)
    gen, gen_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(25):
        _set_grads(ours, gen, step)
        _set_grads(ref, gen_ref, step)
        opt.step()
        opt_ref.step()
        assert _max_diff(ours, ref) < 2e-6, f"step {step}"
    moved = max((p - q).abs().max().item() for p, q in zip(ours, _params(0)))
    assert moved > 0.05  # the parameters did move


def test_max_grad_norm_equals_clip_grad_norm_then_step():
    ours, ref = _params(5), _params(5)
    opt = AdamW(_groups(ours), lr=1e-2, max_grad_norm=2.0)
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2)
    gen, gen_ref = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    clipped = 0
    for step in range(10):
        _set_grads(ours, gen, step)
        _set_grads(ref, gen_ref, step)
        for p in ours + ref:  # large enough that some steps clip and some do not
            if p.grad is not None:
                p.grad *= 0.4 * (step % 3)
        norm = torch.nn.utils.clip_grad_norm_([p for p in ref if p.grad is not None], 2.0)
        clipped += norm.item() > 2.0
        opt.step()
        opt_ref.step()
        assert abs(opt.last_grad_norm - norm.item()) < 1e-4 * norm.item() + 1e-6
        assert _max_diff(ours, ref) < 2e-6, f"step {step}"
    assert 0 < clipped < 10


def test_state_dict_loads_both_ways():
    ours, ref = _params(2), _params(2)
    opt = AdamW(_groups(ours), lr=1e-2)
    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2)
    gen, gen_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(4):
        _set_grads(ours, gen, step)
        _set_grads(ref, gen_ref, step)
        opt.step()
        opt_ref.step()
    sd, sd_ref = opt.state_dict(), opt_ref.state_dict()
    assert sd["param_groups"] == sd_ref["param_groups"]
    for pid, s in sd_ref["state"].items():
        assert set(sd["state"][pid]) == set(s)
        for k, v in s.items():
            assert torch.allclose(sd["state"][pid][k], v, atol=1e-6), (pid, k)
    # swap: torch continues from our state and we from torch's, in step with each other
    a, b = _params(2), _params(2)
    with torch.no_grad():
        for x, y, p in zip(a, b, ref):
            x.copy_(p)
            y.copy_(p)
    opt_a = torch.optim.AdamW(_groups(a), lr=1e-2)
    opt_a.load_state_dict(sd)
    opt_b = AdamW(_groups(b), lr=1e-2)
    opt_b.load_state_dict(sd_ref)
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for step in range(4, 8):
        _set_grads(a, ga, step)
        _set_grads(b, gb, step)
        opt_a.step()
        opt_b.step()
        assert _max_diff(a, b) < 2e-6, f"step {step}"


def test_unsupported_options_and_bad_values_raise():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW(p, amsgrad=True)
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=float("nan"))
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW(p, max_grad_norm=0.0)
