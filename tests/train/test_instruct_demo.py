"""The InstructGPT demo (gptcore.train.instruct_demo): the labeler's checked property and its
ranking, the prompts cut from held-out files, answers and their log-probabilities, and
`gptcore instruct-demo --quick` end to end (every stage runs and writes well-formed output; the
tiny run's numbers are not asserted to improve -- benchmarks/RESULTS.md has the full run)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gptcore.cli import main
from gptcore.data import get_tokenizer
from gptcore.data.preference import read_rankings
from gptcore.data.sft import read_sft
from gptcore.models.config import GPTConfig
from gptcore.models.gpt import GPT
from gptcore.train.instruct_demo import (
    QUICK,
    DemoConfig,
    answer_logprobs,
    completed_line,
    evaluate_model,
    line_prompts,
    passes,
    plot_ppo,
    rank,
    sample_answers,
)
from gptcore.train.pretrain import TrainConfig, train
from gptcore.train.tasks_demo import _held_out_files


def test_the_property_is_the_finished_line_parsing():
    p = "x = 1\n    y = foo(a, "
    assert completed_line(p, "b)\nmore") == "    y = foo(a, b)"
    assert completed_line(p, "b)") is None  # the line did not end within the answer
    assert passes(p, "b)\n")
    assert passes(p, "b)\n((( anything after the newline is not the answer")
    assert not passes(p, "b)")  # no newline: not finished
    assert not passes(p, "b\n")  # bracket left open
    assert not passes(p, "b))\n")  # one too many
    assert not passes(p, "'b)\n")  # string left open
    assert not passes(p, "b) +\n")
    assert passes("    return f(", "x)\n")  # syntax only: `return` outside a function is fine
    assert passes("yield g(", "1)\n") and passes("await h(", ")\n")


def test_rank_puts_passing_answers_first_then_the_closer_one_then_sample_order():
    p = "y = foo(a, "
    ranked, ok = rank(p, ["zzz\n", "c)\n", "b, c\n", "b)\n", "c)\n", "d)\n"], "b)\n")
    # passing: "b)" equals the file's line; "c)" and "d)" are as close to it, so sample order
    # keeps "c)" first; failing: "b, c" shares a "b" with the file, "zzz" nothing
    assert ranked == ["b)\n", "c)\n", "d)\n", "b, c\n", "zzz\n"]  # the duplicate "c)" dropped
    assert ok == [True, True, True, False, False]
    assert rank(p, ["q\n", "q\n"], "b)\n") == (["q\n"], [False])


def test_prompts_come_from_held_out_files_and_their_real_rest_passes():
    files = _held_out_files()[:150]
    items = line_prompts(files, 60, seed=3, max_new=32, max_prompt=95)
    assert items == line_prompts(files, 60, seed=3, max_new=32, max_prompt=95)
    assert items != line_prompts(files, 60, seed=4, max_new=32, max_prompt=95)
    assert len({it["prompt"] for it in items}) == 60
    for it in items:
        p, c = it["prompt"], it["completion"]
        assert len(p) <= 95 and 7 <= len(c) <= 32 and c.endswith("\n") and c.count("\n") == 1
        assert "(" in p.rpartition("\n")[2]  # cut after the line's first "("
        assert passes(p, c), (p, c)  # the file's own line is a demonstration of the property
        assert not passes(p, "\n")  # and the cut line alone is not
    with pytest.raises(ValueError, match="files"):
        line_prompts([], 3, seed=0)


def _byte_model(seed=0):
    return GPT(GPTConfig.preset("tiny", n_embd=32, vocab_size=257), seed=seed).eval()


def test_answers_end_at_their_newline_and_their_logprobs_are_the_models():
    model, tok = _byte_model(), get_tokenizer("byte")
    prompts = ["a = f(", "print(x, "]
    answers = sample_answers(model, tok, prompts, 5, max_new=12, seed=7)
    assert answers == sample_answers(model, tok, prompts, 5, max_new=12, seed=7)
    assert [len(a) for a in answers] == [5, 5]
    flat = [(p, t, ids) for p, row in zip(prompts, answers) for t, ids in row]
    for _, text, ids in flat:
        assert 1 <= len(ids) <= 12
        ends = [j for j, t in enumerate(ids) if t in (10, tok.eot_token)]
        assert ends in ([], [len(ids) - 1]), ids  # cut at the first newline / end-of-text
        if not ends:
            assert len(ids) == 12
        assert text == tok.decode([t for t in ids if t != tok.eot_token])
    # the summed log-probabilities, recomputed here from the full logits
    got = answer_logprobs(model, tok, [p for p, _, _ in flat], [ids for _, _, ids in flat])
    for (p, _, ids), lp in zip(flat, got):
        seq = tok.encode(p) + ids
        z = model.logits(np.array([seq[:-1]])).astype(np.float64)[0]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want = sum(logp[len(tok.encode(p)) - 1 + j, t] for j, t in enumerate(ids))
        assert lp == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_evaluation_kl_is_zero_against_itself_and_positive_against_another_model():
    model, tok = _byte_model(0), get_tokenizer("byte")
    items = [{"prompt": "x = g(", "completion": "1)\n"},
             {"prompt": "y = h(a, ", "completion": "b)\n"}]
    same = evaluate_model(model, model, tok, items, samples=3, max_new=8, seed=0)
    assert same["kl"] == (0.0, 0.0)
    assert 0.0 <= same["rate"][0] <= 1.0 and len(same["examples"]) == 6
    assert 0.0 <= same["closeness"][0] <= 1.0
    other = evaluate_model(model, _byte_model(5), tok, items, samples=16, max_new=8, seed=0)
    assert other["kl"][0] > 0  # (an estimate of a KL between two different random models)


def test_the_ppo_plot_needs_matplotlib_and_draws_every_seed(tmp_path, monkeypatch):
    hist = [[{"step": i, "reward": 0.1 * i, "kl": 0.05 * i, "true_rate": 0.5} for i in range(1, 9)]
            for _ in range(2)]
    pytest.importorskip("matplotlib")
    plot_ppo(hist, str(tmp_path / "p.png"), 0.1)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError):
        plot_ppo(hist, str(tmp_path / "q.png"), 0.1)
    assert not (tmp_path / "q.png").exists()


def test_demo_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="k: expected an int >= 2"):
        DemoConfig(k=1)
    with pytest.raises(ValueError, match="unknown settings"):
        DemoConfig(steps=3)
    for bad in (-1.0, 0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="kl_coef: expected a finite number > 0"):
            DemoConfig(kl_coef=bad)
    with pytest.raises(ValueError, match="rm_holdout"):
        DemoConfig(rm_holdout=1.0)
    with pytest.raises(ValueError, match="n_eval"):
        DemoConfig(n_eval=0)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A byte-level model trained for seconds on the training tests' corpus (words and newlines):
    unlike a random one, it writes text and ends lines, which every stage needs to have work."""
    out = tmp_path_factory.mktemp("base")
    train(TrainConfig(preset="tiny", data=corpus, steps=40, batch_size=8, seq_len=64, lr=3e-3,
                      warmup=4, eval_every=0, out=str(out), sample_tokens=0, progress=False))
    return str(out / "checkpoint")


def test_quick_demo_runs_every_stage_and_writes_well_formed_results(base, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["instruct-demo", "--quick", "--seeds", "2", "--base", base, "--out", str(out),
                 "--no-progress"]) == 0
    md = (out / "results.md").read_text()
    for model in ("pre-trained", "SFT", "PPO", "DPO"):
        assert f"| {model} |" in md
    assert "mean +- std over 2 seeds" in md
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r["runs"] for r in res["rows"]}
    assert [len(rows[m]) for m in ("pre-trained", "SFT", "PPO", "DPO")] == [2, 2, 2, 2]
    assert all(r["kl"] == [0.0, 0.0] for r in rows["SFT"])  # each SFT model against itself
    for runs in rows.values():
        assert 0.0 <= runs[0]["rate"][0] <= 1.0 and np.isfinite(runs[0]["reward"][0])
    # the stages' inputs in their formats: demonstrations pass; rankings put passing answers first
    demos = read_sft(str(out / "sft.jsonl"))
    assert len(demos) == QUICK["n_sft"] and all(passes(d.prompt, d.completion) for d in demos)
    assert len(res["seeds"]) == 2
    for i, seed in enumerate(res["seeds"]):
        run = out / f"seed-{i}"
        ranked = read_rankings(str(run / "rankings.jsonl"))
        records = [json.loads(line) for line in (run / "rankings.jsonl").read_text().splitlines()]
        assert len(ranked) == len(records) >= 1
        for r in records:
            assert r["passes"] == sorted(r["passes"], reverse=True)
            assert r["passes"] == [passes(r["prompt"], a) for a in r["ranked"]]
        assert 0.0 <= seed["reward_model"]["val_accuracy"] <= 1.0
        hist = seed["ppo_history"]
        assert [h["step"] for h in hist] == list(range(1, QUICK["ppo_steps"] + 1))
        assert all(0.0 <= h["true_rate"] <= 1.0 and np.isfinite(h["kl"]) for h in hist)
        for d in ("sft", "reward", "ppo", "dpo"):
            assert (run / d / "model" / "config.json").is_file(), d
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res["plot"] is None
    else:
        assert (out / "ppo_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run into the same directory is refused (nothing overwritten) without --overwrite
    before = (out / "results.json").read_bytes()
    assert main(["instruct-demo", "--quick", "--base", base, "--out", str(out),
                 "--no-progress"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    # --overwrite with fewer seeds replaces the run, leaving no seed directory of the old one
    assert main(["instruct-demo", "--quick", "--seeds", "1", "--base", base, "--out", str(out),
                 "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("seed-*")) == ["seed-0"]
    assert len(json.loads((out / "results.json").read_text())["seeds"]) == 1


def test_summary_numbers_leave_out_undefined_seeds():
    # an accuracy over no pairs is NaN: the table says n/a, not "nan%"
    from gptcore.train.instruct_demo import _mean_std

    assert _mean_std([float("nan")]) == "n/a"
    assert _mean_std([0.5, float("nan"), 0.7]) == "60.0 +- 14.1"
    assert _mean_std([0.25]) == "25.0"
