"""Task files, the public-format readers, k-shot prompts and metrics, and bad task files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gptcore.eval import Scorer, build_prompt, evaluate, load_task

from .conftest import FIXTURES


def test_gptcore_format_reads_header_examples_and_pool():
    t = load_task(FIXTURES / "tiny_mc.jsonl")
    assert (t.name, t.kind, t.description) == ("tiny-mc", "multiple_choice", "Choose the right ending.")
    assert len(t.docs) == 5 and len(t.fewshot_docs) == 3
    assert t.docs[2] == {"context": "A cat says", "choices": ["woof", "meow"], "label": 1}
    g = load_task(FIXTURES / "tiny_gen.jsonl")
    assert g.until == ["\n"] and g.max_tokens == 4 and g.docs[1]["answers"] == ["green"]


def test_hellaswag_reader_preprocesses_as_the_harness():
    t = load_task(FIXTURES / "hellaswag.jsonl")
    assert t.kind == "multiple_choice" and len(t.docs) == 3
    d0, d1 = t.docs[0], t.docs[1]
    assert d0["context"] == "Cooking: A man stands at a stove holding a pan. He"
    assert d0["choices"][1] == "throws the pan out of the window. and runs."  # " [title]" -> ". "
    assert d1["label"] == 1  # a string label in the file
    assert d1["choices"][2] == "drives a car to the shop."  # double spaces closed
    assert d1["choices"][3] == " sleeps on the floor."  # other bracketed markers removed


def test_lambada_and_wikitext_readers():
    t = load_task(FIXTURES / "lambada.jsonl")
    assert t.kind == "cloze"
    assert t.docs[0]["target"] == "snow" and t.docs[0]["context"].endswith("was white with")
    w = load_task(FIXTURES / "wiki.test.raw")
    assert w.kind == "perplexity" and len(w.docs) == 2  # a section heading is not an article
    assert w.docs[0]["text"].lstrip().startswith("= Valkyria Chronicles =")
    assert "= = Gameplay = =" in w.docs[0]["text"]
    assert w.docs[1]["text"].startswith(" = Tower Bridge =")


def test_k_shot_prompt_is_gpt3s():
    t = load_task(FIXTURES / "tiny_mc.jsonl")
    assert build_prompt(t, 0, 0) == "Choose the right ending.\n\nThe sky on a clear day is"
    p = build_prompt(t, 0, 2, seed=7)
    parts = p.split("\n\n")
    assert parts[0] == t.description and parts[-1] == t.docs[0]["context"] and len(parts) == 4
    demos = {d["context"] + " " + d["choices"][d["label"]] for d in t.fewshot_docs}
    assert set(parts[1:3]) <= demos and parts[1] != parts[2]  # drawn without replacement
    assert build_prompt(t, 0, 2, seed=7) == p  # reproducible
    assert len({build_prompt(t, 0, 2, seed=s) for s in range(20)}) > 1  # the seed draws
    # without a pool: the other examples, never the example itself
    t.fewshot_docs = []
    for s in range(10):
        assert "The sky on a clear day is blue" not in build_prompt(t, 0, 4, seed=s)
    with pytest.raises(ValueError, match="5 demonstrations asked for"):
        build_prompt(t, 0, 5)


def test_multiple_choice_metrics(model, gpt2_tok):
    t = load_task(FIXTURES / "tiny_mc.jsonl")
    sc = Scorer(model, gpt2_tok)
    rows = evaluate(sc, t, shots=[0, 1])
    got = {(r["shots"], r["metric"]): r for r in rows}
    for k in (0, 1):
        acc, norm, tok = [], [], []
        for i, d in enumerate(t.docs):
            prompt = build_prompt(t, i, k)
            res = [sc.loglikelihood([(prompt, " " + c)])[0][0] for c in d["choices"]]
            ntok = [len(sc.encode_pair(prompt, " " + c)[1]) for c in d["choices"]]
            acc.append(np.argmax(res) == d["label"])
            norm.append(np.argmax(np.array(res) / [len(c) for c in d["choices"]]) == d["label"])
            tok.append(np.argmax(np.array(res) / ntok) == d["label"])
        for name, vals in (("acc", acc), ("acc_norm", norm), ("acc_norm_tokens", tok)):
            r = got[(k, name)]
            assert r["value"] == pytest.approx(np.mean(vals))
            assert r["stderr"] == pytest.approx(np.std(vals, ddof=1) / math.sqrt(len(vals)))
            assert r["n"] == 5 and r["task"] == "tiny-mc"
    assert len(evaluate(sc, t, shots=[0], limit=2)) == 3
    assert evaluate(sc, t, shots=[0], limit=2)[0]["n"] == 2


def test_cloze_perplexity_and_generation_metrics(model, gpt2_tok):
    sc = Scorer(model, gpt2_tok)
    c = load_task(FIXTURES / "tiny_cloze.jsonl")
    res = sc.loglikelihood([(d["context"], " " + d["target"]) for d in c.docs])
    got = {r["metric"]: r["value"] for r in evaluate(sc, c)}
    assert got["acc"] == pytest.approx(np.mean([g for _, g in res]))
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in res])))

    p = load_task(FIXTURES / "tiny_ppl.jsonl")
    got = {r["metric"]: r["value"] for r in evaluate(sc, p)}
    lls = sc.loglikelihood_rolling([d["text"] for d in p.docs])
    ll, ntok = sum(a for a, _ in lls), sum(b for _, b in lls)
    nbytes = sum(len(d["text"].encode()) for d in p.docs)
    nwords = sum(len(d["text"].split()) for d in p.docs)
    assert got["token_perplexity"] == pytest.approx(math.exp(-ll / ntok))
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / nwords))
    assert got["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2))
    assert got["bits_per_byte"] == pytest.approx(math.log2(got["byte_perplexity"]))
    with pytest.raises(ValueError, match="perplexity task"):
        evaluate(sc, p, shots=[0, 1])

    g = load_task(FIXTURES / "tiny_gen.jsonl")
    outs = sc.generate_until([(d["context"], ["\n"], 4) for d in g.docs])
    got = {r["metric"]: r["value"] for r in evaluate(sc, g)}
    em = [any(o.strip() == a for a in d["answers"]) for o, d in zip(outs, g.docs)]
    assert got["exact_match"] == pytest.approx(np.mean(em))
    assert 0.0 <= got["f1"] <= 1.0


def test_f1_and_exact_match_on_known_answers():
    from gptcore.eval.tasks import _f1

    assert _f1("The Eiffel tower", "eiffel tower") == 1.0
    assert _f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert _f1("London", "Paris") == 0.0


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_bad_task_files_name_file_and_line(tmp_path):
    head = {"kind": "multiple_choice"}
    ok = {"context": "a", "choices": ["b", "c"], "label": 0}
    cases = [
        ([head, ok, "{not json"], r"bad\.jsonl:3: not JSON"),
        ([head, ok, {"context": "a", "choices": ["b", "c"], "label": 2}], r":3: label 2 is out of range"),
        ([head, {"context": "a", "choices": ["b", "c"], "label": -1}], r":2: label -1 is out of range"),
        ([head, {"context": "a", "choices": ["b", ""], "label": 0}], r":2: 'choices'"),
        ([head, {"choices": ["b", "c"], "label": 0}], r":2: 'context' must be a string"),
        ([head, ok, [1, 2]], r":3: expected a JSON object"),
        ([{"kind": "riddles"}, ok], r":1: kind 'riddles'"),
        ([{"kind": "cloze", "colour": 1}], r":1: unknown header keys"),
        ([{"kind": "cloze"}, {"context": "a", "target": " "}], r":2: 'target' is empty"),
        ([{"kind": "cloze"}], r"no examples"),
        ([head, ok, head], r":3: a second header"),
    ]
    for lines, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_task(_write(tmp_path / "bad.jsonl", lines))
    with pytest.raises(ValueError, match="first line must be the task header"):
        load_task(_write(tmp_path / "bad.jsonl", [ok]), format="gptcore")
    with pytest.raises(ValueError, match="cannot tell the task format"):
        load_task(_write(tmp_path / "bad.jsonl", [{"question": "?"}]))
    with pytest.raises(FileNotFoundError):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="lambada.jsonl:1: a LAMBADA passage"):
        load_task(_write(tmp_path / "lambada.jsonl", [{"text": "word"}]), format="lambada")
    with pytest.raises(ValueError, match="cannot give demonstrations"):
        load_task(FIXTURES / "tiny_mc.jsonl", fewshot_path=FIXTURES / "tiny_cloze.jsonl")
