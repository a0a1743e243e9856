"""GPT-1 style fine-tuning (gptcore.train.finetune): the combined loss and its gradient against
PyTorch + transformers, learning an easy task, exact resume, save/load, bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gptcore.data import get_tokenizer
from gptcore.data.tasks import LabelSpace, TaskData, read_jsonl
from gptcore.models import GPT, GPTConfig
from gptcore.train.finetune import (
    Classifier,
    FinetuneConfig,
    MultipleChoice,
    _loss_and_backward,
    _new_task_model,
    _with_specials,
    evaluate_task,
    finetune,
    load_task_model,
    metrics,
)

from tests.helpers import rel_err


def tiny_base(seed=1, block_size=64, **kw):
    cfg = GPTConfig.preset("tiny", n_embd=32, block_size=block_size, **kw)
    return GPT(cfg, seed=seed), get_tokenizer("byte")


def letters_task(rng, n):
    """Class "yes": words over a-h; "no": over s-z. Easy for any model that reads its input."""
    out = []
    for _ in range(n):
        y = int(rng.integers(2))
        w = "".join(rng.choice(list("abcdefgh" if y else "stuvwxyz"), size=int(rng.integers(4, 16))))
        out.append({"text": w, "label": ["no", "yes"][y]})
    return out


def choice_task(rng, n):
    """Pick the choice that repeats the context's letter."""
    out = []
    for _ in range(n):
        c = rng.choice(list("abcdefghij"), size=4, replace=False)
        right = int(rng.integers(4))
        out.append({"context": str(c[right]) * 5, "choices": [str(x) * 3 for x in c], "label": right})
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def as_data(task, rows):
    return TaskData(task, "mem", rows, [f"mem:{i + 1}" for i in range(len(rows))], True)


# ---- the loss and its gradient against PyTorch (transformers' GPT-2 as the trunk) --------------


@pytest.mark.parametrize("task, lam", [("classify", 0.5), ("choice", 0.5), ("similar", 0.0),
                                       ("regression", 0.5)])
def test_combined_loss_and_gradients_match_torch(tmp_path, task, lam):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    rows = {"classify": letters_task(rng, 6), "choice": choice_task(rng, 3),
            "similar": [{"text_a": "ab", "text_b": "abc", "label": 1},
                        {"text_a": "xyz", "text_b": "q", "label": 0},
                        {"text_a": "hello", "text_b": "he", "label": 2}],
            "regression": [{"text_a": "ab", "text_b": "abc", "label": 0.7},
                           {"text_a": "xyz", "text_b": "q", "label": -1.5}]}[task]
    regression, task = task == "regression", "similar" if task == "regression" else task
    data = as_data(task, rows)
    cfg = FinetuneConfig(task=task, dropout=0.0, head_dropout=0.0, lm_weight=lam, seed=3)
    tm = _new_task_model(cfg, LabelSpace.from_data(data), tiny_base())
    y = tm.labels.encode(data)
    batch = next(tm.batches(data, np.arange(len(data)), len(data), y))
    tm.model.zero_grad()
    loss, lm = _loss_and_backward(tm, batch, lam)
    grads = {k: np.array(v.numpy()) for k, v in tm.model.grads().items()}

    # the same model in transformers, the same loss written in torch
    tm.model.save_pretrained(tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").float().eval()
    ids = torch.tensor(batch.ids, dtype=torch.long)
    out = hf(ids, output_hidden_states=True)
    h = out.hidden_states[-1]  # after ln_f: what gptcore's heads read
    W = torch.tensor(tm.head.parameters()["weight"].numpy(), requires_grad=True)
    b = (torch.tensor(tm.head.parameters()["bias"].numpy(), requires_grad=True)
         if "bias" in tm.head.parameters() else None)
    rows_t = h[torch.arange(ids.shape[0]), torch.tensor(batch.extract)]
    if task == "similar":
        rows_t = rows_t[0::2] + rows_t[1::2]
    logits = rows_t @ W.T + (b if b is not None else 0)
    if task == "choice":
        logits = logits.reshape(batch.n_examples, batch.group)
    if regression:  # one output: MSE against the float labels
        task_loss = torch.nn.functional.mse_loss(logits[:, 0], torch.tensor(batch.labels))
    else:
        task_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(batch.labels))
    tgt = torch.tensor(batch.targets, dtype=torch.long)
    lm_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                tgt.reshape(-1), ignore_index=-1)
    total = task_loss + lam * lm_loss
    total.backward()
    assert abs(loss - task_loss.item()) < 1e-4 * max(1.0, abs(task_loss.item()))
    if lam:
        assert abs(lm - lm_loss.item()) < 1e-4 * lm_loss.item()
    V = tm.model.config.vocab_size
    head = tm.head.name
    assert rel_err(grads[f"{head}.weight"], W.grad.numpy()) < 1e-4
    if b is not None:  # (zero for multiple choice: a shared bias cancels in the softmax)
        np.testing.assert_allclose(grads[f"{head}.bias"], b.grad.numpy(), atol=1e-6)
    assert rel_err(grads["wte"][:V], hf.transformer.wte.weight.grad.numpy()) < 1e-4
    assert rel_err(grads["h.0.attn.c_attn.weight"],
                   hf.transformer.h[0].attn.c_attn.weight.grad.numpy().T) < 1e-4
    assert rel_err(grads["h.1.mlp.c_fc.weight"],
                   hf.transformer.h[1].mlp.c_fc.weight.grad.numpy().T) < 1e-4


# ---- learning, saving, loading -----------------------------------------------------------------


def test_learns_an_easy_task_then_saves_and_reloads(tmp_path):
    rng = np.random.default_rng(1)
    tr = write_jsonl(tmp_path / "tr.jsonl", letters_task(rng, 192))
    va = write_jsonl(tmp_path / "va.jsonl", letters_task(rng, 64))
    r = finetune(task="classify", train=tr, val=va, base=tiny_base(), out=str(tmp_path / "run"),
                 lr=3e-3, epochs=2, batch_size=16, progress=False)
    tm = r["model"]
    assert isinstance(tm, Classifier)
    # chance is 50%; the first validation was after one epoch
    assert r["val"][-1]["val_accuracy"] >= 0.9 and "val_f1" in r["val"][-1]
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["truncated_train"] == 0 and sum("loss" in x for x in log) == r["steps"] == 24
    # the task record travels with the model; predictions survive the round trip
    back = load_task_model(tmp_path / "run")
    val = read_jsonl(va, "classify")
    np.testing.assert_allclose(back.scores(val), tm.scores(val), rtol=1e-5, atol=1e-6)
    assert back.predict([{"text": "abcabc"}, {"text": "wxyz"}]) == ["yes", "no"]
    assert back.model.config.vocab_size == 257 + 3
    assert evaluate_task(back, val)["accuracy"] == r["val"][-1]["val_accuracy"]


def test_multiple_choice_learns(tmp_path):
    rng = np.random.default_rng(2)
    r = finetune(task="choice", train=as_data("choice", choice_task(rng, 256)), base=tiny_base(),
                 out=None, lr=3e-3, epochs=4, batch_size=16, progress=False)
    tm = r["model"]
    assert isinstance(tm, MultipleChoice) and tm.head.name == "multiple_choice_head"
    test = as_data("choice", choice_task(rng, 64))
    assert evaluate_task(tm, test)["accuracy"] >= 0.6  # chance 25%
    assert tm.scores(test).shape == (64, 4)


def test_similarity_is_symmetric_and_regression_metrics(tmp_path):
    rows = [{"text_a": "abc", "text_b": "abd", "label": 0.9},
            {"text_a": "xyz", "text_b": "abc", "label": 0.1},
            {"text_a": "hello", "text_b": "help", "label": 0.7}]
    r = finetune(task="similar", train=as_data("similar", rows), base=tiny_base(), out=None,
                 epochs=1, progress=False)
    tm = r["model"]
    assert tm.labels.kind == "regression" and tm.head.n_out == 1
    swapped = [{"text_a": x["text_b"], "text_b": x["text_a"]} for x in rows]
    np.testing.assert_allclose(tm.scores(rows), tm.scores(swapped), rtol=1e-5)
    stats = pytest.importorskip("scipy.stats")
    s, y = np.array([0.3, 0.1, 0.9, 0.9, 0.5]), np.array([1.0, 0.0, 2.0, 3.0, 2.0])
    m = metrics(LabelSpace("regression"), s, y)
    assert abs(m["pearson"] - stats.pearsonr(s, y)[0]) < 1e-12
    assert abs(m["spearman"] - stats.spearmanr(s, y)[0]) < 1e-12
    f1 = metrics(LabelSpace("classes", names=["a", "b"]),
                 np.array([[0, 1], [1, 0], [0, 1], [0, 1]]), np.array([1, 1, 0, 1]))
    assert f1["accuracy"] == 0.5 and abs(f1["f1"] - 2 * 2 / (2 * 2 + 1 + 1)) < 1e-12


def test_resume_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(3)
    tr = write_jsonl(tmp_path / "tr.jsonl", letters_task(rng, 40))
    ckpt = str(tmp_path / "base")
    base_model, _ = tiny_base()
    base_model.save_pretrained(ckpt)  # vocab 257 -> the byte tokenizer
    kw = dict(task="classify", train=tr, checkpoint=ckpt, lr=3e-3, epochs=3, batch_size=8,
              progress=False)  # dropout 0.1 in trunk and head: masks must resume too
    full = finetune(out=str(tmp_path / "full"), **kw)
    part = finetune(out=str(tmp_path / "part"), stop_after=7, **kw)
    assert part["stopped_early"] and part["steps"] == 7
    assert not os.path.exists(tmp_path / "part" / "model")
    rest = finetune(out=str(tmp_path / "part"), resume=True, progress=False)
    assert rest["steps"] == full["steps"] == 15
    assert part["losses"] + rest["losses"] == full["losses"]
    a, b = full["model"].model.state_dict(), rest["model"].model.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bpe_tokenizer_learns_the_task_tokens_as_specials(tmp_path):
    from gptcore import Tokenizer

    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 20], vocab_size=280)
    ext = _with_specials(tok, tok.vocab_size)
    text = "def g(<|extract|>): return 2"
    assert ext.encode_ordinary(text) == tok.encode_ordinary(text)  # ordinary text unchanged
    V = tok.vocab_size
    assert ext.special_tokens["<|start|>"] == V and ext.special_tokens["<|extract|>"] == V + 2
    assert ext.encode("<|delim|>", allowed_special="all") == [V + 1]
    # a model fine-tuned on this tokenizer saves it with the specials, and reloads both
    model = GPT(GPTConfig.preset("tiny", n_embd=32, block_size=64, vocab_size=V), seed=0)
    rows = [{"text": "def a", "label": 0}, {"text": "return b", "label": 1}]
    r = finetune(task="classify", train=as_data("classify", rows), base=(model, tok),
                 out=str(tmp_path / "run"), epochs=1, progress=False)
    back = load_task_model(tmp_path / "run")
    assert back.tokenizer.special_tokens == ext.special_tokens
    assert back.info["tokenizer"] == "files"
    np.testing.assert_allclose(back.scores(rows), r["model"].scores(rows), rtol=1e-5, atol=1e-6)


# ---- bad input: clear errors, nothing written --------------------------------------------------


@pytest.mark.parametrize("rows, val_rows, task, match", [
    (['{"text": "a", "label": "x"}', "{oops"], None, "classify", r"train\.jsonl:2: not JSON"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
     [{"text": "c", "label": "w"}], "classify", r"val\.jsonl:1: unknown label 'w'"),
    ([{"premise": "a", "label": "x"}], None, "entail", r"train\.jsonl:1: missing field 'hypothesis'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c"}], "classify",
     r"val\.jsonl:1: missing field 'label'"),
    ([{"context": "a", "choices": [], "label": 0}], None, "choice",
     r"train\.jsonl:1: field 'choices' must be a non-empty list"),
    ([{"context": "a", "choices": ["x", "y"], "label": 0},
      {"context": "a", "choices": ["x"], "label": 0}], None, "choice", r"train\.jsonl:2: 1 choices"),
    ([{"context": "a", "choices": ["x", "y"], "label": 0}],
     [{"context": "a", "choices": ["x", "y", "z"], "label": 0}], "choice",
     r"val\.jsonl:1: 3 choices, but the model was trained with 2"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, rows, val_rows, task, match):
    tr = write_jsonl(tmp_path / "train.jsonl", rows)
    va = write_jsonl(tmp_path / "val.jsonl", val_rows) if val_rows else None
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        finetune(task=task, train=tr, val=va, base=tiny_base(), out=str(out), progress=False)
    assert not out.exists()


def test_checkpoint_without_task_head_and_bad_settings(tmp_path):
    model, _ = tiny_base()
    model.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="has no task head"):
        load_task_model(tmp_path / "lm")
    tr = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="lm_weight: expected a finite number >= 0"):
        finetune(task="classify", train=tr, base=tiny_base(), lm_weight=-1, out=None, progress=False)
    with pytest.raises(ValueError, match="task: expected one of"):
        finetune(task="qa", train=tr, base=tiny_base(), out=None, progress=False)
    with pytest.raises(FileNotFoundError, match="resume"):
        finetune(task="classify", train=tr, out=str(tmp_path / "none"), resume=True, progress=False)
    # a fine-tuned checkpoint is not a starting point for another head
    finetune(task="classify", train=tr, base=tiny_base(), out=str(tmp_path / "ft"), epochs=1,
             progress=False)
    with pytest.raises(ValueError, match="already holds task head"):
        finetune(task="classify", train=tr, checkpoint=str(tmp_path / "ft"), out=None,
                 progress=False)


def test_python_api_is_exported_without_loading_training_at_import():
    import subprocess
    import sys

    import gptcore
    from gptcore.train import finetune as ft

    assert gptcore.finetune is ft.finetune and gptcore.MultipleChoice is ft.MultipleChoice
    assert gptcore.Classifier is ft.Classifier and gptcore.load_task_model is ft.load_task_model
    r = subprocess.run([sys.executable, "-c", "import sys, gptcore; "
                        "print('gptcore.train.finetune' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("task, gpt1", [("entail", False), ("choice", False), ("entail", True),
                                        ("choice", True)])
def test_finetuned_model_opens_in_transformers_with_equal_logits(tmp_path, task, gpt1):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(4)
    rows = (choice_task(rng, 12) if task == "choice" else
            [{"premise": r["text"], "hypothesis": r["text"][:3], "label": r["label"]}
             for r in letters_task(rng, 12)])
    r = finetune(task=task, train=as_data(task, rows), base=tiny_base(prenorm=not gpt1),
                 out=str(tmp_path / "run"), epochs=1, batch_size=4, progress=False)
    tm = load_task_model(tmp_path / "run")
    assert tm.model.config.prenorm == (not gpt1)
    data = as_data(task, rows)
    ours = tm.scores(data)
    np.testing.assert_allclose(ours, r["model"].scores(data), rtol=1e-5, atol=1e-6)
    batch = next(tm.batches(data, np.arange(len(rows)), len(rows)))
    ids = torch.tensor(batch.ids, dtype=torch.long)
    path = tmp_path / "run" / "model"
    with torch.no_grad():
        prefix = "OpenAIGPT" if gpt1 else "GPT2"
        if task == "choice":
            hf = getattr(transformers, prefix + "DoubleHeadsModel").from_pretrained(path).eval()
            k = batch.group
            theirs = hf(ids.view(len(rows), k, -1),
                        mc_token_ids=torch.tensor(batch.extract).view(len(rows), k)).mc_logits
        else:
            hf = getattr(transformers, prefix + "ForSequenceClassification").from_pretrained(path)
            hf = hf.eval()
            theirs = hf(ids).logits
            assert hf.config.id2label == {0: "no", 1: "yes"}
    np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-5)


class _WordTokenizer:
    """A tokenizer gptcore cannot save (any object with encode(text)), as a transformers one."""

    def encode(self, text):
        return [hash(w) % 200 for w in text.split()]


def test_custom_tokenizer_is_recorded_and_must_be_given_back(tmp_path):
    model, _ = tiny_base()
    rows = [{"text": "a b c", "label": 0}, {"text": "d e", "label": 1}]
    r = finetune(task="classify", train=as_data("classify", rows), base=(model, _WordTokenizer()),
                 out=str(tmp_path / "run"), epochs=1, progress=False)
    assert r["model"].info["tokenizer"] == "custom"
    with pytest.raises(ValueError, match="tokenizer=..."):
        load_task_model(tmp_path / "run")
    back = load_task_model(tmp_path / "run", tokenizer=_WordTokenizer())
    np.testing.assert_allclose(back.scores(rows), r["model"].scores(rows), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="encode"):
        finetune(task="classify", train=as_data("classify", rows), base=(model, object()), out=None,
                 progress=False)


def test_gpt1_bpe_vocabulary_is_refused_not_misread(tmp_path):
    model = GPT(GPTConfig.preset("tiny", n_embd=32, block_size=64, prenorm=False), seed=0)
    model.save_pretrained(tmp_path / "gpt1")
    # transformers' OpenAIGPTTokenizer files: lower-cased BPE with </w> word ends
    (tmp_path / "gpt1" / "vocab.json").write_text(json.dumps({"a": 0, "b</w>": 1, "ab</w>": 2}))
    (tmp_path / "gpt1" / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    rows = [{"text": "ab", "label": 0}, {"text": "b", "label": 1}]
    with pytest.raises(ValueError, match="GPT-1's BPE"):
        finetune(task="classify", train=as_data("classify", rows), checkpoint=str(tmp_path / "gpt1"),
                 out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
