"""SFT data (gptcore.data.sft): records, the template, the loss mask, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcore.data import get_tokenizer
from gptcore.data.sft import (
    SFTEncoder,
    chat_prompt,
    collate_sft,
    length_batches,
    parse_sft_record,
    read_sft,
    render_messages,
)
from gptcore.tokenizer import Tokenizer


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def test_template_renders_messages_as_documented():
    segs = render_messages(CHAT["messages"])
    assert "".join(t for t, _ in segs) == ("Be brief.\n\nUser: Hi\nAssistant: Hello.\n"
                                           "User: 2+2?\nAssistant: 4\n")
    assert [t for t, tr in segs if tr] == ["Hello.\n", "4\n"]
    ex = parse_sft_record(CHAT, "f:1")
    assert ex.prompt == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: 2+2?\nAssistant: "
    assert ex.completion == "4\n"
    assert chat_prompt(CHAT["messages"][:4]) == ex.prompt
    pc = parse_sft_record({"prompt": "Q: x\nA:", "completion": " y", "id": 7}, "f:2")
    assert (pc.prompt, pc.completion, pc.text) == ("Q: x\nA:", " y", "Q: x\nA: y")


def test_loss_mask_covers_completion_and_end_of_text_only():
    tok = get_tokenizer("byte")
    enc = SFTEncoder(tok, n_ctx=64)
    e = enc.encode(parse_sft_record({"prompt": "ab", "completion": "cd"}, "x"))
    assert e.ids.tolist() == [97, 98, 99, 100, 256]
    assert e.trained.tolist() == [False, False, True, True, True]
    assert e.prompt_len == 2 and not e.truncated
    # multi-turn: both assistant contents and the final end-of-text are trained, nothing else
    e = enc.encode(parse_sft_record(CHAT, "x"))
    text = bytes(int(i) for i in e.ids[e.trained] if i < 256).decode()
    assert text == "Hello.\n4\n" and e.ids[-1] == 256 and e.trained[-1]
    # a conversation that ends with a user turn: its end-of-text is not trained
    e = enc.encode(parse_sft_record({"messages": CHAT["messages"][:4]}, "x"))
    assert not e.trained[-1]


def test_bpe_encodes_each_part_on_its_own():
    tok = Tokenizer.gpt2()
    enc = SFTEncoder(tok, n_ctx=64)
    ex = parse_sft_record({"prompt": "Hello", "completion": " world<|endoftext|>"}, "x")
    e = enc.encode(ex)
    p, c = tok.encode_ordinary("Hello"), tok.encode_ordinary(" world<|endoftext|>")
    assert e.ids.tolist() == p + c + [tok.eot_token]  # special-token text in data is ordinary
    assert e.trained.tolist() == [False] * len(p) + [True] * (len(c) + 1)


def test_truncation_and_a_prompt_that_fills_the_context():
    enc = SFTEncoder(get_tokenizer("byte"), n_ctx=8)
    e = enc.encode(parse_sft_record({"prompt": "abc", "completion": "defghijkl"}, "x"))
    assert len(e.ids) == 9 and e.truncated and e.trained.sum() == 6
    with pytest.raises(ValueError, match=r"f\.jsonl:3: the prompt is 9 tokens.*context of 8"):
        enc.encode(parse_sft_record({"prompt": "a" * 9, "completion": "b"}, "f.jsonl:3"))
    ids, cut = enc.sequence("abc", "defghijkl", "r:1")
    assert len(ids) == 8 and cut
    with pytest.raises(ValueError, match=r"r:2: the prompt is 8 tokens"):
        enc.sequence("a" * 8, "b", "r:2")


def test_collate_shifts_pads_and_ignores():
    enc = SFTEncoder(get_tokenizer("byte"), n_ctx=64)
    a = enc.encode(parse_sft_record({"prompt": "ab", "completion": "c"}, "x"))
    b = enc.encode(parse_sft_record({"prompt": "a", "completion": "bcdef"}, "x"))
    batch = collate_sft([a, b], enc.pad_id, multiple=8)
    assert batch.ids.shape == (2, 8) and batch.lengths.tolist() == [3, 6]
    assert batch.ids[0].tolist() == [97, 98, 99] + [256] * 5
    assert batch.targets[0].tolist() == [-1, 99, 256] + [-1] * 5
    assert batch.targets[1].tolist() == [98, 99, 100, 101, 102, 256, -1, -1]
    assert batch.n_trained == 8 and batch.fill == 9 / 16


def test_length_batches_cover_every_example_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    a = length_batches(lengths, 16, seed=3, epoch=1)
    assert len(a) == -(-1000 // 16)
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    assert [len(x) for x in a].count(16) == len(a) - 1  # 1000 = 62 x 16 + 8
    b = length_batches(lengths, 16, seed=3, epoch=1)
    assert all((x == y).all() for x, y in zip(a, b))  # a function of its arguments
    assert not all((x == y).all() for x, y in zip(a, length_batches(lengths, 16, 3, 2)))
    padded = sum(len(x) * lengths[x].max() for x in a)
    rand = np.random.default_rng(1).permutation(1000)
    padded_random = sum(16 * lengths[rand[i:i + 16]].max() for i in range(0, 1000, 16))
    assert padded < 0.7 * padded_random


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "a"}', r"f\.jsonl:2: missing field 'completion'"),
    ('{"prompt": 3, "completion": "b"}', r":2: 'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": ""}', r":2: 'completion' is empty"),
    ('{"messages": []}', r":2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r":2: messages\[0\]: 'role' must be one of"),
    ('{"messages": [{"role": "user", "content": 1}]}', r":2: messages\[0\]: 'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r":2: 'messages' has no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "x"}], "prompt": "a"}', r":2: give either"),
    ('[1, 2]', r":2: expected a JSON object, got list"),
    ('{"prompt": "a", ', r"f\.jsonl:2: not JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, line, match):
    (tmp_path / "f.jsonl").write_text('{"prompt": "ok", "completion": "yes"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_sft(str(tmp_path / "f.jsonl"))


def test_empty_file_and_good_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no demonstrations"):
        read_sft(str(tmp_path / "e.jsonl"))
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": "b"}, CHAT])
    exs = read_sft(path)
    assert [e.where for e in exs] == [f"{path}:1", f"{path}:2"]
