"""Per-token log-probs of completions (gptcore.train._logprobs) against transformers'
GPT2LMHeadModel on the same random weights, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest

from gptcore.models.config import GPTConfig
from gptcore.models.gpt import GPT
from gptcore.train._logprobs import Policy, ValueModel, check_same_vocabulary, pack
from tests.helpers import check, fresh_seed

CFG = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=61)


def _random_pairs(rng, n, vocab):
    prompts = [list(rng.integers(0, vocab, rng.integers(1, 8))) for _ in range(n)]
    comps = [list(rng.integers(0, vocab, rng.integers(1, 9))) for _ in range(n)]
    return prompts, comps


def test_pack_layout():
    b = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], block_size=16, pad_id=0)
    assert b.ids[0, :4].tolist() == [1, 2, 3, 5] and b.ids[1, :3].tolist() == [4, 7, 8]
    assert b.targets[0, :5].tolist() == [-1, -1, 5, 6, -1]
    assert b.targets[1, :4].tolist() == [7, 8, 9, -1]
    assert b.mask.sum(1).tolist() == [2, 3] and b.last.tolist() == [3, 2]
    assert b.n_tokens == 4 + 3


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match=r"examples\[1\].*context of 8"):
        pack([[1], list(range(8))], [[2], [3, 4]], block_size=8)
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[]], [[1]], block_size=8)
    with pytest.raises(ValueError, match="empty completion"):
        pack([[1]], [[]], block_size=8)
    with pytest.raises(TypeError, match="integer token ids"):
        pack([[1.5]], [[1]], block_size=8)


def test_reference_with_another_vocabulary_is_refused():
    a = GPT(GPTConfig(**CFG))
    b = GPT(GPTConfig(**{**CFG, "vocab_size": 70}))
    with pytest.raises(ValueError, match="ref: its vocabulary has 70 tokens, the policy's 61"):
        check_same_vocabulary(a, b, "ref")


def test_logprobs_and_gradients_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model = GPT(GPTConfig(**CFG), seed=seed % 1000).eval()
    model.save_pretrained(str(tmp_path / "m"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "m")).eval()
    prompts, comps = _random_pairs(rng, 5, CFG["vocab_size"])
    batch = pack(prompts, comps, block_size=CFG["block_size"])
    pol = Policy(model)
    logp = pol.logprobs(batch, grad=True)
    w = rng.standard_normal(batch.mask.shape).astype(np.float32)  # any per-token weights
    model.zero_grad()
    pol.backward(w, batch)

    ids = torch.tensor(batch.ids, dtype=torch.long)
    out = torch.log_softmax(hf(ids).logits.double(), dim=-1)
    tgt = torch.tensor(np.maximum(batch.targets, 0))
    ref = out.gather(-1, tgt[..., None])[..., 0] * torch.tensor(batch.mask, dtype=torch.float64)
    (ref * torch.tensor(w, dtype=torch.float64)).sum().backward()
    check("token logprobs", logp, ref.detach().numpy(), seed, tol=1e-5)
    check("sequence logprobs", batch.sum(logp), ref.sum(1).detach().numpy(), seed, tol=1e-5)
    grads = model.grads()
    V = CFG["vocab_size"]
    check("d wte", np.asarray(grads["wte"])[:V], hf.transformer.wte.weight.grad.numpy(), seed, tol=1e-4)
    check("d ln_f.weight", grads["ln_f.weight"], hf.transformer.ln_f.weight.grad.numpy(), seed, tol=1e-4)
    # transformers' Conv1D stores (in, out); gptcore (out, in)
    check("d h.0.attn.c_attn.weight", grads["h.0.attn.c_attn.weight"],
          hf.transformer.h[0].attn.c_attn.weight.grad.numpy().T, seed, tol=1e-4)
    # chunked, no-grad scoring gives the same sums
    check("chunked", pol.sequence_logprobs(batch, batch_size=2), ref.sum(1).detach().numpy(),
          seed, tol=1e-5)


def test_value_model_starts_at_zero_and_backpropagates():
    model = GPT(GPTConfig(**CFG), seed=1).eval()
    vm = ValueModel(model)
    rng = np.random.default_rng(0)
    batch = pack(*_random_pairs(rng, 3, CFG["vocab_size"]), block_size=CFG["block_size"])
    v = vm.values(batch, grad=True)
    assert v.shape == batch.mask.shape and not v.any()
    model.zero_grad()
    vm.backward(np.ones_like(v), batch)
    g = model.grads()
    assert np.abs(np.asarray(g["value.bias"])).sum() == batch.mask.sum()  # d v / d bias = 1 each
    assert np.abs(np.asarray(g["value.weight"])).sum() > 0
