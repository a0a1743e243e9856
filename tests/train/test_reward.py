"""The reward model (gptcore.train.reward): the pairwise loss and the whole step's gradients
against PyTorch + transformers, learning a ranking, normalisation, one batch per ranking, bad
input, NaN rewards, resume, the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gptcore.cli import main
from gptcore.data import get_tokenizer
from gptcore.data.preference import parse_ranking
from gptcore.models import GPT, GPTConfig
from gptcore.train import TrainingDiverged
from gptcore.train.reward import (
    RewardConfig,
    RewardModel,
    _encode_all,
    _new_reward_model,
    _pairs_of,
    load_reward_model,
    loss_and_backward,
    pair_accuracy,
    pairwise_loss,
    train_reward,
)

from tests.helpers import rel_err


def tiny_base(seed=1, block_size=64):
    cfg = GPTConfig.preset("tiny", n_embd=32, block_size=block_size)
    return GPT(cfg, seed=seed), get_tokenizer("byte")


def z_rankings(rng, n, k=3):
    """Answers that differ only in how many z's end them; more z's rank higher."""
    rows = []
    for i in range(n):
        s = "".join(rng.choice(list("abcdefgh"), size=int(rng.integers(2, 7))))
        rows.append({"prompt": f"q{i}:", "ranked": [s + "z" * (k - 1 - i) for i in range(k)]})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---- the loss against PyTorch -----------------------------------------------------------------


def test_pairwise_loss_and_gradient_equal_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    rb = rng.standard_normal(50) * 3
    rw = rng.standard_normal(50) * 3
    rb[:3], rw[:3] = [60.0, -60.0, 0.0], [-60.0, 60.0, 0.0]  # saturated and tied pairs
    loss, db, dw = pairwise_loss(rb, rw)
    tb = torch.tensor(rb, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(rw, dtype=torch.float64, requires_grad=True)
    ref = -torch.nn.functional.logsigmoid(tb - tw).mean()
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * max(1.0, ref.item()), rng
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-12, atol=1e-300)
    assert np.isfinite(pairwise_loss([1e308], [-1e308])[0])


def test_pairwise_loss_refuses_nan_and_bad_shapes():
    with pytest.raises(ValueError, match=r"r_worse: reward nan at index 1 is not finite"):
        pairwise_loss([1.0, 2.0], [0.0, float("nan")])
    with pytest.raises(ValueError, match="r_better: reward inf"):
        pairwise_loss([float("inf")], [0.0])
    with pytest.raises(ValueError, match="non-empty 1-D arrays of one shape"):
        pairwise_loss([1.0, 2.0], [1.0])
    assert pair_accuracy([2.0, 1.0, 0.0], [1.0, 2.0, 0.0]) == 0.5  # right, wrong, tie


def test_a_training_step_equals_transformers_and_torch(tmp_path):
    """The whole step: every answer through the trunk once, the head on the last token, the
    loss over all C(K,2) pairs; the loss and gradients (head and trunk) against transformers'
    GPT-2 with the same head and loss written in torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    trunk, tok = tiny_base(seed=4)
    info = {"task": "reward", "n_ctx": 64, "eot": 256}
    rm = _new_reward_model(trunk, tok, RewardConfig(dropout=0.0, seed=5), info)
    w = rm.head.parameters()
    np.asarray(w["bias"].numpy())[:] = 0.3  # (CPU parameters: writable views)
    rankings = [parse_ranking({"prompt": "hello ", "ranked": ["world", "there", "you all", "x"]}, "a"),
                parse_ranking({"prompt": "2+2=", "chosen": "4", "rejected": "five"}, "b")]
    encoded, _ = _encode_all(rm, rankings)
    seqs, ib, iw = _pairs_of(encoded)
    assert len(seqs) == 6 and len(ib) == 6 + 1
    rm.model.zero_grad()
    loss, r = loss_and_backward(rm, seqs, ib, iw)
    grads = {k: np.array(v.numpy()) for k, v in rm.model.grads().items()}

    rm.model.save_pretrained(tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").float().eval()
    W = torch.tensor(np.array(w["weight"].numpy()), requires_grad=True)
    b = torch.tensor(np.array(w["bias"].numpy()), requires_grad=True)
    rewards = []
    for s in seqs:  # one unpadded sequence at a time: padding must not matter
        h = hf(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1]
        rewards.append((h @ W.T + b)[0])
    rt = torch.stack(rewards)
    ref = -torch.nn.functional.logsigmoid(rt[torch.tensor(ib)] - rt[torch.tensor(iw)]).mean()
    ref.backward()
    np.testing.assert_allclose(r, rt.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert abs(loss - ref.item()) < 1e-5
    assert rel_err(grads["reward.weight"], W.grad.numpy()) < 1e-4
    np.testing.assert_allclose(grads["reward.bias"], b.grad.numpy(), atol=1e-6)
    V = rm.model.config.vocab_size
    assert rel_err(grads["wte"][:V], hf.transformer.wte.weight.grad.numpy()) < 1e-4
    assert rel_err(grads["h.0.attn.c_attn.weight"],
                   hf.transformer.h[0].attn.c_attn.weight.grad.numpy().T) < 1e-4
    assert rel_err(grads["h.1.mlp.c_proj.weight"],
                   hf.transformer.h[1].mlp.c_proj.weight.grad.numpy().T) < 1e-4


# ---- learning, normalisation, saving -----------------------------------------------------------


def test_learns_a_ranking_then_normalises_saves_and_reloads(tmp_path):
    rng = np.random.default_rng(0)
    data = write_jsonl(tmp_path / "r.jsonl", z_rankings(rng, 160))
    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}:", "completion": "abzz"}
                                               for i in range(5)])
    r = train_reward(data=data, base=tiny_base(), demos=demos, out=str(tmp_path / "rm"),
                     lr=2e-3, epochs=3, batch_size=8, progress=False)
    assert r["val_accuracy"] >= 0.9, r["val"]  # chance: 0.5; 16 held-out prompts, 48 pairs
    assert r["val"][-1]["val_pairs"] == 48
    rm = r["model"]
    assert isinstance(rm, RewardModel)
    # the demonstrations average 0 after the shift, which the head's bias holds
    demo_scores = rm.score([f"q{i}:" for i in range(5)], ["abzz"] * 5)
    assert abs(float(demo_scores.mean())) < 1e-4
    assert rm.info["normalization"]["source"] == "demos" and rm.info["normalization"]["n"] == 5
    back = load_reward_model(tmp_path / "rm")
    prompts, answers = ["q1:", "q2:", "q3:"], ["abz", "ab", "hhhhzz"]
    np.testing.assert_allclose(back.score(prompts, answers), rm.score(prompts, answers),
                               rtol=1e-5, atol=1e-6)
    assert back.info["normalization"] == rm.info["normalization"]
    rm.save(tmp_path / "copy")  # RewardModel.save: a directory load_reward_model reads
    again = load_reward_model(tmp_path / "copy")
    np.testing.assert_array_equal(again.score(prompts, answers), back.score(prompts, answers))
    s = back.score(["q9:"] * 3, ["cdzz", "cdz", "cd"])
    assert s.dtype == np.float32 and s[0] > s[1] > s[2]
    log = [json.loads(x) for x in open(tmp_path / "rm" / "log.jsonl")]
    assert sum("loss" in x for x in log) == r["steps"] == 3 * 18


def test_without_demos_the_chosen_answers_average_zero(tmp_path):
    rng = np.random.default_rng(1)
    rows = z_rankings(rng, 24)
    r = train_reward(data=write_jsonl(tmp_path / "r.jsonl", rows), base=tiny_base(), out=None,
                     lr=1e-3, batch_size=4, progress=False)
    rm = r["model"]
    best = rm.score([x["prompt"] for x in rows], [x["ranked"][0] for x in rows])
    assert abs(float(best.mean())) < 1e-4 and r["normalization"]["source"] == "chosen"
    assert r["normalization"]["shift"] != 0.0


def test_all_pairs_of_a_prompt_share_a_batch_and_each_answer_runs_once(tmp_path, monkeypatch):
    rows = z_rankings(np.random.default_rng(2), 10, k=4)
    seen = []
    real = GPT.hidden_states

    def spy(self, idx):
        if self.training:
            seen.append(np.asarray(idx).shape[0])
        return real(self, idx)

    monkeypatch.setattr(GPT, "hidden_states", spy)
    r = train_reward(data=write_jsonl(tmp_path / "r.jsonl", rows), base=tiny_base(), out=None,
                     val_fraction=0.0, batch_size=3, progress=False)
    assert r["steps"] == 4 and seen == [12, 12, 12, 4]  # 3 rankings of 4 answers, then 1


# ---- bad input and NaN rewards -----------------------------------------------------------------


def test_a_prompt_longer_than_the_context_names_its_line(tmp_path):
    rows = z_rankings(np.random.default_rng(3), 4)
    rows.insert(2, {"prompt": "x" * 40, "ranked": ["a", "b"]})
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(ValueError, match=r"r\.jsonl:3: the prompt is 40 tokens.*context of 32"):
        train_reward(data=path, base=tiny_base(block_size=32), out=str(tmp_path / "o"),
                     progress=False)
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written
    rm = _new_reward_model(*tiny_base(block_size=32), RewardConfig(), {"n_ctx": 32, "eot": 256})
    with pytest.raises(ValueError, match=r"prompts\[1\]: the prompt is 33 tokens"):
        rm.score(["a", "b" * 33], ["x", "y"])
    with pytest.raises(ValueError, match="the same length"):
        rm.score(["a"], ["x", "y"])
    with pytest.raises(TypeError, match=r"completions\[0\]: expected str"):
        rm.score(["a"], [3])


def test_nan_rewards_are_clear_errors(tmp_path):
    model, tok = tiny_base()
    p = model.parameters()["ln_f.weight"]
    np.asarray(p.numpy())[:] = np.nan
    rm = _new_reward_model(model, tok, RewardConfig(), {"n_ctx": 64, "eot": 256})
    with pytest.raises(RuntimeError, match=r"reward of item 0 is nan .*damaged or it diverged"):
        rm.score(["a", "b"], ["x", "y"])
    rows = z_rankings(np.random.default_rng(4), 6)
    with pytest.raises(TrainingDiverged, match=r"a reward is NaN/inf.*ln_f\.weight"):
        train_reward(data=write_jsonl(tmp_path / "r.jsonl", rows), base=(model, tok),
                     out=str(tmp_path / "o"), progress=False)


def test_refusals(tmp_path):
    rows = z_rankings(np.random.default_rng(5), 6)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(ValueError, match="base: expected the language model"):
        train_reward(data=path, out=None, progress=False)
    with pytest.raises(ValueError, match="lr: expected a finite number >= 0"):
        train_reward(data=path, base=tiny_base(), out=None, lr=float("nan"), progress=False)
    small = GPT(GPTConfig.preset("tiny", n_embd=32, block_size=64, vocab_size=100))
    with pytest.raises(ValueError, match=r"r\.jsonl:1: token id \d+ is outside the model's "
                                         "vocabulary of 100"):
        train_reward(data=path, base=(small, get_tokenizer("byte")), out=None, progress=False)
    train_reward(data=path, base=tiny_base(), out=str(tmp_path / "rm"), progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_reward(data=path, base=tiny_base(), out=str(tmp_path / "rm"), progress=False)
    # a reward model is no base, on disk or in memory
    with pytest.raises(ValueError, match=r"holds task head\(s\) \['reward'\]"):
        train_reward(data=path, base=str(tmp_path / "rm"), out=None, progress=False)
    rm = load_reward_model(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"head\(s\) \['reward'\]; expected a language model"):
        train_reward(data=path, base=(rm.model, rm.tokenizer), out=None, progress=False)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    rows = z_rankings(np.random.default_rng(6), 40)
    ckpt = str(tmp_path / "base")
    tiny_base()[0].save_pretrained(ckpt)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    kw = dict(data=path, base=ckpt, lr=1e-3, epochs=2, batch_size=4, dropout=0.1, progress=False)
    full = train_reward(out=str(tmp_path / "full"), **kw)
    part = train_reward(out=str(tmp_path / "part"), stop_after=5, **kw)
    assert part["stopped_early"] and part["steps"] == 5
    rest = train_reward(out=str(tmp_path / "part"), resume=True, progress=False)
    assert rest["steps"] == full["steps"] == 18
    assert part["losses"] + rest["losses"] == full["losses"]
    assert rest["val_accuracy"] == full["val_accuracy"]


# ---- the CLI ----------------------------------------------------------------------------------


def test_cli_reward_train_then_score(tmp_path, capsys):
    rng = np.random.default_rng(7)
    ckpt = str(tmp_path / "base")
    tiny_base()[0].save_pretrained(ckpt)
    data = write_jsonl(tmp_path / "r.jsonl", z_rankings(rng, 30))
    out = str(tmp_path / "rm")
    assert main(["reward-train", "--data", data, "--base", ckpt, "--out", out, "--lr", "1e-3",
                 "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(out, "model", "config.json"))
    score_in = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "q1:", "completion": "abz"},
        {"prompt": "q2:", "ranked": ["ab", "abz", "abzz"]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    assert main(["reward-score", "--model", out, "--data", score_in,
                 "--output", str(tmp_path / "scores.jsonl")]) == 0
    got = [json.loads(x) for x in open(tmp_path / "scores.jsonl")]
    assert list(got[0]) == ["score"] and len(got[1]["scores"]) == 3 and list(got[2]) == ["score"]
    rm = load_reward_model(out)
    assert got[1]["scores"] == pytest.approx(rm.score(["q2:"] * 3, ["ab", "abz", "abzz"]).tolist(),
                                             abs=1e-6)
    assert "pair accuracy" in capsys.readouterr().err
    # bad input: exit status 2 and a message naming the line; nothing written
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "ranked": ["a", "b"]},
                                               {"prompt": "p", "ranked": ["only one"]}])
    assert main(["reward-train", "--data", bad, "--base", ckpt, "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gptcore reward-train: error:" in err and "bad.jsonl:2" in err
    assert not os.path.exists(tmp_path / "x")
    assert main(["reward-score", "--model", ckpt, "--data", score_in]) == 2
    assert "is not a reward model" in capsys.readouterr().err
