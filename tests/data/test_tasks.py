"""GPT-1's task formats and input transformations (gptcore.data.tasks)."""

import json

import pytest

from gptcore.data.tasks import (
    LabelSpace,
    TaskEncoder,
    check_examples,
    collate,
    read_jsonl,
)

SPECIALS = {"start": 257, "delim": 258, "extract": 259}
S, D, E = 257, 258, 259


def byte_encoder(task, n_ctx=64):
    return TaskEncoder(task, lambda t: list(t.encode("utf-8")), SPECIALS, n_ctx)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def test_transforms_on_known_strings():
    b = lambda s: list(s.encode())  # noqa: E731
    assert byte_encoder("classify").sequences({"text": "hi"}) == [[S, *b("hi"), E]]
    assert byte_encoder("entail").sequences({"premise": "ab", "hypothesis": "c"}) == \
        [[S, *b("ab"), D, *b("c"), E]]
    # similarity: both orders through the trunk
    assert byte_encoder("similar").sequences({"text_a": "x", "text_b": "yz"}) == \
        [[S, *b("x"), D, *b("yz"), E], [S, *b("yz"), D, *b("x"), E]]
    # multiple choice: one sequence per choice
    assert byte_encoder("choice").sequences({"context": "q", "choices": ["a", "bb", "c"]}) == \
        [[S, *b("q"), D, *b("a"), E], [S, *b("q"), D, *b("bb"), E], [S, *b("q"), D, *b("c"), E]]


def test_truncation_as_the_paper_and_counted():
    enc = byte_encoder("entail", n_ctx=16)  # each part keeps 16 // 2 - 2 = 6 tokens
    seq = enc.sequences({"premise": "abcdefghij", "hypothesis": "xyz"})[0]
    assert seq == [S, *b"abcdef", D, *b"xyz", E] and len(seq) <= 16
    assert enc.truncated == 1
    enc.sequences({"premise": "abcdef", "hypothesis": "uvwxyz"})  # exactly 6 each: not cut
    assert enc.truncated == 1
    one = byte_encoder("classify", n_ctx=16)  # a single text keeps n_ctx - 2
    assert one.sequences({"text": "a" * 20})[0] == [S, *(b"a" * 14), E]
    assert one.count_truncated([{"text": "a" * 14}, {"text": "a" * 15}, {"text": "b" * 40}]) == 2
    ch = byte_encoder("choice", n_ctx=16)  # one count per example, however many choices are cut
    assert ch.count_truncated([{"context": "c" * 9, "choices": ["a" * 9, "b"]}]) == 1


def test_collate_pads_right_with_lm_targets_and_extract_positions():
    b = collate([[1, 2, 3], [4, 5, 6, 7, 8]], group=1, pad_id=S, labels=[0, 1], multiple=4)
    assert b.ids.tolist() == [[1, 2, 3, S, S, S, S, S], [4, 5, 6, 7, 8, S, S, S]]
    assert b.targets.tolist() == [[2, 3, -1, -1, -1, -1, -1, -1], [5, 6, 7, 8, -1, -1, -1, -1]]
    assert b.extract.tolist() == [2, 4] and b.n_examples == 2 and b.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="exceeds"):
        collate([[1] * 10], 1, pad_id=0, max_len=8)


def test_label_spaces(tmp_path):
    d = read_jsonl(write(tmp_path / "a.jsonl", [{"text": "x", "label": "pos"},
                                                 {"text": "y", "label": "neg"}, ""]), "classify")
    ls = LabelSpace.from_data(d)  # blank lines are skipped
    assert ls.names == ["neg", "pos"] and ls.n_out == 2 and ls.encode(d).tolist() == [1, 0]
    ints = read_jsonl(write(tmp_path / "i.jsonl", [{"text": "x", "label": 2},
                                                    {"text": "y", "label": 0}]), "classify")
    assert LabelSpace.from_data(ints).names == [0, 2]
    reg = read_jsonl(write(tmp_path / "r.jsonl", [{"text_a": "a", "text_b": "b", "label": 0.5},
                                                   {"text_a": "a", "text_b": "c", "label": 3}]),
                     "similar")
    rs = LabelSpace.from_data(reg)  # one float label: regression
    assert rs.kind == "regression" and rs.n_out == 1 and rs.encode(reg).tolist() == [0.5, 3.0]
    ch = read_jsonl(write(tmp_path / "c.jsonl", [{"context": "c", "choices": ["a", "b"],
                                                   "label": 1}]), "choice")
    cs = LabelSpace.from_data(ch)
    assert cs.kind == "choice" and cs.n_choices == 2 and cs.n_out == 1
    assert LabelSpace.from_dict(ls.to_dict()) == ls


@pytest.mark.parametrize("rows, task, match", [
    (['{"text": "a", "label": 1}', '{"text": "b", "label": 0'], "classify",
     r"bad\.jsonl:2: not JSON"),
    ([{"text": "a", "label": 1}, {"label": 0}], "classify", r"bad\.jsonl:2: missing field 'text'"),
    ([{"premise": "a", "hypothesis": "b"}], "entail", r"bad\.jsonl:1: missing field 'label'"),
    ([{"text": 3, "label": 0}], "classify", r"bad\.jsonl:1: field 'text' must be a string"),
    ([{"text": "a", "label": True}], "classify", r"bad\.jsonl:1: label must be"),
    ([{"context": "c", "choices": [], "label": 0}], "choice",
     r"bad\.jsonl:1: field 'choices' must be a non-empty list"),
    ([{"context": "c", "choices": ["a", "b"], "label": 0},
      {"context": "c", "choices": ["a", "b", "d"], "label": 0}], "choice",
     r"bad\.jsonl:2: 3 choices, but .*bad\.jsonl:1 has 2"),
    ([{"context": "c", "choices": ["a", "b"], "label": 2}], "choice",
     r"bad\.jsonl:1: label must be the index"),
    (["[1, 2]"], "classify", r"bad\.jsonl:1: expected a JSON object"),
    ([], "classify", r"no examples"),
])
def test_bad_lines_name_file_and_line(tmp_path, rows, task, match):
    with pytest.raises(ValueError, match=match):
        read_jsonl(write(tmp_path / "bad.jsonl", rows), task)


def test_unknown_label_mixed_labels_and_missing_file(tmp_path):
    train = read_jsonl(write(tmp_path / "t.jsonl", [{"text": "a", "label": "x"},
                                                     {"text": "b", "label": "y"}]), "classify")
    ls = LabelSpace.from_data(train)
    val = read_jsonl(write(tmp_path / "v.jsonl", [{"text": "a", "label": "x"},
                                                   {"text": "b", "label": "z"}]), "classify")
    with pytest.raises(ValueError, match=r"v\.jsonl:2: unknown label 'z'"):
        check_examples(val, ls)
    mixed = read_jsonl(write(tmp_path / "m.jsonl", [{"text": "a", "label": "x"},
                                                     {"text": "b", "label": 1}]), "classify")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: label 1 mixes numbers and strings"):
        LabelSpace.from_data(mixed)
    one = read_jsonl(write(tmp_path / "o.jsonl", [{"text": "a", "label": "x"}]), "classify")
    with pytest.raises(ValueError, match="at least two classes"):
        LabelSpace.from_data(one)
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "\xff", "label": 1}\n')
    with pytest.raises(ValueError, match=r"u\.jsonl:1: not UTF-8"):
        read_jsonl(str(tmp_path / "u.jsonl"), "classify")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(str(tmp_path / "nope.jsonl"), "classify")
    with pytest.raises(ValueError, match="task: expected one of"):
        read_jsonl(str(tmp_path / "t.jsonl"), "qa")
    # prediction input may leave labels out
    assert not read_jsonl(write(tmp_path / "p.jsonl", [{"text": "a"}]), "classify",
                          need_labels=False).has_labels


def test_regression_file_with_a_class_label_is_refused(tmp_path):
    d = read_jsonl(write(tmp_path / "r.jsonl", [{"text_a": "a", "text_b": "b", "label": 0.5},
                                                 {"text_a": "a", "text_b": "c", "label": "hi"}]),
                   "similar")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: a non-numeric label"):
        LabelSpace.from_data(d)
    assert LabelSpace("regression").n_out == 1
