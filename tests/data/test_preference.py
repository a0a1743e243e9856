"""Preference data (gptcore.data.preference): rankings, pairs, their expansion, bad input."""

from __future__ import annotations

import itertools
import json

import pytest

from gptcore.data.preference import (
    PreferencePair,
    pair_indices,
    parse_ranking,
    ranking_pairs,
    read_rankings,
)


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_rankings_and_pairs_with_extra_keys(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [
        {"prompt": "p1", "ranked": ["a", "b", "c", "d"], "labeler": "x", "time": 3},
        {"prompt": "p2", "chosen": "good", "rejected": "bad", "source": "rank page"},
    ])
    r = read_rankings(path)
    assert [x.answers for x in r] == [("a", "b", "c", "d"), ("good", "bad")]
    assert [x.k for x in r] == [4, 2] and r[1].where == f"{path}:2"
    pairs = ranking_pairs(r)
    assert len(pairs) == 6 + 1
    assert pairs[-1] == PreferencePair("p2", "good", "bad", f"{path}:2")
    # every pair puts the better-ranked answer first, each unordered pair exactly once
    got = {(p.chosen, p.rejected) for p in pairs[:6]}
    assert got == set(itertools.combinations("abcd", 2))


@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_pair_indices_are_all_k_choose_2(k):
    idx = pair_indices(k)
    assert len(idx) == k * (k - 1) // 2 == len(set(idx))
    assert all(i < j for i, j in idx)


@pytest.mark.parametrize("rec, match", [
    ({"prompt": "p", "ranked": ["only"]}, r"r\.jsonl:2: 'ranked' has 1 answer; a ranking needs at least 2"),
    ({"prompt": "p", "ranked": []}, r":2: 'ranked' has 0 answers"),
    ({"prompt": "p", "ranked": ["a", "b", "a"]}, r":2: ranked\[0\] and ranked\[2\] are the same answer"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, r":2: 'chosen' and 'rejected' are the same"),
    ({"prompt": "p", "ranked": ["a", 3]}, r":2: ranked\[1\] must be a string, got int"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, r":2: rejected must be a string"),
    ({"prompt": ["p"], "ranked": ["a", "b"]}, r":2: 'prompt' must be a string, got list"),
    ({"ranked": ["a", "b"]}, r":2: missing field 'prompt'"),
    ({"prompt": "p"}, r":2: missing field 'ranked'"),
    ({"prompt": "p", "chosen": "a"}, r":2: missing field 'rejected'"),
    ({"prompt": "p", "ranked": "ab"}, r":2: 'ranked' must be a list"),
    ({"prompt": "p", "ranked": ["a", "b"], "chosen": "a", "rejected": "b"}, r":2: give either"),
    ("3", r":2: expected a JSON object, got int"),
    ('{"prompt": "p", "prompt": "q", "ranked": ["a", "b"]}', r":2: duplicate key 'prompt'"),
])
def test_bad_lines_are_errors_naming_the_line(tmp_path, rec, match):
    path = write_lines(tmp_path / "r.jsonl", [{"prompt": "ok", "ranked": ["x", "y"]}, rec])
    with pytest.raises(ValueError, match=match):
        read_rankings(path)


def test_empty_file_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="holds no rankings"):
        read_rankings(write_lines(tmp_path / "e.jsonl", []))
    with pytest.raises(ValueError, match="k: expected an int >= 2"):
        pair_indices(1)
    with pytest.raises(TypeError, match="expected Ranking objects"):
        ranking_pairs([{"prompt": "p"}])
    one = parse_ranking({"prompt": "p", "ranked": ["a", "b", "c"]}, "mem")
    assert [(p.chosen, p.rejected) for p in ranking_pairs(one)] == [("a", "b"), ("a", "c"), ("b", "c")]
