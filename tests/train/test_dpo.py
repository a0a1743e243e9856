"""DPO: the loss and its gradients against PyTorch autograd, training raising the
chosen-vs-rejected margin, bad input, and `gptcore dpo` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcore.cli import main
from gptcore.models.config import GPTConfig
from gptcore.models.gpt import GPT
from gptcore.train.dpo import DPOConfig, dpo, dpo_loss, load_pairs
from tests.helpers import check, fresh_seed

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny byte-level language model checkpoint (random weights: the SFT stand-in)."""
    path = tmp_path_factory.mktemp("policy") / "sft"
    GPT(GPTConfig(**TINY), seed=3).save_pretrained(str(path))
    return str(path)


def _pairs_file(path, n=12):
    """Chosen answers are digits, rejected ones letters: a preference a model can learn."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            good = "".join(rng.choice(list("0123456789"), 4))
            bad = "".join(rng.choice(list("abcdefghij"), 4))
            if i % 3 == 0:  # a ranking of three, expanded to three pairs
                f.write(json.dumps({"prompt": f"q{i}:", "ranked": [good, good[::-1] + "x", bad]}) + "\n")
            else:
                f.write(json.dumps({"prompt": f"q{i}:", "chosen": good, "rejected": bad}) + "\n")
    return str(path)


def test_dpo_loss_matches_torch():
    torch = pytest.importorskip("torch")
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    n, beta = 7, 0.37
    pw, pl, rw, rl = (rng.standard_normal(n) * 20 for _ in range(4))
    loss, dw, dl = dpo_loss(pw, pl, rw, rl, beta)
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (pw, pl, rw, rl)]
    z = beta * ((t[0] - t[2]) - (t[1] - t[3]))
    ref = -torch.nn.functional.logsigmoid(z).mean()
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    check("d pi_w", dw, t[0].grad.numpy(), seed, tol=1e-12)
    check("d pi_l", dl, t[1].grad.numpy(), seed, tol=1e-12)
    # extreme margins stay finite
    loss, dw, _ = dpo_loss(np.array([1e4]), np.array([-1e4]), np.zeros(1), np.zeros(1), 1.0)
    assert np.isfinite(loss) and np.isfinite(dw).all()


def test_dpo_raises_the_margin(tmp_path, policy_dir):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    r = dpo(data=data, val=data, policy=policy_dir, out=str(tmp_path / "run"), lr=3e-3,
            batch_size=8, epochs=4, warmup=1, beta=0.5, progress=False, seed=1)
    first, last = r["val"][0], r["val"][-1]
    assert len(load_pairs(data)) == 4 * 3 + 8
    assert r["history"][0]["margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert last["val_margin"] > first["val_margin"] + 0.5 and last["val_accuracy"] == 1.0
    assert last["val_loss"] < first["val_loss"]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert {"loss", "margin", "accuracy", "reward_chosen", "reward_rejected"} <= set(log[1])
    # the saved model is the tuned one: it prefers the chosen answers as training left it
    r2 = dpo(data=data, policy=str(tmp_path / "run"), ref=policy_dir, out=None, lr=0.0,
             batch_size=20, epochs=1, beta=0.5, progress=False)
    assert r2["history"][0]["margin"] == pytest.approx(last["val_margin"], rel=1e-3, abs=1e-4)


def test_precomputed_reference_gives_the_same_run(tmp_path, policy_dir):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    a = dpo(data=data, policy=policy_dir, out=None, lr=1e-3, batch_size=4, stop_after=3,
            progress=False)
    b = dpo(data=data, policy=policy_dir, out=None, lr=1e-3, batch_size=4, stop_after=3,
            precompute_ref=True, progress=False)
    for x, y in zip(a["history"], b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)


def test_bad_input(tmp_path, policy_dir):
    other = tmp_path / "other"
    GPT(GPTConfig(**{**TINY, "vocab_size": 300})).save_pretrained(str(other))
    data = _pairs_file(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match="ref: its vocabulary has 300 tokens, the policy's 257"):
        dpo(data=data, policy=policy_dir, ref=str(other), out=None, progress=False)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 70, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"long.jsonl:1: the prompt \(70 tokens\).*context of 64"):
        dpo(data=str(long), policy=policy_dir, out=None, progress=False)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "x", "ranked": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="one.jsonl:1: 'ranked' has 1 answer"):
        dpo(data=str(one), policy=policy_dir, out=None, progress=False)
    with pytest.raises(ValueError, match="beta: expected > 0"):
        dpo(data=data, policy=policy_dir, out=None, beta=0.0, progress=False)
    with pytest.raises(ValueError, match="pi_w, pi_l, ref_w, ref_l"):
        dpo_loss(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))
    run = tmp_path / "run"
    dpo(data=data, policy=policy_dir, out=str(run), stop_after=1, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        dpo(DPOConfig(data=data, policy=policy_dir, out=str(run), progress=False))


def test_cli(tmp_path, policy_dir, capsys):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "cli"
    rc = main(["dpo", "--data", data, "--policy", policy_dir, "--out", str(out), "--batch-size", "4",
               "--epochs", "1", "--beta", "0.2", "--precompute-ref", "--no-progress"])
    assert rc == 0
    assert (out / "model" / "model.safetensors").is_file()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["dpo_config"]["beta"] == 0.2 and log[-1]["step"] == 5
    rc = main(["dpo", "--data", str(tmp_path / "missing.jsonl"), "--policy", policy_dir,
               "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
