"""PPO: the policy and value losses and their gradients against PyTorch autograd, GAE against a
direct per-sequence loop, a zero-advantage step leaving the policy unchanged bit for bit, a
reward raised, bad input, and `gptcore ppo` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcore.cli import main
from gptcore.models.config import GPTConfig
from gptcore.models.gpt import GPT
from gptcore.train.ppo import gae, ppo, ppo_policy_loss, ppo_value_loss, whiten
from tests.helpers import check, fresh_seed

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=257)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "sft"
    GPT(GPTConfig(**TINY), seed=5).save_pretrained(str(path))
    return str(path)


def _span_mask(rng, B, T):
    """One contiguous completion span per row, as rollouts have."""
    mask = np.zeros((B, T))
    for b in range(B):
        s = rng.integers(0, T - 1)
        mask[b, s: rng.integers(s + 1, T + 1)] = 1
    return mask


def test_policy_loss_matches_torch():
    torch = pytest.importorskip("torch")
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    B, T, clip = 4, 9, 0.2
    mask = _span_mask(rng, B, T)
    old = rng.standard_normal((B, T)) - 2
    logp = old + rng.standard_normal((B, T)) * 0.3  # ratios on both sides of the clip range
    adv = rng.standard_normal((B, T))
    loss, d, clipfrac = ppo_policy_loss(logp, old, adv, mask, clip)
    lp = torch.tensor(logp, requires_grad=True)
    o, a, m = (torch.tensor(x) for x in (old, adv, mask))
    ratio = torch.exp(lp - o)
    obj = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
    ref = (obj * m).sum() / m.sum()
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    check("d logp", d, lp.grad.numpy(), seed, tol=1e-12)
    want = float((((ratio - 1).abs() > clip).double() * m).sum() / m.sum())
    assert 0 < clipfrac < 1 and clipfrac == pytest.approx(want)


def test_value_loss_matches_torch():
    torch = pytest.importorskip("torch")
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    B, T, clip = 3, 11, 0.2
    mask = _span_mask(rng, B, T)
    old, ret = rng.standard_normal((B, T)), rng.standard_normal((B, T))
    vals = old + rng.standard_normal((B, T)) * 0.3
    loss, d, _ = ppo_value_loss(vals, old, ret, mask, clip)
    v = torch.tensor(vals, requires_grad=True)
    o, r, m = (torch.tensor(x) for x in (old, ret, mask))
    vclip = o + torch.clamp(v - o, -clip, clip)
    ref = 0.5 * (torch.maximum((v - r) ** 2, (vclip - r) ** 2) * m).sum() / m.sum()
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    check("d values", d, v.grad.numpy(), seed, tol=1e-12)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_a_direct_loop(gamma, lam):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    B, T = 5, 12
    mask = _span_mask(rng, B, T)
    rewards, values = rng.standard_normal((B, T)), rng.standard_normal((B, T))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        span = np.flatnonzero(mask[b])
        r, v = rewards[b, span], values[b, span]
        want = np.zeros(len(span))
        for t in range(len(span)):  # A_t = sum_k (gamma lam)^k delta_{t+k}, the definition
            for k in range(t, len(span)):
                v_next = v[k + 1] if k + 1 < len(span) else 0.0
                want[t] += (gamma * lam) ** (k - t) * (r[k] + gamma * v_next - v[k])
        check(f"advantages row {b}", adv[b, span], want, seed, tol=1e-12)
        check(f"returns row {b}", ret[b, span], want + v, seed, tol=1e-12)
        assert not adv[b, mask[b] == 0].any() and not ret[b, mask[b] == 0].any()
    w = whiten(adv, mask)
    sel = mask > 0
    assert abs(w[sel].mean()) < 1e-9 and w[sel].std() == pytest.approx(1.0, rel=1e-6)
    assert not whiten(np.zeros((2, 3)), np.ones((2, 3))).any()  # all-zero stays zero


def test_zero_advantage_step_leaves_the_policy_unchanged(policy_dir):
    """Zero score and zero KL (the policy is its own reference) with values starting at zero:
    every advantage is exactly 0, so the policy's gradient is 0 and AdamW without weight decay
    (PPO's default) does not move a single bit."""
    before = GPT.from_pretrained(policy_dir).state_dict()
    r = ppo(policy=policy_dir, prompts=["a", "bc", "def", "g"], reward_fn=lambda p, c: np.zeros(len(p)),
            out=None, steps=1, batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6,
            lr=1e-2, progress=False)
    h = r["history"][0]
    assert h["kl"] == 0.0 and h["reward"] == 0.0 and h["policy_loss"] == 0.0
    after = r["model"].state_dict()
    for k, v in before.items():
        assert np.array_equal(v, after[k]), k


def test_ptx_alone_moves_the_policy(policy_dir, corpus):
    """With zero advantages the only gradient is PPO-ptx's LM loss on the pre-training shards
    (a `gptcore prepare` directory): the policy moves, and the LM loss is logged."""
    before = GPT.from_pretrained(policy_dir).state_dict()
    r = ppo(policy=policy_dir, prompts=["a", "b"], reward_fn=lambda p, c: np.zeros(len(p)),
            out=None, steps=1, batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=4,
            ptx_coef=0.5, ptx_data=corpus, ptx_seq_len=16, lr=1e-3, progress=False)
    assert np.isfinite(r["history"][0]["ptx_loss"])
    after = r["model"].state_dict()
    assert not np.array_equal(before["wte"], after["wte"])


def _digits(prompts, completions):
    return np.array([sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions])


def test_ppo_raises_the_reward_at_a_bounded_kl(policy_dir, tmp_path):
    text = tmp_path / "ptx.txt"
    text.write_text("some plain text for the pre-training mix. " * 50)
    r = ppo(policy=policy_dir, prompts=[f"q{i}" for i in range(8)], reward_fn=_digits,
            metric_fn=lambda p, c: float(np.mean([any(ch.isdigit() for ch in x) for x in c])),
            out=str(tmp_path / "run"), steps=12, batch_size=16, minibatch_size=8, ppo_epochs=2,
            max_new_tokens=8, lr=1e-2, kl_coef=0.01, ptx_coef=0.05, ptx_data=str(text),
            ptx_seq_len=16, seed=0, progress=False)
    h = r["history"]
    first, last = np.mean([x["reward"] for x in h[:3]]), np.mean([x["reward"] for x in h[-3:]])
    assert last > first + 0.05, (first, last)
    assert h[-1]["kl"] > 0 and np.isfinite(h[-1]["kl"])
    for k in ("reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "true_rate",
              "ptx_loss", "tokens_per_s"):
        assert k in h[-1], k
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["value_init"] == "policy" and log[-1]["step"] == 12
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert samples and {"prompt", "completion", "score"} <= set(samples[0])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_stop_strings_end_completions(policy_dir):
    seen = []

    def reward(p, c):
        seen.extend(c)
        return np.zeros(len(p))

    ppo(policy=policy_dir, prompts=["x"], reward_fn=reward, out=None, steps=1, batch_size=16,
        minibatch_size=16, ppo_epochs=1, max_new_tokens=20, stop=["a", "b", "c", "d", "e"],
        progress=False, temperature=1.0)
    hits = [c for c in seen if any(s in c for s in "abcde")]
    assert hits
    for c in hits:  # a completion with a stop string ends right after the first one
        assert c[-1] in "abcde" and not any(s in c[:-1] for s in "abcde"), c


def test_bad_input(policy_dir, tmp_path):
    kw = dict(policy=policy_dir, out=None, steps=1, batch_size=2, minibatch_size=2,
              max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match=r"reward_fn: returned nan for rollout 1"):
        ppo(prompts=["a", "b"], reward_fn=lambda p, c: np.array([0.0, np.nan]), **kw)
    with pytest.raises(ValueError, match=r"reward_fn: expected 2 scores"):
        ppo(prompts=["a", "b"], reward_fn=lambda p, c: [1.0], **kw)
    with pytest.raises(ValueError, match=r"prompts\[1\]: the prompt is 46 tokens; with "
                                         r"max_new_tokens 4 it needs 50 positions.*context of 48"):
        ppo(prompts=["a", "x" * 46], reward_fn=_digits, **kw)
    other = tmp_path / "other"
    GPT(GPTConfig(**{**TINY, "vocab_size": 300})).save_pretrained(str(other))
    with pytest.raises(ValueError, match="ref: its vocabulary has 300 tokens, the policy's 257"):
        ppo(prompts=["a"], reward_fn=_digits, ref=str(other), **kw)
    with pytest.raises(ValueError, match="reward_model: expected a reward model directory"):
        ppo(prompts=["a"], **kw)
    with pytest.raises(ValueError, match="ptx_data"):
        ppo(prompts=["a"], reward_fn=_digits, ptx_coef=0.1, **kw)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected an object with a string 'prompt'"):
        ppo(prompts=str(bad), reward_fn=_digits, **kw)


def test_cli(policy_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "cli"
    rc = main(["ppo", "--policy", policy_dir, "--reward-model", str(tmp_path / "no-rm"),
               "--prompts", str(prompts), "--out", str(out), "--no-progress"])
    assert rc == 2 and "no-rm" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a run that could not start
    # a real (tiny) reward model, trained by `gptcore reward-train`'s API
    from gptcore.train.reward import train_reward

    ranks = tmp_path / "ranks.jsonl"
    ranks.write_text("".join(json.dumps({"prompt": f"q{i}", "ranked": ["123", "abc", "xyz"]}) + "\n"
                             for i in range(4)))
    train_reward(data=str(ranks), base=policy_dir, out=str(tmp_path / "rm"), val_fraction=0.0,
                 progress=False)
    rc = main(["ppo", "--policy", policy_dir, "--reward-model", str(tmp_path / "rm"),
               "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--batch-size", "4",
               "--minibatch-size", "2", "--max-new-tokens", "6", "--stop", "\\n", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["value_init"] == "reward model" and log[0]["ppo_config"]["stop"] == ["\n"]
    assert [r["step"] for r in log[1:]] == [1, 2] and all(np.isfinite(r["reward"]) for r in log[1:])
    assert (out / "model" / "model.safetensors").is_file()
