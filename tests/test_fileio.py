"""Tests for gptcore._fileio.parse_json: every way a damaged or hostile JSON file can fail
becomes the caller's one error type, naming the file."""

from __future__ import annotations

import pytest

from gptcore._fileio import parse_json


class FileError(ValueError):
    pass


def test_parse_json_reads_json():
    assert parse_json(b'{"a": [1, 2.5, "x", null, true]}', "f") == {"a": [1, 2.5, "x", None, True]}
    assert parse_json('{"\\u00e9": 1}', "f") == {"é": 1}  # str input too


@pytest.mark.parametrize("data, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),          # RecursionError in json
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"a": ' + b"9" * 5000 + b"}", "digits"),                      # int() digit limit
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),                      # json keeps the last silently
    (b'{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b"[Infinity]", "Infinity is not JSON"),
    (b"[-Infinity]", "-Infinity is not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"{} trailing", "not JSON"),
])
def test_parse_json_hostile_input_gives_one_error(data, message):
    with pytest.raises(FileError, match=message) as e:
        parse_json(data, "some/file.json", FileError)
    assert str(e.value).startswith("some/file.json: ")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no json internals chained


def test_every_checkpoint_json_reader_refuses_deep_nesting(tmp_path):
    """Siblings of the safetensors header: config.json (transformers and gptcore's old native
    format), state.json, trainer_state.json and GPTConfig.from_json name the file, never
    RecursionError."""
    from gptcore.io import CheckpointError, load_pretrained
    from gptcore.models import GPT, GPTConfig
    from gptcore.train import load_checkpoint, recorded_tokenizer

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="config: .*nested too deeply"):
        GPTConfig.from_json(deep)
    ck = tmp_path / "ck"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)).save_pretrained(ck)
    (ck / "config.json").write_text(deep)
    with pytest.raises(CheckpointError, match="config.json.*nested too deeply"):
        load_pretrained(ck)
    native = tmp_path / "native"
    native.mkdir()
    for name in ("config.json", "model.npz", "optim.npz", "state.json"):
        (native / name).write_text(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_checkpoint(str(native))
    assert recorded_tokenizer(str(native)) is None


def test_jsonl_records_name_the_line_of_anything_wrong(tmp_path):
    """The one JSONL reader of task files (fine-tuning and evaluation): blank lines skipped,
    a bad line's error names file:line -- a non-UTF-8 line (it was a bare UnicodeDecodeError in
    the evaluation tasks' reader), hostile JSON, malformed JSON."""
    from gptcore._fileio import jsonl_records
    from gptcore.eval.tasks import load_task

    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"a": 1}\n\n  \n[2]\n')
    assert list(jsonl_records(p)) == [(1, {"a": 1}), (4, [2])]
    for bad, why in ((b"caf\xe9", "not UTF-8"), (b"[" * 100_000, "nested too deeply"),
                     (b'{"a": 1, "a": 2}', "twice|duplicate"), (b"{nope", "not JSON")):
        p.write_bytes(b'{"a": 1}\n' + bad + b"\n")
        with pytest.raises(ValueError, match=rf"t\.jsonl:2: .*({why})"):
            list(jsonl_records(p))
    p.write_bytes(b'{"kind": "multiple_choice", "name": "t"}\n' + b'{"context": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not UTF-8"):
        load_task(str(p))
