"""Dropout in the model: off in eval mode and at p = 0, reproducible by seed and step, masks
regenerated in backward (checked by finite differences with the masks held fixed), resumable."""

from __future__ import annotations

import numpy as np
import pytest

from gptcore import reference as R
from gptcore.models import GPT, GPTConfig

P_ALL = dict(embd_pdrop=0.25, attn_pdrop=0.25, resid_pdrop=0.25)


def tiny(prenorm=True, **kw):
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=29, prenorm=prenorm,
                attn_window=[None, 4])
    base.update(kw)
    return GPTConfig(**base)


def batch(rng, cfg, B=3, T=10):
    return (rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T)))


def grads_of(model, idx, targets):
    model.zero_grad()
    loss = model.forward(idx, targets)
    model.backward()
    return loss, {k: np.array(g.numpy()) for k, g in model.grads().items()}


@pytest.mark.parametrize("prenorm", [True, False])
def test_eval_mode_and_zero_probability_are_exactly_no_dropout(rng, prenorm):
    idx, targets = batch(rng, tiny())
    plain = GPT(tiny(prenorm), seed=4)
    with_p = GPT(tiny(prenorm, **P_ALL), seed=4)
    loss0, g0 = grads_of(plain, idx, targets)  # p = 0 in training mode: no dropout op runs
    loss1, g1 = grads_of(with_p.eval(), idx, targets)
    assert loss0 == loss1
    for k in g0:
        assert np.array_equal(g0[k], g1[k]), k
    assert with_p.dropout_step == 0  # eval forwards draw no masks
    loss2, _ = grads_of(with_p.train(), idx, targets)
    assert loss2 != loss0 and with_p.dropout_step == 1


def test_dropout_is_reproducible_by_seed_and_step(rng):
    cfg = tiny(**P_ALL)
    idx, targets = batch(rng, cfg)
    a, b = GPT(cfg, seed=7), GPT(cfg, seed=7)
    la, ga = grads_of(a, idx, targets)
    lb, gb = grads_of(b, idx, targets)
    assert la == lb and all(np.array_equal(ga[k], gb[k]) for k in ga)
    second = a.forward(idx, targets, grad=False)  # the next step draws other masks
    assert second != la
    a.dropout_step = 0  # back to the first step's masks
    assert a.forward(idx, targets, grad=False) == la
    c = GPT(cfg, seed=8)
    c.load_state_dict(a.state_dict())
    c.dropout_step = 0
    assert c.forward(idx, targets, grad=False) != la  # another seed, other masks


def test_embedding_dropout_is_the_op_with_the_models_stream(rng):
    """White-box: with only embd_pdrop, the first block sees reference.dropout_forward of the
    embedding under the documented stream (step << 12 | n_layer * 4)."""
    cfg = tiny(embd_pdrop=0.5, n_layer=1, attn_window=None)
    model = GPT(cfg, seed=12)
    idx, _ = batch(rng, cfg, B=2, T=7)
    model.hidden_states(idx)
    ws = model._acts
    P = {k: np.asarray(v.numpy(), np.float64) for k, v in model.parameters().items()}
    emb = R.embedding_forward(idx, P["wte"], P["wpe"])
    want = R.dropout_forward(emb, 0.5, 12, (0 << 12) | (cfg.n_layer * 4))
    assert np.allclose(ws.x0.numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prenorm", [True, False])
def test_gradient_with_dropout_matches_finite_differences(rng, prenorm):
    """Backward regenerates every mask (embedding, attention probabilities, residuals): the
    gradient's directional derivative equals central differences of the loss, the masks held
    fixed by replaying the same dropout step."""
    cfg = tiny(prenorm, **P_ALL)
    model = GPT(cfg, seed=int(rng.integers(1 << 30)))
    idx, targets = batch(rng, cfg)
    loss, g = grads_of(model, idx, targets)
    base = model.state_dict()
    # a random direction plus a gradient-aligned part, so the slope stands well above the
    # float32 resolution of the loss
    gs = {k: g[k][: v.shape[0]] for k, v in base.items()}
    rms = np.sqrt(np.mean(np.concatenate([x.ravel() ** 2 for x in gs.values()])))
    direction = {k: rng.randn(*v.shape, scale=1e-4) + 1e-5 * gs[k] / rms for k, v in base.items()}
    slope = sum(float(np.sum(g[k][: base[k].shape[0]] * direction[k])) for k in base)

    def loss_at(t):
        model.load_state_dict({k: base[k] + t * direction[k] for k in base})
        model.dropout_step = 0  # the masks of the gradient's forward
        return model.forward(idx, targets, grad=False)

    assert loss_at(0.0) == loss
    fd = (loss_at(1.0) - loss_at(-1.0)) / 2.0
    assert abs(fd - slope) < 5e-3 * abs(slope) + 2e-6, f"fd {fd} vs gradient {slope} ({rng})"


def test_head_dropout_masks_its_rows_and_regenerates_them(rng):
    from gptcore.models.heads import LinearHead

    head = LinearHead(16, 3, dropout=0.5, seed=int(rng.integers(1 << 30)))
    rows = rng.randn(5, 16)
    out = head.forward(rows)
    keep = R.dropout_mask(rows.shape, 0.5, head.seed, (0 << 12) | 4095)
    W = head.parameters()["weight"].numpy().astype(np.float64)
    assert np.allclose(out, (rows * keep / 0.5) @ W.T, rtol=1e-5, atol=1e-6)
    d = rng.randn(5, 3)
    drows = head.backward(d)
    assert np.allclose(drows, (d.astype(np.float64) @ W) * keep / 0.5, rtol=1e-5, atol=1e-6)
    head.eval()
    assert np.allclose(head.forward(rows), rows @ W.T, rtol=1e-5, atol=1e-6)  # eval: no dropout
    assert head.step == 1  # only the training-mode forward drew a mask


def test_dropout_probabilities_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="attn_pdrop"):
        tiny(attn_pdrop=1.0)
    with pytest.raises(ValueError, match="resid_pdrop"):
        tiny(resid_pdrop=-0.1)
    with pytest.raises(ValueError, match="n_layer: 1024 layers exceed the 1023"):
        GPT(GPTConfig(n_layer=1024, n_head=1, n_embd=4, block_size=4, vocab_size=8))
    model = GPT(tiny(**P_ALL))
    model.save_pretrained(tmp_path / "m")
    back = GPT.from_pretrained(tmp_path / "m")
    assert (back.config.embd_pdrop, back.config.attn_pdrop, back.config.resid_pdrop) == (0.25, 0.25, 0.25)
    assert not back.training


def test_transformers_eval_logits_match_with_dropout_configured(tmp_path, rng):
    """A transformers GPT-2 with its default 0.1 dropout: gptcore reads the probabilities, loads
    in eval mode, and its logits equal transformers' eval-mode logits; train() changes them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=29, n_positions=12, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(int(rng.integers(1 << 30)))
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = GPT.from_pretrained(tmp_path / "hf")
    assert model.config.resid_pdrop == 0.1 and not model.training
    idx = rng.integers(0, 29, (2, 9))
    with torch.no_grad():
        want = hf(torch.tensor(idx)).logits.numpy()
    got = model(idx)
    assert np.abs(got - want).max() < 1e-4
    model.train()
    assert np.abs(model(idx) - want).max() > 1e-3
