"""Task heads in transformers' own task-model layouts (io/hf.py, issue 14 part 5).

A `score` head (no bias) saves as GPT2ForSequenceClassification / OpenAIGPTForSequenceClassification,
a `multiple_choice_head` (one output, bias) as GPT2DoubleHeadsModel / OpenAIGPTDoubleHeadsModel;
gptcore reads those directories back, whoever wrote them. Without transformers the round trips
and the refusals of bad files are tested; with it (the `compare` extra) the logits of both
libraries on the same right-padded batches, both ways.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcore import io as ck
from gptcore.io import CheckpointError
from gptcore.io.safetensors import load_safetensors, save_safetensors
from gptcore.models import GPT
from gptcore.models.heads import LinearHead, gather_rows
from tests.helpers import rel_err
from tests.io.test_checkpoint import _randomise_torch, randomised, tiny

# GPT-1's three task tokens appended to a 101-token vocabulary (the contract of issue 14):
# start, delimiter, extract = 101, 102, 103; batches are right-padded with the start token, which
# only ever sits at position 0, so "the last token that is not padding" is the extract token.
V0 = 101
START, DELIM, EXTRACT = V0, V0 + 1, V0 + 2
HEADS = {"score": dict(n_out=3, bias=False), "multiple_choice_head": dict(n_out=1, bias=True)}
ARCHS = {("score", False): "GPT2ForSequenceClassification",
         ("score", True): "OpenAIGPTForSequenceClassification",
         ("multiple_choice_head", False): "GPT2DoubleHeadsModel",
         ("multiple_choice_head", True): "OpenAIGPTDoubleHeadsModel"}


def task_model(rng, head: str, gpt1: bool, **head_kw) -> GPT:
    """A tiny GPT with the task vocabulary (+3 rows) and ``head``, every parameter random."""
    cfg = tiny(vocab_size=V0 + 3, prenorm=not gpt1)
    model = GPT(cfg, seed=0)
    model.add_head(LinearHead(cfg.n_embd, name=head, **{**HEADS[head], **head_kw}))
    return _randomise_all(model, rng)


def _randomise_all(model: GPT, rng) -> GPT:
    state = {}
    for name, arr in model.state_dict().items():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        state[name] = (base + rng.standard_normal(arr.shape) * 0.2).astype(np.float32)
    model.load_state_dict(state)
    return model.eval()


def padded_batch(rng, B: int, T: int):
    """B task sequences [start] tokens... [extract] of different lengths, right-padded with the
    start token to T; returns (ids (B, T), index of each extract token (B,))."""
    ids = np.full((B, T), START, np.int64)
    last = rng.integers(2, T, B)
    last[0] = T - 1  # one full-length row
    for b, e in enumerate(last):
        ids[b, 1:e] = rng.integers(0, V0, e - 1)
        ids[b, 1 + (e - 1) // 2] = DELIM
        ids[b, e] = EXTRACT
    return ids, last


def head_logits(model: GPT, head: str, ids, last) -> np.ndarray:
    """gptcore's head on the hidden state of each row's extract token."""
    h = model.hidden_states(ids)
    return model.heads[head].forward(gather_rows(h, last))


# ================================================================================================
# gptcore alone
# ================================================================================================


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
@pytest.mark.parametrize("head", list(HEADS))
def test_task_head_saves_in_transformers_layout_and_loads_back(tmp_path, rng, head, gpt1):
    model = task_model(rng, head, gpt1)
    task = {"kind": "demo", "labels": ["neg", "neu", "pos"], "pad_token_id": START,
            "special_tokens": {"start": START, "delim": DELIM, "extract": EXTRACT}}
    ck.save_pretrained(model, tmp_path / "m", task_config=task)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == [ARCHS[head, gpt1]] and cfg["vocab_size"] == V0 + 3
    assert cfg["pad_token_id"] == START and cfg["gptcore"]["task"] == task
    keys = set(load_safetensors(str(tmp_path / "m" / "model.safetensors")))
    if head == "score":
        assert cfg["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and "score.weight" in keys
        assert "score.bias" not in keys and cfg["problem_type"] == "single_label_classification"
    else:
        assert {"multiple_choice_head.summary.weight", "multiple_choice_head.summary.bias"} <= keys
        assert not any(k.startswith("multiple_choice_head.w") for k in keys)
        assert (cfg["summary_type"], cfg["summary_use_proj"], cfg["summary_proj_to_labels"],
                cfg["summary_activation"]) == ("cls_index", True, True, None)
    back = ck.load_pretrained(tmp_path / "m")
    assert list(back.heads) == [head]
    for name, arr in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], arr), name
    ids, last = padded_batch(rng, 3, 12)
    assert np.array_equal(head_logits(back, head, ids, last), head_logits(model, head, ids, last))
    assert ck.load_task_config(tmp_path / "m") == task
    # convert keeps the layout and the task record
    ck.convert(tmp_path / "m", tmp_path / "m2")
    again = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert again["architectures"] == cfg["architectures"] and again["gptcore"]["task"] == task
    assert np.array_equal(ck.load_pretrained(tmp_path / "m2").state_dict()[f"{head}.weight"],
                          model.state_dict()[f"{head}.weight"])


def test_regression_score_and_default_labels(tmp_path, rng):
    model = task_model(rng, "score", False, n_out=1)
    ck.save_pretrained(model, tmp_path / "m")  # no task_config: transformers' default names
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and cfg["id2label"] == {"0": "LABEL_0"}
    assert "pad_token_id" not in cfg and "task" not in cfg["gptcore"]
    assert ck.load_task_config(tmp_path / "m") == {"labels": ["LABEL_0"]}


def test_heads_that_do_not_fit_keep_gptcores_layout(tmp_path, rng):
    """A `score` with a bias or a multi-output `multiple_choice_head` is no transformers task
    model: saved as a GPT2LMHeadModel with the head in gptcore's generic layout, read back."""
    for head, kw in (("score", dict(bias=True)), ("multiple_choice_head", dict(n_out=2))):
        model = task_model(rng, head, False, **kw)
        ck.save_pretrained(model, tmp_path / head)
        cfg = json.loads((tmp_path / head / "config.json").read_text())
        assert cfg["architectures"] == ["GPT2LMHeadModel"] and head in cfg["gptcore"]["heads"]
        keys = set(load_safetensors(str(tmp_path / head / "model.safetensors")))
        assert f"{head}.weight" in keys and f"{head}.bias" in keys
        back = ck.load_pretrained(tmp_path / head)
        assert np.array_equal(back.state_dict()[f"{head}.bias"], model.state_dict()[f"{head}.bias"])


def test_old_generic_multiple_choice_files_still_read(tmp_path, rng):
    """Before transformers' layout, a multiple_choice_head was `multiple_choice_head.weight` in a
    GPT2LMHeadModel directory, declared in gptcore.heads: such files load unchanged."""
    model = task_model(rng, "multiple_choice_head", False)
    ck.save_pretrained(model, tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    arrays = {k.replace("multiple_choice_head.summary.", "multiple_choice_head."): v
              for k, v in load_safetensors(str(st)).items()}
    save_safetensors(str(st), arrays)
    _edit_config(tmp_path / "m", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    back = ck.load_pretrained(tmp_path / "m")
    for name, arr in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], arr), name


def _edit_config(d, edit):
    p = d / "config.json"
    c = json.loads(p.read_text())
    edit(c)
    p.write_text(json.dumps(c))


def _edit_tensors(d, edit):
    st = d / "model.safetensors"
    arrays = dict(load_safetensors(str(st)))
    edit(arrays)
    save_safetensors(str(st), arrays)


@pytest.mark.parametrize("head, edit, message", [
    ("score", lambda a: a.update({"score.weight": np.zeros((2, 16), np.float32)}),
     r"'score.weight' has shape \(2, 16\), expected \(3, 16\)"),
    ("score", lambda a: a.update({"score.bias": np.zeros(3, np.float32)}), "score has no bias"),
    ("score", lambda a: a.pop("score.weight"), r"head 'score' needs tensors \['score.weight'\], found \[\]"),
    ("multiple_choice_head", lambda a: a.pop("multiple_choice_head.summary.bias"),
     "head 'multiple_choice_head' needs tensors"),
    ("multiple_choice_head",
     lambda a: a.update({"multiple_choice_head.summary.weight": np.zeros((16, 16), np.float32)}),
     r"shape \(16, 16\), expected \(1, 16\)"),
    ("multiple_choice_head",
     lambda a: a.update({"multiple_choice_head.weight": a["multiple_choice_head.summary.weight"]}),
     "appears twice"),
])
def test_damaged_head_tensors_are_refused(tmp_path, rng, head, edit, message):
    ck.save_pretrained(task_model(rng, head, False), tmp_path / "m")
    _edit_tensors(tmp_path / "m", edit)
    with pytest.raises(CheckpointError, match=message):
        ck.load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("head, edit, message", [
    ("score", lambda c: c.update(id2label={"0": "a", "1": "b"}), "contradicts .* 2 output"),
    # as transformers writes it (no gptcore section): num_labels against the tensor
    ("score", lambda c: (c.pop("gptcore"), c.update(id2label={"0": "a", "1": "b"})),
     r"'score.weight' has shape \(3, 16\), expected \(2, 16\)"),
    ("score", lambda c: c["gptcore"]["heads"]["score"].update(bias=True), "contradicts"),
    ("score", lambda c: c.pop("architectures"), None),  # gptcore.heads alone still declares it
    ("multiple_choice_head", lambda c: c.update(summary_activation="tanh"), "summary_activation"),
    ("multiple_choice_head", lambda c: c.update(summary_type="mean"), "summary_type"),
    ("multiple_choice_head", lambda c: c.update(summary_use_proj=False), "summary_use_proj"),
    ("multiple_choice_head", lambda c: c.update(architectures="GPT2DoubleHeadsModel"), "must be a list"),
])
def test_contradicting_configs_are_refused(tmp_path, rng, head, edit, message):
    model = task_model(rng, head, False)
    ck.save_pretrained(model, tmp_path / "m")
    _edit_config(tmp_path / "m", edit)
    if message is None:
        back = ck.load_pretrained(tmp_path / "m")
        assert np.array_equal(back.state_dict()["score.weight"], model.state_dict()["score.weight"])
        return
    with pytest.raises(CheckpointError, match=message):
        ck.load_pretrained(tmp_path / "m")


def test_bad_task_config_writes_nothing(tmp_path, rng):
    model = task_model(rng, "score", False)
    ck.save_pretrained(model, tmp_path / "m", task_config={"labels": ["a", "b", "c"]})
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    for bad, err, message in (({"labels": ["a", "b"]}, ValueError, "3 label names"),
                              ({"labels": "abc"}, ValueError, "label names"),
                              ({"labels": ["1", 1, "b"]}, ValueError, "differ as text"),
                              ({"pad_token_id": V0 + 3}, ValueError, "pad_token_id"),
                              ({"when": object()}, TypeError, "not JSON-serialisable"),
                              (["labels"], TypeError, "expected a dict")):
        with pytest.raises(err, match=message):
            ck.save_pretrained(model, tmp_path / "m", task_config=bad)
        assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    # gptcore.data.tasks' own record: labels as LabelSpace.to_dict(), padding = the start token
    record = {"task": "classify", "labels": {"kind": "classes", "names": [0, 1, 7]},
              "special_tokens": {"start": START, "delim": DELIM, "extract": EXTRACT}}
    ck.save_pretrained(model, tmp_path / "b", task_config=record)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "0", "1": "1", "2": "7"} and cfg["pad_token_id"] == START
    assert ck.load_task_config(tmp_path / "b") == {**record, "pad_token_id": START}
    with pytest.raises(ValueError, match=r"\['special_tokens'\]\['start'\]"):
        ck.save_pretrained(model, tmp_path / "b", task_config={"special_tokens": {"start": -1}})
    with pytest.raises(ValueError, match="no place"):
        ck.write_weights(tmp_path / "m.bin", model.config, model.state_dict(), task_config={"a": 1})
    assert not (tmp_path / "m.bin").exists()


def test_load_weights_puts_a_pretrained_trunk_under_a_new_task_head(tmp_path, rng):
    """The fine-tuning start: a plain LM checkpoint loads into a model that has a `score` head
    (which keeps its values); the classifier saved after loads whole."""
    cfg = tiny(vocab_size=V0 + 3)
    lm = randomised(cfg, rng)
    ck.save_pretrained(lm, tmp_path / "lm")
    model = GPT(cfg, seed=1)
    model.add_head(LinearHead(cfg.n_embd, 2, name="score", bias=False, seed=2))
    w = np.array(model.parameters()["score.weight"].numpy())
    ck.load_weights(model, tmp_path / "lm")
    assert np.array_equal(model.parameters()["score.weight"].numpy(), w)
    assert np.array_equal(model.state_dict()["wte"], lm.state_dict()["wte"])
    ck.save_pretrained(model, tmp_path / "clf")
    back = ck.load_pretrained(tmp_path / "clf")
    assert np.array_equal(back.state_dict()["score.weight"], w)
    with pytest.raises(CheckpointError, match="no head"):  # the LM model has nowhere to put it
        ck.load_weights(lm, tmp_path / "clf")


# ================================================================================================
# transformers and torch (the `compare` extra): the same logits both ways
# ================================================================================================


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def _their_logits(hf, model, head: str, ids, last, K: int = 1):
    """transformers' task logits: the sequence classifier's (B, n), or the double-heads model's
    mc_logits with the rows grouped (B/K, K) and mc_token_ids the extract positions."""
    torch, _ = hf
    x = torch.as_tensor(ids)
    with torch.no_grad():
        if head == "score":
            return model(x).logits.numpy()
        out = model(x.view(-1, K, x.shape[-1]), mc_token_ids=torch.as_tensor(last).view(-1, K))
        return out.mc_logits.numpy(), out.logits.numpy()


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
@pytest.mark.parametrize("head", list(HEADS))
def test_gptcore_task_model_opens_in_transformers(tmp_path, rng, hf, head, gpt1):
    _, tr = hf
    model = task_model(rng, head, gpt1)
    ck.save_pretrained(model, tmp_path / "m", task_config={"pad_token_id": START})
    if head == "score":
        theirs = tr.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
        assert type(theirs).__name__ == ARCHS[head, gpt1]
        ids, last = padded_batch(rng, 4, 14)
        ours = head_logits(model, head, ids, last)
        assert ours.shape == (4, 3)
        assert rel_err(_their_logits(hf, theirs, head, ids, last), ours) < 1e-5, rng
        return
    cls = tr.OpenAIGPTDoubleHeadsModel if gpt1 else tr.GPT2DoubleHeadsModel
    theirs = cls.from_pretrained(tmp_path / "m").eval()
    K = 4
    ids, last = padded_batch(rng, 2 * K, 14)
    mc, lm = _their_logits(hf, theirs, head, ids, last, K)
    ours = head_logits(model, head, ids, last).reshape(2, K)
    assert rel_err(mc, ours) < 1e-5, rng
    assert rel_err(lm.reshape(2 * K, 14, -1), model(ids)) < 1e-5, rng  # the tied lm_head is kept


def _hf_task_model(hf, head: str, gpt1: bool, seed: int):
    torch, tr = hf
    kw = dict(n_layer=2, n_head=2, n_embd=16, n_positions=24, vocab_size=V0 + 3, pad_token_id=START)
    if head == "score":
        kw["id2label"] = {0: "no", 1: "maybe", 2: "yes"}
    conf = (tr.OpenAIGPTConfig if gpt1 else tr.GPT2Config)(**kw)
    return _randomise_torch(getattr(tr, ARCHS[head, gpt1])(conf), torch, seed)


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
@pytest.mark.parametrize("head", list(HEADS))
def test_transformers_task_model_opens_in_gptcore(tmp_path, rng, hf, head, gpt1):
    ref = _hf_task_model(hf, head, gpt1, int(rng.integers(1 << 30)))
    ref.save_pretrained(tmp_path / "hf")
    model = ck.load_pretrained(tmp_path / "hf")
    assert list(model.heads) == [head] and model.config.prenorm is (not gpt1)
    K = 1 if head == "score" else 3
    ids, last = padded_batch(rng, 2 * K, 16)
    ours = head_logits(model, head, ids, last)
    if head == "score":
        assert rel_err(ours, _their_logits(hf, ref, head, ids, last)) < 1e-5, rng
        assert ck.load_task_config(tmp_path / "hf") == {"labels": ["no", "maybe", "yes"],
                                                         "pad_token_id": START}
    else:
        mc, lm = _their_logits(hf, ref, head, ids, last, K)
        assert rel_err(ours.reshape(2, K), mc) < 1e-5, rng
        assert rel_err(model(ids), lm.reshape(2 * K, 16, -1)) < 1e-5, rng
    # and gptcore's save of it is transformers' model again
    ck.save_pretrained(model, tmp_path / "gc", task_config=ck.load_task_config(tmp_path / "hf"))
    cls = type(ref)
    again = cls.from_pretrained(tmp_path / "gc").eval()
    if head == "score":
        assert rel_err(_their_logits(hf, again, head, ids, last), ours) < 1e-5, rng
        assert again.config.id2label == {0: "no", 1: "maybe", 2: "yes"}
    else:
        assert rel_err(_their_logits(hf, again, head, ids, last, K)[0], ours.reshape(2, K)) < 1e-5


# ------------------------------------------------------------------------------------------------
# the whole path: `gptcore.finetune` writes a model transformers opens with the same logits
# ------------------------------------------------------------------------------------------------


def _pad(seqs, pad: int) -> tuple:
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad, np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, np.array([len(s) - 1 for s in seqs])


@pytest.mark.parametrize("task", ["classify", "choice"])
def test_finetuned_model_opens_in_transformers(tmp_path, rng, hf, task):
    """gptcore.train.finetune's own output directory (its task record passed as task_config)
    opens in transformers' task model, whose logits on right-padded batches equal the task
    model's scores."""
    ft = pytest.importorskip("gptcore.train.finetune")
    from gptcore.data import get_tokenizer

    torch, tr = hf
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    if task == "classify":
        examples = [{"text": " ".join(rng.choice(words, int(rng.integers(1, 5)))), "label": ["x", "y", "z"][i % 3]}
                    for i in range(12)]
    else:
        examples = [{"context": str(rng.choice(words)), "choices": [str(w) * (j + 1) for j, w in
                     enumerate(rng.choice(words, 3))], "label": int(rng.integers(3))} for _ in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    cfg = tiny(vocab_size=257, block_size=64)
    out = ft.finetune(task=task, train=str(data), out=str(tmp_path / "run"), epochs=1, batch_size=4,
                      progress=False, base=(randomised(cfg, rng), get_tokenizer("byte")))
    tm = out["model"]  # scores() runs in evaluation mode
    model_dir = tmp_path / "run" / ft.MODEL_NAME
    want = tm.scores(examples)
    seqs = [s for ex in examples for s in tm.encoder.sequences(ex)]
    ids, last = _pad(seqs, tm.encoder.start)
    assert len(set(last)) > 1  # the batch really is padded
    if task == "classify":
        theirs = tr.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        assert theirs.config.id2label == {0: "x", 1: "y", 2: "z"}
        with torch.no_grad():
            got = theirs(torch.as_tensor(ids)).logits.numpy()
    else:
        theirs = tr.GPT2DoubleHeadsModel.from_pretrained(model_dir).eval()
        with torch.no_grad():
            got = theirs(torch.as_tensor(ids).view(len(examples), 3, -1),
                         mc_token_ids=torch.as_tensor(last).view(len(examples), 3)).mc_logits.numpy()
    assert rel_err(got, want) < 1e-5, rng
