"""The `gptcore` command line: help texts, prepare, a tiny training run, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptcore.cli import main


def test_top_level_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "prepare" in out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "gptcore train" in capsys.readouterr().out


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--preset", "--data", "--device", "--dtype", "--steps", "--batch-size", "--seq-len",
                 "--lr", "--warmup", "--grad-accum", "--eval-every", "--out", "--resume", "--seed",
                 "gpt2-medium", "gpt3-175b", "examples"):
        assert flag in out, flag


def test_prepare_help(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "--out" in out and "--tokenizer" in out and "llm.c" in out


def test_module_entry_point_runs_as_a_process():
    r = subprocess.run([sys.executable, "-m", "gptcore.cli", "train", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--grad-accum" in r.stdout


def test_prepare_then_train_then_resume(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    data = tmp_path / "data"
    assert main(["prepare", str(text), "--out", str(data), "--tokenizer", "byte", "--no-progress"]) == 0
    assert "train" in capsys.readouterr().out
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(data), "--steps", "4", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--out", str(out),
            "--sample-tokens", "10", "--prompt", "the ", "--no-progress", "--seed", "3"]
    assert main(args + ["--stop-after", "2"]) == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--lr", "9"]) == 0
    captured = capsys.readouterr()
    assert "ignoring --lr" in captured.err
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["lr"] < 1 for r in records if "lr" in r), "resume must keep the checkpoint's lr"
    state = json.load(open(out / "checkpoint" / "trainer_state.json"))
    assert state["step"] == 4 and state["state"]["data_meta"]["tokenizer"] == "byte"


def test_train_prints_progress_and_sample(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abcabcabd " * 300)
    data = tmp_path / "data"
    main(["prepare", str(text), "--out", str(data), "--tokenizer", "byte", "--no-progress"])
    rc = main(["train", "--preset", "tiny", "--data", str(data), "--steps", "3", "--batch-size", "2",
               "--seq-len", "16", "--eval-every", "0", "--out", str(tmp_path / "r"),
               "--sample-tokens", "8", "--prompt", "abc"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "sample" in cap.out and "abc" in cap.out
    assert "val loss" in cap.out and "perplexity" in cap.out
    assert "train:" in cap.err and "tok/s" in cap.err and "loss" in cap.err  # the progress bar


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(tmp_path / "nothing"), "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "does not exist" in err and "gptcore prepare" in err
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "0"])
    assert e.value.code == 2
    assert ">= 1" in capsys.readouterr().err
    assert main(["train", "--preset", "gpt9", "--no-progress"]) == 2
    assert "unknown preset 'gpt9'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "gptcore-run")


def test_a_run_directory_is_a_checkpoint_everywhere_with_its_tokenizer(tmp_path, capsys):
    """`gptcore train`'s byte-level run saves its vocabulary (a BPE with no merges), so convert,
    sample, Tokenizer.load and transformers all open the run as it is."""
    from gptcore import Tokenizer

    src = tmp_path / "a.py"
    src.write_text("def f(x):\n    return x + 1\n" * 200)
    assert main(["prepare", str(src), "--out", str(tmp_path / "d"), "--tokenizer", "byte",
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--preset", "tiny", "--steps", "2",
                 "--eval-every", "0", "--seq-len", "16", "--batch-size", "2", "--out", str(run),
                 "--sample-tokens", "0", "--no-progress"]) == 0
    assert main(["convert", str(run), str(tmp_path / "conv")]) == 0
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    tok = Tokenizer.load(run / "checkpoint")
    text = "héllo wörld ✓ \U0001F600"
    assert tok.encode(text) == list(text.encode("utf-8")) and tok.eot_token == 256
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 256
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(run / "checkpoint"))
    assert hf_tok(text)["input_ids"] == list(text.encode("utf-8"))


def test_prepare_takes_directories_and_refuses_binary_files(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello world\n")
    (src / "sub" / "b.py").write_text("def f(): pass\n")
    (src / "sub" / "c.bin").write_bytes(b"x\x00y")
    (src / "sub" / "d.txt").write_bytes(b"caf\xe9")
    assert main(["prepare", str(src), "--out", str(tmp_path / "o"), "--tokenizer", "byte",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "from 2 files" in out and "skipped 2 binary or non-UTF-8 files" in out
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["documents"] == 2 and meta["skipped_files"] == 2
    for name, why in (("c.bin", "binary (a NUL byte at offset 1)"), ("d.txt", "not UTF-8 (byte 0xe9 at offset 3)")):
        assert main(["prepare", str(src / "a.txt"), str(src / "sub" / name), "--out",
                     str(tmp_path / "p"), "--no-progress"]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "p").exists()  # refused before anything is written
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    assert "holds no UTF-8 text files" in capsys.readouterr().err
