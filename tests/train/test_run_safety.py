"""What a training run does with a bad setting, a full disk, a diverging loss, an existing run
directory, an interruption, or a machine too small for it: a clear message, nothing lost."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptcore import data as gd
from gptcore.models import GPTConfig
from gptcore.models.gpt import GPT, training_memory
from gptcore.train import TrainingDiverged, load_checkpoint, train
from gptcore.train import pretrain
from gptcore.train._run import check_memory

from .test_train import run_cfg


def _strict_json_lines(path):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name} in {path}")

    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_settings_that_cannot_work_are_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="warmup: 20 warmup steps are more than the run's 8"):
        train(run_cfg(corpus, tmp_path / "a", warmup=20))
    with pytest.raises(ValueError, match=r"min_lr_ratio: .* \[0, 1\], got 1.5"):
        train(run_cfg(corpus, tmp_path / "b", min_lr_ratio=1.5))
    with pytest.raises(ValueError, match="continued or replaced"):
        train(run_cfg(corpus, tmp_path / "c", resume=True, overwrite=True))
    assert not any(os.path.exists(tmp_path / n) for n in "abc")
    # the default warmup fits a short run
    assert len(train(run_cfg(corpus, tmp_path / "d", steps=3, warmup=None))["losses"]) == 3


def test_existing_run_is_neither_replaced_nor_mixed_silently(corpus, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(corpus, out, steps=4))
    before = (out / "log.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(run_cfg(corpus, out, steps=4))
    assert (out / "log.jsonl").read_bytes() == before
    res = train(run_cfg(corpus, out, steps=3, overwrite=True))
    assert res["steps"] == 3 and load_checkpoint(str(out / "checkpoint"))["state"]["step"] == 3
    assert [r["step"] for r in _strict_json_lines(out / "log.jsonl") if "loss" in r] == [1, 2, 3]


def test_resume_after_a_kill_between_saves_logs_each_step_once(corpus, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(corpus, out, stop_after=3))  # checkpoint at step 3
    log = out / "log.jsonl"
    # a run killed after step 5 logged steps 4 and 5 (and half a line) past its checkpoint
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0})
                + "\n" + '{"step": 6, "lo')
    train(run_cfg(corpus, out, resume=True))
    steps = [r["step"] for r in _strict_json_lines(log) if "loss" in r]
    assert steps == list(range(1, 9))
    assert all(r["loss"] != 9.0 for r in _strict_json_lines(log) if "loss" in r)


def test_extending_a_run_says_how_the_schedule_changes(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(run_cfg(corpus, out, steps=4, schedule="cosine"))
    capsys.readouterr()
    res = train(run_cfg(corpus, out, resume=True, steps=8))
    err = capsys.readouterr().err
    assert res["steps"] == 8
    assert "planned for 4 steps" in err and "now laid over 8 steps" in err


def test_validation_split_shorter_than_one_sequence_is_refused(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    for p in gd.shard_paths(str(data), "val"):
        os.remove(p)
    gd.write_shard(str(data / "val_000000.bin"), np.arange(20, dtype=np.uint16))
    with pytest.raises(ValueError, match="validation split .*20 tokens.* seq_len \\+ 1 = 33"):
        train(run_cfg(str(data), tmp_path / "run", seq_len=32))
    assert not os.path.exists(tmp_path / "run")


def test_a_failed_save_is_reported_and_training_goes_on(corpus, tmp_path, monkeypatch, capsys):
    real = pretrain.save_checkpoint
    calls = []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(pretrain, "save_checkpoint", flaky)
    res = train(run_cfg(corpus, tmp_path / "run", progress=True))  # saves at 3, 6 and 8
    assert res["steps"] == 8 and len(calls) == 3
    shown = capsys.readouterr()
    assert "could not save the checkpoint" in shown.out + shown.err
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint"))["state"]["step"] == 8

    def full(path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrain, "save_checkpoint", full)
    with pytest.raises(RuntimeError, match="step 8: could not save the checkpoint.*no checkpoint"):
        train(run_cfg(corpus, tmp_path / "run2"))


@pytest.mark.parametrize("value, where", [
    (np.nan, "parameter 'h.1.mlp.c_fc.weight'"),
    # finite weights whose product overflows: the first inf is made in block 0's fc GEMM
    (3e38, "block 0's activation 'fc_pre'"),
])
def test_a_diverging_run_stops_before_the_update_and_names_where(corpus, tmp_path, monkeypatch,
                                                                 value, where):
    name = "h.1.mlp.c_fc.weight" if np.isnan(value) else "h.0.mlp.c_fc.weight"
    made = []
    real_gpt = pretrain.GPT

    def keep(*a, **k):
        made.append(real_gpt(*a, **k))
        return made[-1]

    monkeypatch.setattr(pretrain, "GPT", keep)

    def on_step(record):
        if record["step"] == 4:
            made[0].parameters()[name].numpy()[...] = value

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(run_cfg(corpus, out), on_step=on_step)
    msg = str(e.value)
    assert msg.startswith("step 5: ") and where in msg and "holds step 3" in msg
    records = _strict_json_lines(out / "log.jsonl")  # strict JSON: no NaN / Infinity
    assert records[-1]["error"] == msg and records[-1]["loss"] is None
    assert load_checkpoint(str(out / "checkpoint"))["state"]["step"] == 3


def test_init_from_starts_new_data_from_trained_weights(corpus, tmp_path):
    base = train(run_cfg(corpus, tmp_path / "base", steps=20, eval_every=0))
    ck = str(tmp_path / "base" / "checkpoint")
    res = train(run_cfg(corpus, tmp_path / "next", steps=2, eval_every=0, preset="mini",
                        init_from=ck, lr=0.0))
    fresh = train(run_cfg(corpus, tmp_path / "fresh", steps=2, eval_every=0))
    # lr 0: the first losses are the trained model's, well below a fresh model's
    assert res["losses"][0] < fresh["losses"][0] - 0.5
    assert abs(res["losses"][0] - base["losses"][-1]) < 0.3
    assert res["model"].config.n_embd == base["model"].config.n_embd
    with pytest.raises(ValueError, match="architecture comes from .*n_layer"):
        train(run_cfg(corpus, tmp_path / "bad", init_from=ck, model_overrides={"n_layer": 3}))


@pytest.mark.parametrize("prenorm", [True, False])
def test_memory_estimate_matches_the_buffers_and_refuses_what_cannot_fit(prenorm):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100, prenorm=prenorm)
    est = training_memory(cfg, 4, 32)
    model = GPT(cfg)
    x = np.zeros((4, 32), np.int64)
    model.forward(x, x)
    model.backward()
    ws = model._workspace(4, 32)  # the cached workspace of that shape
    held = [ws.x0, ws.scratch, ws.losses, ws._logits, *ws._grad, ws.dfc, ws.dqkv,
            *ws.final.values(), *(t for layer in ws.layers for t in layer.values())]
    unique = {t.data_ptr(): t.nbytes for t in held}  # GPT-1's final["x"] is its last block's output
    assert est["activations"] == sum(unique.values())
    assert est["params"] == sum(p.nbytes for p in model.parameters().values())
    huge = GPTConfig(n_layer=100000, n_head=4, n_embd=128, block_size=128, vocab_size=256)
    with pytest.raises(MemoryError, match=r"needs about .* GiB .*available"):
        check_memory(huge, 16, 128, "float32", "cpu")


@pytest.mark.parametrize("flag", [["--n-layer", "100000"], ["--batch-size", "100000"],
                                  ["--block-size", "1000000000", "--seq-len", "64"]])
def test_cli_refuses_a_run_that_cannot_fit_at_once(corpus, tmp_path, flag):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "gptcore.cli", "train", "--data", corpus, "--out",
                        str(tmp_path / "run"), "--no-progress", *flag],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "GiB" in p.stderr and "available" in p.stderr
    assert time.monotonic() - t0 < 60


def test_ctrl_c_stops_with_a_checkpoint_and_status_130(corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "train", "--data", corpus,
                             "--preset", "tiny", "--steps", "100000", "--eval-every", "0",
                             "--batch-size", "2", "--seq-len", "16", "--out", str(out),
                             "--no-progress", "--sample-tokens", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            log = out / "log.jsonl"
            if log.exists() and log.read_text().count("\n") >= 3:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    step = load_checkpoint(str(out / "checkpoint"))["state"]["step"]
    assert step >= 3 and math.isfinite(step)


# ---- the same guarantees in fine-tuning (gptcore.train.finetune shares train._run) -------------


def _finetune_setup(tmp_path):
    from .test_finetune import letters_task, tiny_base, write_jsonl

    tr = write_jsonl(tmp_path / "tr.jsonl", letters_task(np.random.default_rng(3), 40))
    ckpt = str(tmp_path / "base")
    tiny_base()[0].save_pretrained(ckpt)
    return dict(task="classify", train=tr, checkpoint=ckpt, lr=3e-3, epochs=2, batch_size=8,
                progress=False)


def test_finetune_refuses_an_existing_run_and_resumes_its_log_once(tmp_path):
    from gptcore.train.finetune import finetune

    kw = _finetune_setup(tmp_path)
    out = tmp_path / "ft"
    finetune(out=str(out), stop_after=3, **kw)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        finetune(out=str(out), **kw)
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:  # killed after step 4: logged, unsaved
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    finetune(out=str(out), resume=True, progress=False)
    steps = [r["step"] for r in _strict_json_lines(out / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, 11))
    assert finetune(out=str(out), overwrite=True, **kw)["steps"] == 10


def test_finetune_stops_on_a_non_finite_loss_and_survives_a_failed_save(tmp_path, monkeypatch):
    from gptcore.train import finetune as ft

    kw = _finetune_setup(tmp_path)
    real = ft.TaskModel.save
    calls = []

    def flaky(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 1:  # the end-of-epoch-1 checkpoint
            raise OSError(28, "No space left on device")
        return real(self, path, *a, **k)

    monkeypatch.setattr(ft.TaskModel, "save", flaky)
    res = ft.finetune(out=str(tmp_path / "a"), **kw)
    assert res["steps"] == 10 and (tmp_path / "a" / "model" / "config.json").is_file()
    monkeypatch.setattr(ft.TaskModel, "save", real)

    real_step = ft.AdamW.step

    def poison(self, *a, **k):  # after step 3, the head's weights turn NaN
        norm = real_step(self, *a, **k)
        if self.t == 3:
            self.params[self.names.index("score.weight")].numpy()[...] = np.nan
        return norm

    monkeypatch.setattr(ft.AdamW, "step", poison)
    with pytest.raises(TrainingDiverged, match="step 4: the loss is nan; .*parameter 'score.weight'"):
        ft.finetune(out=str(tmp_path / "b"), **kw)
    assert _strict_json_lines(tmp_path / "b" / "log.jsonl")[-1]["loss"] is None
