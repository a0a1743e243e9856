"""GPT model: whole-model gradients against a float64 NumPy reference model, configs, bad input.

The reference model below is written independently from gptcore.model, from the functions of
gptcore.reference (the op oracle) and plain NumPy adds for the residual stream; its own loss
gradient is checked against finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gptcore
from gptcore import reference as R
from gptcore.models import GPTConfig
from gptcore.models import GPT
from tests.helpers import rel_err


# ---- a float64 reference GPT ------------------------------------------------------------------


def ref_forward(P, cfg, idx, targets=None):
    """Forward in float64. P: name -> array with wte padded to (Vp, C). Returns (loss, logits, cache)."""
    eps, H = cfg.ln_eps, cfg.n_head
    bias = (lambda n: P[n]) if cfg.bias else (lambda n: np.zeros(cfg.n_embd) if n.endswith("ln_1.bias")
                                               or n.endswith("ln_2.bias") or n == "ln_f.bias" else None)
    x = R.embedding_forward(idx, P["wte"], P["wpe"])
    cache = {"x0": x, "layers": []}
    for i in range(cfg.n_layer):
        h, w = f"h.{i}.", cfg.attn_window[i]
        c = {"x": x}
        if cfg.prenorm:
            c["ln1"], c["m1"], c["r1"] = R.layernorm_forward(x, P[h + "ln_1.weight"], bias(h + "ln_1.bias"), eps)
            c["qkv"], _ = R.linear_forward(c["ln1"], P[h + "attn.c_attn.weight"], bias(h + "attn.c_attn.bias"))
            c["att"], c["lse"] = R.attention_forward(c["qkv"], H, w)
            proj, _ = R.linear_forward(c["att"], P[h + "attn.c_proj.weight"], bias(h + "attn.c_proj.bias"))
            c["x_mid"] = x + proj
            c["ln2"], c["m2"], c["r2"] = R.layernorm_forward(c["x_mid"], P[h + "ln_2.weight"], bias(h + "ln_2.bias"), eps)
            c["fc"], c["fc_pre"] = R.linear_forward(c["ln2"], P[h + "mlp.c_fc.weight"], bias(h + "mlp.c_fc.bias"), gelu=True)
            mlp, _ = R.linear_forward(c["fc"], P[h + "mlp.c_proj.weight"], bias(h + "mlp.c_proj.bias"))
            x = c["x_mid"] + mlp
        else:
            c["qkv"], _ = R.linear_forward(x, P[h + "attn.c_attn.weight"], bias(h + "attn.c_attn.bias"))
            c["att"], c["lse"] = R.attention_forward(c["qkv"], H, w)
            proj, _ = R.linear_forward(c["att"], P[h + "attn.c_proj.weight"], bias(h + "attn.c_proj.bias"))
            c["s1"] = x + proj
            c["n1"], c["m1"], c["r1"] = R.layernorm_forward(c["s1"], P[h + "ln_1.weight"], bias(h + "ln_1.bias"), eps)
            c["fc"], c["fc_pre"] = R.linear_forward(c["n1"], P[h + "mlp.c_fc.weight"], bias(h + "mlp.c_fc.bias"), gelu=True)
            mlp, _ = R.linear_forward(c["fc"], P[h + "mlp.c_proj.weight"], bias(h + "mlp.c_proj.bias"))
            c["s2"] = c["n1"] + mlp
            x, c["m2"], c["r2"] = R.layernorm_forward(c["s2"], P[h + "ln_2.weight"], bias(h + "ln_2.bias"), eps)
        cache["layers"].append(c)
    cache["x_last"] = x
    if cfg.prenorm:
        x, cache["mf"], cache["rf"] = R.layernorm_forward(x, P["ln_f.weight"], bias("ln_f.bias"), eps)
    cache["xf"] = x
    logits, _ = R.linear_forward(x, P["wte"])
    loss = None
    if targets is not None:
        t = np.where(targets < 0, -1, targets)
        losses = R.cross_entropy_forward(logits, t, cfg.vocab_size, -1)
        loss = losses.sum() / max((t >= 0).sum(), 1)
    return loss, logits, cache


def ref_grads(P, cfg, idx, targets, dh=None, lm_scale=1.0):
    """Loss and gradients (name -> array, wte padded) by hand in float64: of ``lm_scale`` times
    the mean LM loss (when ``targets`` is given) plus ``sum(h * dh)`` for a gradient ``dh`` on
    the final hidden states h (when given)."""
    loss, logits, c = ref_forward(P, cfg, idx, targets)
    H = cfg.n_head
    G = {k: np.zeros_like(v) for k, v in P.items()}

    def add(name, g):
        if g is not None and name in G:
            G[name] += g

    dx = np.zeros_like(c["xf"])
    if targets is not None:
        t = np.where(targets < 0, -1, targets)
        dlogits = lm_scale * R.cross_entropy_backward(logits, t, cfg.vocab_size, -1)
        dx, dw, _ = R.linear_backward(dlogits, c["xf"], weight=P["wte"], has_bias=False)
        add("wte", dw)
    if dh is not None:
        dx = dx + dh
    lnb = cfg.bias
    if cfg.prenorm:
        dx, dw, db = R.layernorm_backward(dx, c["x_last"], c["mf"], c["rf"], weight=P["ln_f.weight"])
        add("ln_f.weight", dw), add("ln_f.bias", db)
    for i in reversed(range(cfg.n_layer)):
        h, w, L = f"h.{i}.", cfg.attn_window[i], c["layers"][i]
        if cfg.prenorm:
            # x_out = x_mid + mlp(ln2(x_mid)); x_mid = x + attn(ln1(x))
            dfc, dw, db = R.linear_backward(dx, L["fc"], weight=P[h + "mlp.c_proj.weight"], has_bias=lnb)
            add(h + "mlp.c_proj.weight", dw), add(h + "mlp.c_proj.bias", db)
            dln2, dw, db = R.linear_backward(dfc, L["ln2"], weight=P[h + "mlp.c_fc.weight"], pre=L["fc_pre"], has_bias=lnb)
            add(h + "mlp.c_fc.weight", dw), add(h + "mlp.c_fc.bias", db)
            dmid_ln, dw, db = R.layernorm_backward(dln2, L["x_mid"], L["m2"], L["r2"], weight=P[h + "ln_2.weight"])
            add(h + "ln_2.weight", dw), add(h + "ln_2.bias", db)
            dmid = dx + dmid_ln
            datt, dw, db = R.linear_backward(dmid, L["att"], weight=P[h + "attn.c_proj.weight"], has_bias=lnb)
            add(h + "attn.c_proj.weight", dw), add(h + "attn.c_proj.bias", db)
            dqkv = R.attention_backward(datt, L["qkv"], L["att"], L["lse"], H, w)
            dln1, dw, db = R.linear_backward(dqkv, L["ln1"], weight=P[h + "attn.c_attn.weight"], has_bias=lnb)
            add(h + "attn.c_attn.weight", dw), add(h + "attn.c_attn.bias", db)
            dx_ln, dw, db = R.layernorm_backward(dln1, L["x"], L["m1"], L["r1"], weight=P[h + "ln_1.weight"])
            add(h + "ln_1.weight", dw), add(h + "ln_1.bias", db)
            dx = dmid + dx_ln
        else:
            # out = LN2(n1 + mlp(n1)); n1 = LN1(x + attn(x))
            ds2, dw, db = R.layernorm_backward(dx, L["s2"], L["m2"], L["r2"], weight=P[h + "ln_2.weight"])
            add(h + "ln_2.weight", dw), add(h + "ln_2.bias", db)
            dfc, dw, db = R.linear_backward(ds2, L["fc"], weight=P[h + "mlp.c_proj.weight"], has_bias=lnb)
            add(h + "mlp.c_proj.weight", dw), add(h + "mlp.c_proj.bias", db)
            dn1, dw, db = R.linear_backward(dfc, L["n1"], weight=P[h + "mlp.c_fc.weight"], pre=L["fc_pre"], has_bias=lnb)
            add(h + "mlp.c_fc.weight", dw), add(h + "mlp.c_fc.bias", db)
            ds1, dw, db = R.layernorm_backward(dn1 + ds2, L["s1"], L["m1"], L["r1"], weight=P[h + "ln_1.weight"])
            add(h + "ln_1.weight", dw), add(h + "ln_1.bias", db)
            datt, dw, db = R.linear_backward(ds1, L["att"], weight=P[h + "attn.c_proj.weight"], has_bias=lnb)
            add(h + "attn.c_proj.weight", dw), add(h + "attn.c_proj.bias", db)
            dqkv = R.attention_backward(datt, L["qkv"], L["att"], L["lse"], H, w)
            dxa, dw, db = R.linear_backward(dqkv, L["x"], weight=P[h + "attn.c_attn.weight"], has_bias=lnb)
            add(h + "attn.c_attn.weight", dw), add(h + "attn.c_attn.bias", db)
            dx = dxa + ds1
    dwte, dwpe = R.embedding_backward(dx, idx, P["wte"].shape[0], P["wpe"].shape[0])
    add("wte", dwte), add("wpe", dwpe)
    return loss, G


# ---- helpers ----------------------------------------------------------------------------------


def tiny_config(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=12, block_size=9, vocab_size=23)
    base.update(kw)
    return GPTConfig(**base)


def random_state(model, rng, scale=0.3):
    """Non-trivial float32 parameters (LayerNorm gains around 1) for a sharper gradient check."""
    state = {}
    for name, p in model.parameters().items():
        shape = tuple(p.shape)
        if name == "wte":
            shape = (model.config.vocab_size, shape[1])
        arr = rng.randn(*shape, scale=scale)
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            arr = (1.0 + arr).astype(np.float32)
        state[name] = arr
    return state


def padded_f64(model, state):
    P = {k: np.asarray(v, np.float64) for k, v in state.items()}
    Vp, C = model.config.padded_vocab_size, model.config.n_embd
    wte = np.zeros((Vp, C))
    wte[: model.config.vocab_size] = P["wte"]
    P["wte"] = wte
    return P


def check_against_reference(cfg, rng, B=3, T=None, ignore_some=True, tol=5e-5):
    T = T or cfg.block_size
    model = GPT(cfg, seed=int(rng.integers(1 << 30)))
    state = random_state(model, rng)
    model.load_state_dict(state)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    if ignore_some:
        targets[0, :2] = -1
        targets[-1, -1] = -100  # any negative value is ignored
    loss = model.forward(idx, targets)
    model.backward()
    P = padded_f64(model, state)
    ref_loss, ref_G = ref_grads(P, cfg, idx, targets)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"loss {loss} vs reference {ref_loss} ({rng})"
    grads = model.grads()
    assert set(grads) == set(ref_G)
    for name, g in grads.items():
        err = rel_err(g.numpy(), ref_G[name])
        assert err < tol, f"{name}: relative error {err:.2e} vs the float64 reference ({rng})"
    # logits: exactly vocab_size columns, matching the reference
    logits = model(idx)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == np.float32
    _, ref_logits, _ = ref_forward(P, cfg, idx)
    assert rel_err(logits, ref_logits[..., : cfg.vocab_size]) < 1e-5
    return model


# ---- the reference model itself ---------------------------------------------------------------


@pytest.mark.parametrize("prenorm", [True, False])
def test_reference_model_gradient_matches_finite_differences(rng, prenorm):
    cfg = tiny_config(prenorm=prenorm, n_embd=8, n_head=2, vocab_size=13, block_size=6,
                      attn_window=[None, 2])
    model = GPT(cfg)
    P = padded_f64(model, random_state(model, rng, scale=0.5))
    idx = rng.integers(0, cfg.vocab_size, (2, 5))
    targets = rng.integers(0, cfg.vocab_size, (2, 5))
    targets[1, 0] = -1
    _, G = ref_grads(P, cfg, idx, targets)
    h = 1e-6
    names = ["wte", "wpe", "h.0.attn.c_attn.weight", "h.1.mlp.c_fc.bias", "h.1.ln_2.weight",
             "h.0.mlp.c_proj.weight"] + (["ln_f.bias"] if prenorm else ["h.1.ln_1.bias"])
    for name in names:
        flat = P[name].reshape(-1)
        rows = cfg.vocab_size * cfg.n_embd if name == "wte" else flat.size
        for j in rng.choice(rows, size=3, replace=False):
            old = flat[j]
            flat[j] = old + h
            lp = ref_forward(P, cfg, idx, targets)[0]
            flat[j] = old - h
            lm = ref_forward(P, cfg, idx, targets)[0]
            flat[j] = old
            fd = (lp - lm) / (2 * h)
            an = G[name].reshape(-1)[j]
            assert abs(fd - an) <= 1e-6 + 1e-5 * abs(an), f"{name}[{j}]: fd {fd} vs analytic {an} ({rng})"


# ---- gptcore model vs reference model ---------------------------------------------------------


def test_gpt2_layout_gradients_match_reference(rng):
    check_against_reference(tiny_config(), rng)


def test_gpt1_layout_gradients_match_reference(rng):
    model = check_against_reference(tiny_config(prenorm=False), rng)
    assert "ln_f.weight" not in model.parameters()


def test_windowed_layers_gradients_match_reference(rng):
    cfg = tiny_config(n_layer=3, attn_window=[None, 3, 1], block_size=11)
    check_against_reference(cfg, rng, B=2)


def test_bias_free_gradients_match_reference(rng):
    model = check_against_reference(tiny_config(bias=False, n_layer=1), rng, B=2)
    assert not any(n.endswith(".bias") for n in model.parameters())


def test_shorter_sequence_than_block_and_odd_sizes(rng):
    cfg = tiny_config(n_embd=15, n_head=3, vocab_size=131, block_size=13)
    check_against_reference(cfg, rng, B=1, T=7)


@pytest.mark.parametrize("prenorm", [True, False])
def test_workspace_reused_across_steps_gives_fresh_results(rng, prenorm):
    """Activations live in a per-shape workspace: a second step with other data writes the same
    buffers and still matches the reference, results handed out are copies, and another
    forward between forward and backward makes backward refuse instead of using clobbered data."""
    cfg = tiny_config(prenorm=prenorm)
    model = GPT(cfg, seed=3)
    state = random_state(model, rng)
    model.load_state_dict(state)
    P = padded_f64(model, state)
    B, T = 2, cfg.block_size
    first_logits = None
    ptrs = None
    for step in range(2):
        idx = rng.integers(0, cfg.vocab_size, (B, T))
        targets = rng.integers(0, cfg.vocab_size, (B, T))
        model.zero_grad()
        loss = model.forward(idx, targets)
        model.backward()
        ref_loss, ref_G = ref_grads(P, cfg, idx, targets)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for name, g in model.grads().items():
            assert rel_err(g.numpy(), ref_G[name]) < 5e-5, name
        ws = model._workspaces[(B, T)]
        now = [t.data_ptr() for A in ws.layers for t in A.values()]
        assert ptrs is None or now == ptrs  # the same buffers, not new ones
        ptrs = now
        logits = model(idx)
        if first_logits is None:
            first_logits, kept = logits, logits.copy()
    np.testing.assert_array_equal(first_logits, kept)  # not overwritten by later steps
    # an eval shape gets its own workspace; only two shapes are kept
    model.loss(idx[:1, :3], targets[:1, :3])
    model.logits(idx[:, :2])
    assert set(model._workspaces) == {(1, 3), (2, 2)}  # the training shape (B, T) was dropped
    # a forward in between invalidates the pending backward
    model.forward(idx, targets)
    model.logits(idx)
    with pytest.raises(RuntimeError, match="call forward"):
        model.backward()


# ---- the model's behaviour ----------------------------------------------------------------------


def test_initialisation_follows_gpt2(rng):
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=32, vocab_size=300)
    m = GPT(cfg, seed=3)
    P = {k: v.numpy() for k, v in m.parameters().items()}
    assert P["wte"].shape == (cfg.padded_vocab_size, 64) and cfg.padded_vocab_size == 384
    assert np.all(P["wte"][300:] == 0), "padding rows must start at zero"
    assert abs(P["wte"][:300].std() - 0.02) < 0.002
    assert abs(P["h.0.attn.c_attn.weight"].std() - 0.02) < 0.002
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(P["h.2.mlp.c_proj.weight"].std() - resid) < 0.1 * resid
    assert abs(P["h.1.attn.c_proj.weight"].std() - resid) < 0.1 * resid
    assert np.all(P["h.0.ln_1.weight"] == 1) and np.all(P["h.3.mlp.c_fc.bias"] == 0)
    assert P["h.0.mlp.c_fc.weight"].shape == (256, 64)  # (out, in)
    n = sum(int(np.prod(v.shape)) for v in P.values())
    assert n == cfg.num_parameters(padded=True)
    assert m.num_parameters() == cfg.num_parameters()
    # same seed, same weights; another seed, others
    same = GPT(cfg, seed=3).parameters()["h.1.attn.c_attn.weight"].numpy()
    other = GPT(cfg, seed=4).parameters()["h.1.attn.c_attn.weight"].numpy()
    assert np.array_equal(same, P["h.1.attn.c_attn.weight"])
    assert not np.array_equal(other, same)


def test_padding_rows_get_no_gradient_and_never_reach_users(rng):
    cfg = tiny_config(vocab_size=50)
    m = GPT(cfg, seed=1)
    x = rng.integers(0, 50, (2, 9))
    m.forward(x, x)
    m.backward()
    assert np.all(m.grads()["wte"].numpy()[50:] == 0)
    assert m(x).shape == (2, 9, 50)
    assert m.logits(x, last_only=True).shape == (2, 50)
    np.testing.assert_allclose(m.logits(x, last_only=True), m(x)[:, -1], rtol=1e-5, atol=1e-6)
    one = x[1:, :5]  # batch of one: the device-side path
    np.testing.assert_allclose(m.logits(one, last_only=True), m(one)[:, -1], rtol=1e-5, atol=1e-6)
    sd = m.state_dict()
    assert sd["wte"].shape == (50, cfg.n_embd)


def test_gradient_accumulation_equals_one_big_batch(rng):
    cfg = tiny_config()
    x = rng.integers(0, cfg.vocab_size, (4, 9))
    y = rng.integers(0, cfg.vocab_size, (4, 9))
    big = GPT(cfg, seed=5)
    big.forward(x, y)
    big.backward()
    acc = GPT(cfg, seed=5)
    for half in (slice(0, 2), slice(2, 4)):
        acc.forward(x[half], y[half], loss_scale=0.5)
        acc.backward()
    for name, g in big.grads().items():
        assert rel_err(acc.grads()[name].numpy(), g.numpy()) < 1e-5, name
    acc.zero_grad()
    assert all(not g.numpy().any() for g in acc.grads().values())


def test_state_dict_round_trip_and_loss_only_eval(rng):
    cfg = tiny_config()
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=2)
    x = rng.integers(0, cfg.vocab_size, (2, 9))
    assert a.loss(x, x) != b.loss(x, x)
    b.load_state_dict(a.state_dict())
    assert a.loss(x, x) == b.loss(x, x)
    with pytest.raises(RuntimeError, match="backward"):
        b.backward()  # loss() keeps nothing for backward
    bad = a.state_dict()
    bad["wpe"] = bad["wpe"][:3]
    with pytest.raises(ValueError, match="wpe"):
        b.load_state_dict(bad)
    del bad["wpe"]
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict(bad)


def test_all_targets_ignored_gives_nan_loss_and_zero_grads(rng):
    m = GPT(tiny_config(), seed=0)
    x = rng.integers(0, 23, (2, 4))
    loss = m.forward(x, np.full((2, 4), -1))
    m.backward()
    assert math.isnan(loss)
    assert all(not g.numpy().any() for g in m.grads().values())


# ---- configs and presets ------------------------------------------------------------------------


@pytest.mark.parametrize("name,count", [
    ("gpt2", 124_439_808),         # GPT-2 small as released (tied head, 50257 tokens)
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
    ("gpt1", 116_534_784),         # the "117M" GPT-1: 40478 tokens, 512 positions, no ln_f
])
def test_released_model_parameter_counts(name, count):
    assert GPTConfig.preset(name).num_parameters() == count


@pytest.mark.parametrize("name,paper", [
    ("gpt3-small", 125e6), ("gpt3-medium", 350e6), ("gpt3-large", 760e6), ("gpt3-xl", 1.3e9),
    ("gpt3-2.7b", 2.7e9), ("gpt3-6.7b", 6.7e9), ("gpt3-13b", 13.0e9), ("gpt3-175b", 175.0e9),
])
def test_gpt3_parameter_counts_match_table_2_1(name, paper):
    cfg = GPTConfig.preset(name)
    assert abs(cfg.num_parameters() / paper - 1) < 0.03, f"{name}: {cfg.num_parameters():,}"
    assert cfg.block_size == 2048 and cfg.prenorm
    dense = [w is None for w in cfg.attn_window]
    assert dense[0] and not dense[1] and dense == [i % 2 == 0 for i in range(cfg.n_layer)]


def test_config_checks_and_serialisation():
    cfg = GPTConfig.preset("gpt1")
    assert not cfg.prenorm and cfg.block_size == 512 and cfg.padded_vocab_size % 128 == 0
    assert GPTConfig.from_json(cfg.to_json()) == cfg
    assert GPTConfig.preset("tiny", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="attn_window"):
        GPTConfig(n_layer=2, attn_window=[None])
    with pytest.raises(ValueError, match="attn_window"):
        GPTConfig(n_layer=2, attn_window=[None, 0])
    with pytest.raises(TypeError, match="n_layer"):
        GPTConfig(n_layer=2.5)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({"n_layers": 3})


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_model_input_raises_clear_errors(rng):
    cfg = tiny_config(vocab_size=50)  # padded to 128: ids 50..127 exist in wte but are not tokens
    m = GPT(cfg)
    good = rng.integers(0, 50, (2, 5))
    with pytest.raises(ValueError, match="idx.*token id 50"):
        m.forward(np.full((2, 5), 50), good)
    with pytest.raises(ValueError, match="idx.*-1"):
        m(np.full((1, 3), -1))
    with pytest.raises(ValueError, match="idx: sequence length 10 exceeds block_size 9"):
        m(rng.integers(0, 50, (1, 10)))
    with pytest.raises(TypeError, match="idx.*integer"):
        m(good.astype(np.float32))
    with pytest.raises(TypeError, match="idx"):
        m("hello")
    with pytest.raises(ValueError, match="idx.*2-D"):
        m(good[0])
    with pytest.raises(ValueError, match="targets.*shape"):
        m.forward(good, good[:, :4])
    with pytest.raises(ValueError, match="targets.*50"):
        m.forward(good, np.full((2, 5), 50))
    with pytest.raises(TypeError, match="targets"):
        m.forward(good, good.astype(np.float64))
    with pytest.raises(RuntimeError, match="forward"):
        GPT(cfg).backward()
    with pytest.raises(TypeError, match="dtype"):
        GPT(cfg, dtype="bfloat16")  # CPU computes in float32
    with pytest.raises(TypeError, match="dtype"):
        GPT(cfg, dtype="int32")
    with pytest.raises(ValueError, match="device"):
        GPT(cfg, device="tpu")
    with pytest.raises(TypeError, match="config"):
        GPT({"n_layer": 2})
    # a Tensor of ids works like an array
    assert m(gptcore.tensor(good, dtype="int32")).shape == (2, 5, 50)


@pytest.mark.gpu
def test_cuda_bf16_model_matches_cpu_float32(rng):
    cfg = tiny_config(n_embd=64, n_head=4, block_size=16, vocab_size=100)
    cpu, gpu = GPT(cfg, seed=0), GPT(cfg, device="cuda", dtype="bfloat16", seed=0)
    x = rng.integers(0, 100, (2, 16))
    lc, lg = cpu.forward(x, x), gpu.forward(x, x)
    cpu.backward(), gpu.backward()
    assert abs(lc - lg) < 0.02 * abs(lc)
    for name, g in cpu.grads().items():
        assert gpu.grads()[name].dtype == "float32"
        assert rel_err(gpu.grads()[name].numpy(), g.numpy()) < 5e-2, name


# ---- trunk and heads ----------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", [True, False])
def test_backward_from_hidden_states_matches_reference(rng, prenorm):
    """hidden_states() + backward(dh) gives the float64 reference model's gradients of
    sum(h * dh): the trunk back-propagates from any head, not only the LM loss."""
    cfg = tiny_config(prenorm=prenorm, attn_window=[None, 3])
    model = GPT(cfg)
    state = random_state(model, rng)
    model.load_state_dict(state)
    idx = rng.integers(0, cfg.vocab_size, (2, 7))
    h = model.hidden_states(idx)
    P = padded_f64(model, state)
    _, _, cache = ref_forward(P, cfg, idx)
    assert h.shape == (2, 7, cfg.n_embd)
    assert rel_err(h.numpy(), cache["xf"]) < 1e-5
    dh = rng.randn(2, 7, cfg.n_embd)
    model.backward(dh=dh)
    _, ref_G = ref_grads(P, cfg, idx, None, dh=np.asarray(dh, np.float64))
    for name, g in model.grads().items():
        assert rel_err(g.numpy(), ref_G[name]) < 5e-5, f"{name} ({rng})"


def test_lm_loss_plus_head_gradient_is_one_backward(rng):
    """forward(idx, targets, loss_scale=lam) then backward(dh=...) is the gradient of
    lam * LM loss + sum(h * dh), with h read from last_hidden_states of the same forward."""
    cfg = tiny_config()
    model = GPT(cfg)
    state = random_state(model, rng)
    model.load_state_dict(state)
    idx = rng.integers(0, cfg.vocab_size, (3, 6))
    targets = rng.integers(0, cfg.vocab_size, (3, 6))
    loss = model.forward(idx, targets, loss_scale=0.5)
    P = padded_f64(model, state)
    _, _, cache = ref_forward(P, cfg, idx)
    assert rel_err(model.last_hidden_states.numpy(), cache["xf"]) < 1e-5
    dh = rng.randn(3, 6, cfg.n_embd)
    model.backward(dh=dh)
    ref_loss, ref_G = ref_grads(P, cfg, idx, targets, dh=np.asarray(dh, np.float64), lm_scale=0.5)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for name, g in model.grads().items():
        assert rel_err(g.numpy(), ref_G[name]) < 5e-5, f"{name} ({rng})"


def test_backward_hidden_checks_its_input(rng):
    cfg = tiny_config()
    model = GPT(cfg)
    idx = rng.integers(0, cfg.vocab_size, (2, 4))
    model.hidden_states(idx)
    with pytest.raises(ValueError, match="dh"):
        model.backward()  # hidden states alone carry no loss
    with pytest.raises(ValueError, match="dh: expected shape"):
        model.backward(dh=np.zeros((2, 5, cfg.n_embd), np.float32))
    with pytest.raises(TypeError, match="dh"):
        model.backward(dh=np.zeros((2, 4, cfg.n_embd), np.int32))
    model.backward_hidden(np.zeros((2, 4, cfg.n_embd), np.float32))
    with pytest.raises(RuntimeError, match="backward"):
        model.backward_hidden(np.zeros((2, 4, cfg.n_embd), np.float32))  # nothing pending now


def test_linear_head_matches_numpy_and_trains_through_the_model(rng):
    from gptcore.models.heads import LinearHead, gather_rows, scatter_rows, softmax_cross_entropy

    cfg = tiny_config()
    model = GPT(cfg)
    state = random_state(model, rng)
    model.load_state_dict(state)
    head = LinearHead(cfg.n_embd, 3, name="score", seed=int(rng.integers(1 << 30)))
    model.add_head(head)
    assert {"score.weight", "score.bias"} <= set(model.parameters())
    idx = rng.integers(0, cfg.vocab_size, (4, 6))
    extract = np.array([5, 2, 0, 4])
    labels = np.array([0, 2, 1, 1])
    h = model.hidden_states(idx)
    rows = gather_rows(h, extract)
    W, b = head.parameters()["weight"].numpy(), head.parameters()["bias"].numpy()
    out = head.forward(rows)
    assert rel_err(out, rows.astype(np.float64) @ W.T.astype(np.float64) + b) < 1e-6
    loss, dout = softmax_cross_entropy(out, labels)
    z = out.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert abs(loss + np.log(p[np.arange(4), labels]).mean()) < 1e-6
    drows = head.backward(dout)
    assert rel_err(drows, dout.astype(np.float64) @ W) < 1e-6
    assert rel_err(head.grads()["weight"].numpy(), dout.T.astype(np.float64) @ rows) < 1e-6
    dh = scatter_rows(drows, extract, h.shape)
    model.backward(dh=dh)
    P = padded_f64(model, state)
    _, ref_G = ref_grads(P, cfg, idx, None, dh=dh.astype(np.float64))
    for name in ref_G:
        assert rel_err(model.grads()[name].numpy(), ref_G[name]) < 5e-5, name
    model.zero_grad()
    assert not np.any(head.grads()["weight"].numpy())


def test_head_saved_and_loaded_with_the_model(tmp_path, rng):
    from gptcore.models.heads import LinearHead

    cfg = tiny_config()
    model = GPT(cfg, seed=3)
    model.add_head(LinearHead(cfg.n_embd, 1, name="value", bias=False, seed=5))
    with pytest.raises(ValueError, match="taken"):
        model.add_head(LinearHead(cfg.n_embd, 1, name="value"))
    model.save_pretrained(tmp_path / "m")
    back = GPT.from_pretrained(tmp_path / "m")
    assert not back.training  # loaded models start in evaluation mode
    assert list(back.heads) == ["value"] and set(back.heads["value"].parameters()) == {"weight"}
    for name, arr in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], arr), name
    # convert keeps it; a stray tensor in a state to write is refused, not dropped
    from gptcore.io import CheckpointError, convert, write_weights
    convert(tmp_path / "m", tmp_path / "m2")
    again = GPT.from_pretrained(tmp_path / "m2")
    assert np.array_equal(again.state_dict()["value.weight"], model.state_dict()["value.weight"])
    with pytest.raises(CheckpointError, match="neither"):
        write_weights(tmp_path / "m3", cfg, {**model.state_dict(), "stray": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="no task heads"):
        convert(tmp_path / "m", tmp_path / "m.bin")
    # a head tensor the config does not declare is refused, as any foreign tensor
    import json
    cfg_path = tmp_path / "m" / "config.json"
    d = json.loads(cfg_path.read_text())
    del d["gptcore"]["heads"]
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unexpected tensor"):
        GPT.from_pretrained(tmp_path / "m")


def test_one_forward_serves_training_and_cached_decoding(rng):
    """The decoder runs the trunk's own blocks: its logits, fed one token at a time, equal the
    full-sequence forward's for GPT-2 and GPT-1 layouts with banded layers."""
    from gptcore.models.kvcache import Decoder

    for prenorm in (True, False):
        cfg = tiny_config(prenorm=prenorm, attn_window=[2, None])
        model = GPT(cfg, seed=int(rng.integers(1 << 30)))
        model.load_state_dict(random_state(model, rng))
        idx = rng.integers(0, cfg.vocab_size, (2, 8))
        full = model(idx)
        dec = Decoder(model, 2, 8)
        got = [dec.forward(idx[:, :3])]
        got += [dec.forward(idx[:, t:t + 1]) for t in range(3, 8)]
        assert rel_err(np.stack(got, 1), full[:, 2:]) < 1e-5


def test_lm_head_token_logprobs_and_their_gradient(rng):
    """LMHead on the trunk's hidden states: per-token log-probs equal log-softmax of the model's
    logits, and back-propagating -1/n per valid token equals the mean LM loss's gradient."""
    from gptcore.models.heads import LMHead

    cfg = tiny_config()
    model = GPT(cfg)
    model.load_state_dict(random_state(model, rng))
    idx = rng.integers(0, cfg.vocab_size, (3, 7))
    targets = rng.integers(0, cfg.vocab_size, (3, 7))
    targets[1, :3] = -1
    logits = model(idx).astype(np.float64)
    logsm = logits - logits.max(-1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(-1, keepdims=True))
    want = np.where(targets >= 0, np.take_along_axis(logsm, np.maximum(targets, 0)[..., None], -1)[..., 0], 0)
    lm = LMHead(model)
    got = lm.token_logprobs(model.hidden_states(idx), targets)
    assert got.shape == (3, 7) and rel_err(got, want) < 1e-5
    valid = targets >= 0
    model.backward(dh=lm.backward(np.where(valid, -1.0 / valid.sum(), 0.0)))
    via_head = {k: np.array(g.numpy()) for k, g in model.grads().items()}
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    for name, g in model.grads().items():
        assert rel_err(via_head[name], g.numpy()) < 1e-5, name
    with pytest.raises(RuntimeError, match="token_logprobs first"):
        lm.backward(np.zeros((3, 7)))


def test_concurrent_calls_from_threads_each_get_their_own_answer(rng):
    """The model's workspaces are shared: calls from several threads take turns on its lock
    (the ops release the GIL, so without it they would overwrite each other's activations)."""
    import threading

    cfg = tiny_config(n_layer=3, n_embd=32, n_head=4, block_size=16)
    model = GPT(cfg)
    inputs = [rng.integers(0, cfg.vocab_size, (2, 16)) for _ in range(4)]
    want = [model(x) for x in inputs]
    got, errors = {}, []

    def worker(k):
        try:
            for _ in range(15):
                out = model(inputs[k])
                if not np.array_equal(out, want[k]):
                    errors.append(k)
            got[k] = True
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got) == 4 and not errors, errors


def test_load_weights_into_a_model_with_a_new_head(tmp_path, rng):
    """A pre-trained trunk loads under a freshly attached task head (the head keeps its values);
    dropout settings are not architecture; a file's head the model lacks is refused untouched."""
    from gptcore.io import CheckpointError, load_weights
    from gptcore.models.heads import LinearHead

    cfg = tiny_config()
    trunk = GPT(cfg, seed=1)
    trunk.save_pretrained(tmp_path / "trunk")
    model = GPT(cfg.replace(resid_pdrop=0.1, attn_pdrop=0.1), seed=2)
    head = LinearHead(cfg.n_embd, 3, name="score", seed=3)
    model.add_head(head)
    before = np.array(head.parameters()["weight"].numpy())
    load_weights(model, tmp_path / "trunk")
    for name, arr in trunk.state_dict().items():
        assert np.array_equal(model.state_dict()[name], arr), name
    assert np.array_equal(head.parameters()["weight"].numpy(), before)
    model.save_pretrained(tmp_path / "with_head")
    plain = GPT(cfg, seed=4)
    snapshot = plain.state_dict()
    with pytest.raises(CheckpointError, match="score"):
        load_weights(plain, tmp_path / "with_head")
    for name, arr in snapshot.items():  # nothing was written
        assert np.array_equal(plain.state_dict()[name], arr), name
