"""`gptcore finetune` and `gptcore predict`: a run from a saved checkpoint, predictions, resume,
and bad input that fails cleanly (exit code 2, file:line, no output left behind)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcore.cli import main
from gptcore.models import GPT, GPTConfig


def _rows(rng, n, labelled=True):
    out = []
    for _ in range(n):
        y = int(rng.integers(2))
        w = "".join(rng.choice(list("abcdefgh" if y else "stuvwxyz"), size=int(rng.integers(4, 12))))
        out.append({"premise": w, "hypothesis": w[::-1], **({"label": y} if labelled else {})})
    return out


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    ckpt = tmp_path / "pre"
    GPT(GPTConfig.preset("tiny", n_embd=32, block_size=64), seed=0).save_pretrained(ckpt)
    return (tmp_path, str(ckpt), _write(tmp_path / "train.jsonl", _rows(rng, 96)),
            _write(tmp_path / "val.jsonl", _rows(rng, 32)))


def test_finetune_then_predict(setup, capsys):
    tmp, ckpt, tr, va = setup
    out = tmp / "run"
    args = ["finetune", "--task", "entail", "--train", tr, "--val", va, "--checkpoint", ckpt,
            "--out", str(out), "--lr", "3e-3", "--epochs", "2", "--batch-size", "16",
            "--no-progress"]
    assert main(args + ["--stop-after", "3"]) == 0
    assert (out / "checkpoint").is_dir() and not (out / "model").exists()
    assert main(["finetune", "--out", str(out), "--resume", "--no-progress"]) == 0
    log = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    assert [r["epoch"] for r in log if "val_accuracy" in r] == [1, 2]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    assert cfg["gptcore"]["task"]["task"] == "entail"
    capsys.readouterr()
    # predictions: to a file (atomically) and to stdout; metrics on stderr with labels
    pred = tmp / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(out), "--input", va, "--output", str(pred)]) == 0
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(lines) == 32 and all(x["prediction"] in (0, 1) and len(x["scores"]) == 2
                                    for x in lines)
    assert "accuracy" in capsys.readouterr().err
    unl = _write(tmp / "unlabelled.jsonl", _rows(np.random.default_rng(1), 3, labelled=False))
    assert main(["predict", "--checkpoint", str(out / "model"), "--input", unl]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_bad_input_exits_2_naming_file_and_line_and_writes_nothing(setup, capsys):
    tmp, ckpt, tr, va = setup
    bad = _write(tmp / "bad.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}, "{not json"])
    out = tmp / "run"
    assert main(["finetune", "--task", "entail", "--train", bad, "--checkpoint", ckpt,
                 "--out", str(out), "--no-progress"]) == 2
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    assert not out.exists()
    unknown = _write(tmp / "v.jsonl", [{"premise": "a", "hypothesis": "b", "label": 7}])
    assert main(["finetune", "--task", "entail", "--train", tr, "--val", unknown,
                 "--checkpoint", ckpt, "--out", str(out), "--no-progress"]) == 2
    assert "v.jsonl:1: unknown label 7" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", "--train", tr, "--checkpoint", ckpt, "--no-progress"]) == 2
    assert "--task: required" in capsys.readouterr().err
    # predict with a language model (no task head), or on malformed input: nothing written
    pred = tmp / "pred.jsonl"
    assert main(["predict", "--checkpoint", ckpt, "--input", va, "--output", str(pred)]) == 2
    assert "no task head" in capsys.readouterr().err and not pred.exists()


def test_finetune_help_documents_the_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--task", "--train", "--val", "--checkpoint", "--out", "--resume", "--lm-weight",
                 "--lr", "6.25e-05", "--warmup", "--weight-decay", "--head-dropout", "choice"):
        assert flag in out, flag
