"""Supervised instruction tuning (gptcore.train.sft): the completion-only loss and its gradient
against transformers, learning, the output directory, resume, refusals, the CLI."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from gptcore.cli import main
from gptcore.data import ByteTokenizer, get_tokenizer
from gptcore.data.sft import SFTEncoder, collate_sft, parse_sft_record
from gptcore.generate.decode import complete
from gptcore.models import GPT, GPTConfig
from gptcore.train.checkpoint import checkpoint_tokenizer
from gptcore.train.sft import SFTConfig, sft

from tests.helpers import rel_err


def tiny_base(seed=1, block_size=64):
    cfg = GPTConfig.preset("tiny", n_embd=32, block_size=block_size)
    return GPT(cfg, seed=seed), get_tokenizer("byte")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def echo_task(rng, n):
    """"x=" -> "xxx": a completion the prompt determines."""
    return [{"prompt": f"{c}=", "completion": c * 3} for c in rng.choice(list("abcdefgh"), size=n)]


# ---- the loss against transformers ------------------------------------------------------------


def test_loss_is_the_completion_tokens_cross_entropy_as_transformers_computes_it(tmp_path):
    """The batched, padded loss equals a masked cross-entropy computed by transformers' GPT-2
    on each example alone (labels -100 on the prompt), tokens counted from the raw text; the
    gradients agree too."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tok = tiny_base(seed=3)
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"},
            {"prompt": "hi", "completion": " there, friend"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "dd"}]}]
    enc = SFTEncoder(tok, 64)
    batch = collate_sft([enc.encode(parse_sft_record(r, "t")) for r in rows], enc.pad_id)
    model.zero_grad()
    loss = model.forward(batch.ids, batch.targets)
    model.backward()
    grads = {k: np.array(v.numpy()) for k, v in model.grads().items()}

    model.save_pretrained(tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").float().eval()
    # the trained tokens from the text alone (byte tokens; 256 ends each example)
    seqs, labels = [], []
    for r in rows:
        if "prompt" in r:
            parts = [(r["prompt"], False), (r["completion"], True)]
        else:
            parts = [("User: a\n", False), ("Assistant: ", False), ("b\n", True),
                     ("User: c\n", False), ("Assistant: ", False), ("dd\n", True)]
        ids, lab = [], []
        for text, trained in parts:
            b = list(text.encode())
            ids += b
            lab += b if trained else [-100] * len(b)
        seqs.append(ids + [256])
        labels.append(lab + [256])
    total, count = 0.0, 0
    for ids, lab in zip(seqs, labels):
        out = hf(torch.tensor([ids]), labels=torch.tensor([lab]))
        n = sum(x != -100 for x in lab[1:])  # transformers shifts: the first label is never used
        total = total + out.loss * n
        count += n
    ref = total / count
    ref.backward()
    assert count == batch.n_trained == 2 + 1 + 13 + 1 + 3 + 3 + 1
    assert abs(loss - ref.item()) < 1e-5 * ref.item()
    V = model.config.vocab_size
    assert rel_err(grads["wte"][:V], hf.transformer.wte.weight.grad.numpy()) < 1e-4
    assert rel_err(grads["wpe"], hf.transformer.wpe.weight.grad.numpy()) < 1e-4
    assert rel_err(grads["h.1.attn.c_proj.weight"],
                   hf.transformer.h[1].attn.c_proj.weight.grad.numpy().T) < 1e-4


def test_loss_equals_a_numpy_log_softmax_on_the_models_logits():
    model, tok = tiny_base(seed=5)
    enc = SFTEncoder(tok, 64)
    ex = [enc.encode(parse_sft_record({"prompt": "abc", "completion": "de"}, "t")),
          enc.encode(parse_sft_record({"prompt": "x", "completion": "yyyyyyy"}, "t"))]
    batch = collate_sft(ex, enc.pad_id)
    got = model.loss(batch.ids, batch.targets)
    nll = []
    for e in ex:  # each example alone, unpadded
        z = model.logits(e.ids[None, :-1])[0].astype(np.float64)
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        for t in range(1, len(e.ids)):
            if e.trained[t]:
                nll.append(-logp[t - 1, e.ids[t]])
    assert len(nll) == 3 + 8
    assert abs(got - np.mean(nll)) < 1e-5 * np.mean(nll)


# ---- learning, the output directory, resume ----------------------------------------------------


def test_learns_then_opens_like_any_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    data = write_jsonl(tmp_path / "d.jsonl", echo_task(rng, 256))
    r = sft(data=data, base=tiny_base(), out=str(tmp_path / "run"), lr=3e-3, epochs=4,
            progress=False)
    vals = [v["val_loss"] for v in r["val"]]
    assert len(vals) == 4 and vals[-1] < 0.5 * vals[0], vals  # 13 held-out examples
    assert r["fill"] > 0 and r["tokens_per_s"] > 0
    model, tok = r["model"], r["tokenizer"]
    text = complete(model, tok, "c=", max_new_tokens=6, temperature=0.0)
    assert text == "ccc", text  # and then the end-of-text token
    # model/ opens with GPT.from_pretrained and finds its byte tokenizer; so does sample
    back = GPT.from_pretrained(tmp_path / "run" / "model")
    ids = np.array([[99, 61, 99]])
    np.testing.assert_allclose(back.logits(ids), model.logits(ids), rtol=1e-5, atol=1e-5)
    assert isinstance(checkpoint_tokenizer(str(tmp_path / "run" / "model"), 257), ByteTokenizer)
    from gptcore.cli import sample as sample_cmd
    from gptcore.cli import build_parser

    out = io.StringIO()
    args = build_parser().parse_args(["sample", "--checkpoint", str(tmp_path / "run"),
                                      "--prompt", "e=", "--temperature", "0",
                                      "--max-new-tokens", "5"])
    assert sample_cmd.run(args, out=out) == 0 and out.getvalue() == "e=eee\n"
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["train_examples"] == 243 and log[0]["val_examples"] == 13


def test_resume_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(1)
    ckpt = str(tmp_path / "base")
    tiny_base()[0].save_pretrained(ckpt)  # vocab 257 -> the byte tokenizer
    data = write_jsonl(tmp_path / "d.jsonl", echo_task(rng, 40))
    kw = dict(data=data, base=ckpt, lr=3e-3, epochs=3, batch_size=8, dropout=0.1, progress=False)
    full = sft(out=str(tmp_path / "full"), **kw)
    part = sft(out=str(tmp_path / "part"), stop_after=7, **kw)
    assert part["stopped_early"] and part["steps"] == 7
    assert not os.path.exists(tmp_path / "part" / "model")
    rest = sft(out=str(tmp_path / "part"), resume=True, progress=False)
    assert rest["steps"] == full["steps"] == 15
    assert part["losses"] + rest["losses"] == full["losses"]
    assert rest["val_loss"] == full["val_loss"]


def test_refusals(tmp_path):
    rng = np.random.default_rng(2)
    data = write_jsonl(tmp_path / "d.jsonl", echo_task(rng, 8))
    with pytest.raises(ValueError, match="base: expected the pre-trained model"):
        sft(data=data, out=None, progress=False)
    with pytest.raises(ValueError, match=r"batch_size: expected an int >= 1"):
        sft(data=data, base=tiny_base(), batch_size=0, out=None, progress=False)
    with pytest.raises(ValueError, match="resume and overwrite"):
        sft(out=str(tmp_path / "r"), resume=True, overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no `gptcore sft` checkpoint"):
        sft(out=str(tmp_path / "nothing"), resume=True, progress=False)
    long = write_jsonl(tmp_path / "l.jsonl", echo_task(rng, 3) + [{"prompt": "p" * 40,
                                                                   "completion": "x"}])
    with pytest.raises(ValueError, match=r"l\.jsonl:4: the prompt is 40 tokens.*context of 32"):
        sft(data=long, base=tiny_base(block_size=32), out=str(tmp_path / "o"), progress=False)
    assert not os.path.exists(tmp_path / "o")
    small = GPT(GPTConfig.preset("tiny", n_embd=32, block_size=64, vocab_size=100))
    with pytest.raises(ValueError, match=r"d\.jsonl:1: token id \d+ is outside the model's "
                                         "vocabulary of 100"):
        sft(data=data, base=(small, get_tokenizer("byte")), out=str(tmp_path / "o"),
            progress=False)
    sft(data=data, base=tiny_base(), out=str(tmp_path / "run"), epochs=1, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        sft(data=data, base=tiny_base(), out=str(tmp_path / "run"), progress=False)
    r = sft(SFTConfig(data=data, base=tiny_base(), out=str(tmp_path / "run"), epochs=1,
                      progress=False), overwrite=True)
    assert r["steps"] == 1


def test_cli_sft_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(3)
    ckpt = str(tmp_path / "base")
    tiny_base()[0].save_pretrained(ckpt)
    data = write_jsonl(tmp_path / "d.jsonl", echo_task(rng, 32))
    out = str(tmp_path / "run")
    assert main(["sft", "--data", data, "--base", ckpt, "--out", out, "--epochs", "1",
                 "--lr", "1e-3", "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    assert main(["sample", "--checkpoint", out, "--prompt", "a=", "--max-new-tokens", "3",
                 "--seed", "0"]) == 0
    capsys.readouterr()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"},
                                               {"messages": [{"role": "user", "content": "x"}]}])
    assert main(["sft", "--data", bad, "--base", ckpt, "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gptcore sft: error:" in err and "bad.jsonl:2: 'messages' has no assistant turn" in err
    assert not os.path.exists(tmp_path / "x")
    assert main(["sft", "--base", ckpt, "--no-progress"]) == 2
    assert "--data: required" in capsys.readouterr().err
