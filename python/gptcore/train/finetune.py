"""GPT-1 style fine-tuning: a pre-trained decoder, three new tokens, a linear head, one loss.

    from gptcore.train.finetune import finetune
    result = finetune(task="entail", train="train.jsonl", val="val.jsonl",
                      checkpoint="gptcore-run", out="runs/entail")
    clf = result["model"]                      # a Classifier (MultipleChoice for task="choice")
    clf.predict([{"premise": "...", "hypothesis": "..."}])

What happens (Radford et al. 2018, section 3.2-3.3 and their released code):

* the checkpoint's vocabulary grows by start, delimiter and extract tokens (ids V, V+1, V+2, new
  embedding rows drawn from N(0, 0.02)); a BPE tokenizer learns them as special tokens, so every
  ordinary encoding stays the same (:mod:`gptcore.data.tasks` has the input transformations);
* a :class:`gptcore.models.heads.LinearHead` reads the extract token's final hidden state, with
  dropout 0.1 before it: ``score`` (one output per class, or one for regression, no bias) or
  ``multiple_choice_head`` (one score per choice, softmax over the choices, with bias);
* loss = task loss + ``lm_weight`` * the LM loss on the same sequences (0.5; 0 turns it off);
* the recipe: Adam(beta2 0.999) with decoupled weight decay 0.01 on >= 2-D weights, lr 6.25e-5,
  linear warmup over 0.2% of the steps then linear decay to 0, batch 32 examples, 3 epochs,
  dropout 0.1, gradient clipping at 1.0. :class:`FinetuneConfig` holds them, all overridable.

A run writes into ``out``: ``log.jsonl`` (one object per step, one per validation),
``checkpoint/`` (model, optimizer and position, replaced atomically at the end of every epoch, and
when stopped with Ctrl-C or ``stop_after``) for ``resume=True``, which continues exactly (the same
batches, dropout masks and updates as a run never stopped), and ``model/`` at the end: the
fine-tuned model, its tokenizer, and its task record (task, labels, special-token ids) in
config.json's ``gptcore.task``. :func:`load_task_model` (``gptcore predict``) reads it back.
Every input is validated before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import data as gdata
from .. import io as gio
from .._progress import Progress, format_duration
from ..data.tasks import (
    SPECIAL_TOKENS,
    TASKS,
    LabelSpace,
    TaskData,
    TaskEncoder,
    check_example,
    check_examples,
    collate,
    read_jsonl,
)
from ..models.gpt import GPT
from ..models.heads import (
    LinearHead,
    gather_rows,
    mse_loss,
    scatter_rows,
    softmax_cross_entropy,
)
from ..optim import AdamW, linear_lr
from ..tokenizer import Tokenizer, _rebuild
from .checkpoint import CHECKPOINT_NAME, checkpoint_tokenizer
from ._run import (
    Checkpointer,
    after_update,
    StopFlag,
    TrainingDiverged,
    check_memory,
    diverged,
    emit,
    open_run_log,
    refuse_existing_run,
    resumed_config,
)

__all__ = ["FinetuneConfig", "finetune", "TaskModel", "Classifier", "MultipleChoice",
           "load_task_model", "evaluate_task", "metrics", "MODEL_NAME"]

MODEL_NAME = "model"  # the fine-tuned model's directory inside ``out``
_HEAD = {"choice": "multiple_choice_head"}  # every other task: "score"


@dataclass
class FinetuneConfig:
    """A fine-tuning run. ``train``/``val``: JSONL files (:mod:`gptcore.data.tasks`) or TaskData;
    ``checkpoint``: the pre-trained model (a `gptcore train` run directory, a gptcore or
    transformers GPT-2/GPT-1 directory, an llm.c .bin). Defaults are GPT-1's recipe."""

    task: str = "classify"
    train: Any = None  # a JSONL path, or a TaskData (in memory)
    val: Any = None
    checkpoint: Optional[str] = None
    out: Optional[str] = "gptcore-finetune"  # None: write nothing (used by the demo)
    lr: float = 6.25e-5
    batch_size: int = 32  # examples per step (a choice example is one sequence per choice)
    epochs: int = 3
    warmup: float = 0.002  # fraction of all steps
    lm_weight: float = 0.5
    dropout: float = 0.1  # the trunk's embedding, attention and residual dropout
    head_dropout: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    n_ctx: Optional[int] = None  # default: the model's block_size
    seed: int = 42
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False  # replace a run that ``out`` already holds (otherwise refused)
    stop_after: Optional[int] = None  # stop (and checkpoint) after this many steps
    threads: Optional[int] = None
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        """The settings as JSON values (examples given in memory are recorded by their name)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("train", "val"):
            if isinstance(d[k], TaskData):
                d[k] = d[k].path
        return d


# fields a resumed run takes from the new config; everything else comes from the checkpoint


def _check_config(cfg: FinetuneConfig) -> None:
    if cfg.task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {cfg.task!r}")
    for name in ("batch_size", "epochs"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    for name in ("lr", "lm_weight", "weight_decay", "grad_clip", "eps"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    for name in ("warmup", "dropout", "head_dropout", "beta1", "beta2"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
    if cfg.n_ctx is not None and (isinstance(cfg.n_ctx, bool) or not isinstance(cfg.n_ctx, int)
                                  or cfg.n_ctx < 8):
        raise ValueError(f"n_ctx: expected an int >= 8, got {cfg.n_ctx!r}")
    if cfg.stop_after is not None and (not isinstance(cfg.stop_after, int) or cfg.stop_after < 1):
        raise ValueError(f"stop_after: expected an int >= 1, got {cfg.stop_after!r}")


# ---- tokenizers ------------------------------------------------------------------------------


def _base_tokenizer(tok) -> Optional[Tokenizer]:
    """The gptcore.Tokenizer inside ``tok`` (data's GPT-2 adapter wraps one), or None (bytes)."""
    for candidate in (tok, getattr(tok, "_tok", None)):
        if isinstance(candidate, Tokenizer):
            return candidate
    return None


def _encoder_fn(tok):
    """The tokenizer's ordinary-text encoding (special-token text is never special in data)."""
    bpe = _base_tokenizer(tok)
    return bpe.encode_ordinary if bpe is not None else tok.encode


def _with_specials(tok, first_id: int):
    """A BPE tokenizer that also knows the three task tokens as special tokens with ids
    ``first_id``..``first_id + 2``; every ordinary encoding is unchanged. A byte-level tokenizer
    (no vocabulary files) or one whose ids stop short of ``first_id`` is returned as it is."""
    bpe = _base_tokenizer(tok)
    if bpe is None or bpe.vocab_size != first_id:
        return tok
    if any(text in bpe.special_tokens for _, text in SPECIAL_TOKENS):
        return bpe  # already extended
    specials = list(bpe._core.specials()) + [(text, first_id + i)
                                             for i, (_, text) in enumerate(SPECIAL_TOKENS)]
    return _rebuild(bpe._core.vocab(), bpe._core.merges(), specials, bpe.name)


def _tokenizer_record(tok) -> str:
    """How a task record names its tokenizer: "byte" (gptcore's byte-level one, no files),
    "files" (a BPE tokenizer saved with the model) or "custom" (another object with an
    ``encode(text)``, e.g. a transformers tokenizer: not saved, pass it again when loading)."""
    if isinstance(tok, gdata.ByteTokenizer):
        return "byte"
    return "files" if _base_tokenizer(tok) is not None else "custom"


def _refuse_gpt1_vocabulary(path: str) -> None:
    """GPT-1's own BPE (lower-cased, ``</w>`` word ends: transformers' OpenAIGPTTokenizer) is not
    gptcore's byte-level BPE; reading its merges.txt as one would tokenize wrongly, silently."""
    merges = os.path.join(path, "merges.txt")
    try:
        with open(merges, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return
    if "</w>" in head:
        raise ValueError(f"checkpoint {path!r}: its tokenizer is GPT-1's BPE (merges with </w>), "
                         "which gptcore does not implement; from Python pass base=(model, "
                         "tokenizer) with a tokenizer that has encode(text), e.g. transformers' "
                         "OpenAIGPTTokenizer")


def _tokenizer_of(path: str, vocab_size: int, recorded: Optional[str] = None):
    """The tokenizer a checkpoint directory holds or names (:func:`checkpoint_tokenizer`), after
    refusing GPT-1's own vocabulary."""
    if os.path.isdir(path):
        _refuse_gpt1_vocabulary(path)
    return checkpoint_tokenizer(path, vocab_size, recorded)


def _model_dir(path: str) -> str:
    """A `gptcore train`/`finetune` output directory -> the model directory inside it."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        for sub in (MODEL_NAME, CHECKPOINT_NAME):
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                return os.path.join(path, sub)
    return path


# ---- the task model --------------------------------------------------------------------------


class TaskModel:
    """A fine-tuned GPT with its head, tokenizer and task record. Use :class:`Classifier`
    (classify, entail, similar) or :class:`MultipleChoice`; :func:`load_task_model` reads one."""

    def __init__(self, model: GPT, tokenizer, task: Dict[str, Any]):
        self.model, self.tokenizer, self.info = model, tokenizer, dict(task)
        self.task = task["task"]
        self.labels = LabelSpace.from_dict(task["labels"])
        self.head_name = _HEAD.get(self.task, "score")
        if self.head_name not in model.heads:
            raise ValueError(f"model: has no {self.head_name!r} head for task {self.task!r}")
        self.head = model.heads[self.head_name]
        self.encoder = TaskEncoder(self.task, _encoder_fn(tokenizer), task["special_tokens"],
                                   int(task["n_ctx"]))

    def _data(self, examples, need_labels: bool = False) -> TaskData:
        if isinstance(examples, TaskData):
            data = examples
        else:
            examples = list(examples)
            where = [f"examples[{i}]" for i in range(len(examples))]
            for ex, at in zip(examples, where):
                check_example(self.task, ex, at, need_labels)
            if not examples:
                raise ValueError("examples: expected at least one example")
            data = TaskData(self.task, "examples", examples, where,
                            all("label" in ex for ex in examples))
        check_examples(data, self.labels)
        return data

    def batches(self, data: TaskData, order: Sequence[int], batch_size: int, labels=None):
        """Batches of ``data.examples[order]``, ``batch_size`` examples each."""
        group = self.encoder.group or len(data.examples[0]["choices"])
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            seqs = [s for j in idx for s in self.encoder.sequences(data.examples[j])]
            yield collate(seqs, group, pad_id=self.encoder.start,
                          labels=None if labels is None else labels[idx],
                          max_len=self.model.config.block_size)

    def head_outputs(self, h, batch) -> np.ndarray:
        """The head's outputs for hidden states ``h`` of ``batch``: (examples, n_out), or
        (examples, choices) for multiple choice."""
        rows = gather_rows(h, batch.extract)
        if self.task == "similar":  # both orders through the trunk, summed before the head
            rows = rows[0::2] + rows[1::2]
        out = self.head.forward(rows)
        if self.task == "choice":
            out = out.reshape(batch.n_examples, batch.group)
        return out

    def scores(self, examples, batch_size: int = 32) -> np.ndarray:
        """Head outputs per example: (N, classes) logits, (N,) regression values, or
        (N, choices) choice scores. ``examples``: dicts in the task's format (labels optional)."""
        data = self._data(examples)
        was = self.model.training
        self.model.eval()
        outs = []
        try:
            for b in self.batches(data, np.arange(len(data)), batch_size):
                outs.append(self.head_outputs(self.model.hidden_states(b.ids), b))
        finally:
            self.model.train(was)
        out = np.concatenate(outs)
        return out[:, 0] if self.labels.kind == "regression" else out

    def predict(self, examples, batch_size: int = 32) -> List[Any]:
        """The predicted label of each example (a class label, a number, a choice index)."""
        return self.labels_of(self.scores(examples, batch_size))

    def labels_of(self, s: np.ndarray) -> List[Any]:
        """The predictions :meth:`predict` gives for scores ``s`` from :meth:`scores`."""
        if self.labels.kind == "regression":
            return [float(v) for v in s]
        best = s.argmax(axis=1)
        if self.labels.kind == "choice":
            return [int(i) for i in best]
        return [self.labels.names[int(i)] for i in best]

    def save(self, path: str, optimizer=None, state: Optional[Dict[str, Any]] = None) -> None:
        """Write the model (transformers' GPT2ForSequenceClassification / GPT2DoubleHeadsModel
        layout, see gptcore.io), its tokenizer (BPE) and the task record (config.json's
        gptcore.task), atomically; ``optimizer`` and ``state`` for resuming."""
        st = dict(state or {})
        gio.save_pretrained(self.model, path, optimizer=optimizer, state=st, step=st.get("step"),
                            tokenizer=_base_tokenizer(self.tokenizer), task_config=self.info)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, labels={self.labels}, {self.model!r})"


class Classifier(TaskModel):
    """Classification, entailment or similarity: ``predict(examples)`` -> labels (or numbers)."""


class MultipleChoice(TaskModel):
    """Multiple choice: ``predict(examples)`` -> the index of the best choice per example."""


def _task_model(model, tokenizer, info) -> TaskModel:
    return (MultipleChoice if info["task"] == "choice" else Classifier)(model, tokenizer, info)


def load_task_model(path, device: str = "cpu", tokenizer=None) -> TaskModel:
    """A fine-tuned model from a `gptcore finetune` output directory or its model/checkpoint
    directory. A checkpoint without a task head or task record raises ValueError.
    ``tokenizer`` replaces the saved one (needed when the model was fine-tuned with a "custom"
    tokenizer object, which is not saved)."""
    path = _model_dir(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    model = gio.load_pretrained(path, device=device)
    heads = [h for h in ("score", "multiple_choice_head") if h in model.heads]
    info = gio.load_task_config(path) if os.path.isdir(path) else {}
    if not heads:
        raise ValueError(f"checkpoint {path!r} has no task head (score or multiple_choice_head): "
                         "it is a language model; fine-tune it first with `gptcore finetune`")
    if not isinstance(info.get("special_tokens"), dict) or info.get("task") not in TASKS:
        raise ValueError(f"checkpoint {path!r} has a {heads[0]!r} head but no gptcore task record "
                         "(config.json's gptcore.task: task, labels, special-token ids), so its "
                         "inputs cannot be built; it was not written by `gptcore finetune`")
    if tokenizer is not None:
        tok = tokenizer
    elif info.get("tokenizer") == "custom":
        raise ValueError(f"checkpoint {path!r} was fine-tuned with a tokenizer object gptcore "
                         "cannot save; pass it again: load_task_model(path, tokenizer=...)")
    elif info.get("tokenizer") == "byte":
        tok = gdata.get_tokenizer("byte")
    else:
        tok = _tokenizer_of(path, model.config.vocab_size, info.get("tokenizer"))
    return _task_model(model, tok, info)


# ---- metrics ---------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman's correlation is Pearson's on these)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else float("nan")


def metrics(labels: LabelSpace, scores: np.ndarray, y: np.ndarray) -> Dict[str, float]:
    """accuracy, and for two classes F1 of class 1 (the second of the sorted labels: 1 of 0/1,
    "yes" of no/yes); Pearson, Spearman and MSE for regression. ``y``: class ids or targets."""
    if labels.kind == "regression":
        s = np.asarray(scores, np.float64)
        return {"pearson": _pearson(s, y), "spearman": _pearson(_ranks(s), _ranks(np.asarray(y))),
                "mse": float(((s - y) ** 2).mean())}
    pred = np.asarray(scores).argmax(axis=1)
    out = {"accuracy": float((pred == y).mean())}
    if labels.kind == "classes" and len(labels.names) == 2:
        tp = float(((pred == 1) & (y == 1)).sum())
        fp, fn = float(((pred == 1) & (y == 0)).sum()), float(((pred == 0) & (y == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def evaluate_task(tm: TaskModel, data: TaskData, batch_size: int = 32) -> Dict[str, float]:
    """Metrics of ``tm`` on labelled ``data`` (see :func:`metrics`)."""
    y = tm.labels.encode(tm._data(data, need_labels=True))
    return metrics(tm.labels, tm.scores(data, batch_size), y)


# ---- building the model ----------------------------------------------------------------------


def _extend_vocab(base: GPT, dropout: float, seed: int) -> GPT:
    """A copy of ``base`` with three more vocabulary rows (N(0, 0.02)) and the trunk dropout."""
    V = base.config.vocab_size
    cfg = dataclasses.replace(base.config, vocab_size=V + len(SPECIAL_TOKENS), embd_pdrop=dropout,
                              attn_pdrop=dropout, resid_pdrop=dropout)
    model = GPT(cfg, device=base.device, dtype=base.dtype, seed=seed, init=False)
    state = base.state_dict()
    rng = np.random.default_rng(seed)
    new_rows = rng.standard_normal((len(SPECIAL_TOKENS), cfg.n_embd)).astype(np.float32) * 0.02
    state["wte"] = np.concatenate([state["wte"], new_rows])
    model.load_state_dict(state)
    return model


def _base_model(source, device: str) -> Tuple[GPT, Any, str]:
    """(model, tokenizer, tokenizer record) of the pre-trained model: a path, or a
    (GPT, tokenizer) pair."""
    if isinstance(source, tuple):
        model, tok = source
        if not callable(getattr(tok, "encode", None)):
            raise TypeError(f"base: expected (GPT, tokenizer with encode(text)), got a "
                            f"{type(tok).__name__} tokenizer")
        return model, tok, _tokenizer_record(tok)
    if source is None:
        raise ValueError("checkpoint: expected the pre-trained model's directory (or file)")
    path = _model_dir(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path!r} does not exist")
    model = gio.load_pretrained(path, device=device)
    if model.heads:
        raise ValueError(f"checkpoint {path!r} already holds task head(s) {sorted(model.heads)}; "
                         "fine-tune from a pre-trained language model")
    tok = _tokenizer_of(path, model.config.vocab_size)
    return model, tok, _tokenizer_record(tok)


def _new_task_model(cfg: FinetuneConfig, labels: LabelSpace, base) -> TaskModel:
    model, tok, tok_record = _base_model(base, cfg.device)
    V = model.config.vocab_size
    if _base_tokenizer(tok) is not None and _base_tokenizer(tok).vocab_size > V:
        raise ValueError(f"checkpoint: its tokenizer has {_base_tokenizer(tok).vocab_size} tokens, "
                         f"the model only {V}")
    model = _extend_vocab(model, cfg.dropout, cfg.seed)
    specials = {name: V + i for i, (name, _) in enumerate(SPECIAL_TOKENS)}
    head = LinearHead(model.config.n_embd, labels.n_out, _HEAD.get(cfg.task, "score"),
                      bias=cfg.task == "choice", dropout=cfg.head_dropout, seed=cfg.seed,
                      device=model.device, dtype=model.dtype)
    model.add_head(head)
    n_ctx = min(cfg.n_ctx or model.config.block_size, model.config.block_size)
    info = {"task": cfg.task, "labels": labels.to_dict(), "special_tokens": specials,
            "n_ctx": n_ctx, "tokenizer": tok_record, "head": head.name}
    return _task_model(model.train(), _with_specials(tok, V), info)


# ---- the loop --------------------------------------------------------------------------------


def _loss_and_backward(tm: TaskModel, batch, lm_weight: float) -> Tuple[float, float]:
    """One forward and backward of task loss + lm_weight * LM loss; returns (task, LM) loss."""
    model = tm.model
    if lm_weight > 0:
        lm = model.forward(batch.ids, batch.targets, loss_scale=lm_weight)
        h = model.last_hidden_states
    else:
        lm, h = float("nan"), model.hidden_states(batch.ids)
    shape = tuple(h.shape)
    out = tm.head_outputs(h, batch)
    if tm.labels.kind == "regression":
        loss, dout = mse_loss(out, batch.labels.reshape(-1, 1))
    else:
        loss, dout = softmax_cross_entropy(out, batch.labels)
        dout = dout.reshape(-1, 1) if tm.task == "choice" else dout
    drows = tm.head.backward(dout)
    if tm.task == "similar":  # the sum sends the same gradient to both orders
        drows = np.repeat(drows, 2, axis=0)
    model.backward(dh=scatter_rows(drows, batch.extract, shape))
    return loss, lm


def _task_data(source, task: str) -> TaskData:
    """A JSONL file's examples, or examples already in memory (a TaskData, checked here)."""
    if isinstance(source, TaskData):
        for ex, at in zip(source.examples, source.where):
            check_example(task, ex, at, False)
        return source
    return read_jsonl(source, task)


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def finetune(cfg: Optional[FinetuneConfig] = None, *, base=None, **kwargs) -> Dict[str, Any]:
    """Fine-tune a pre-trained model on a task; returns a summary with the fine-tuned
    :class:`TaskModel` under "model", per-step losses and per-epoch validation metrics.

    ``cfg`` or keyword arguments (FinetuneConfig's fields). ``base`` (a (GPT, tokenizer) pair)
    replaces ``cfg.checkpoint`` for models already in memory (it is not modified).
    """
    if cfg is None:
        cfg = FinetuneConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"cfg: expected a FinetuneConfig, got {type(cfg).__name__}")
    ckpt = None
    if cfg.resume:
        if not cfg.out:
            raise ValueError("resume: needs out (the run directory to continue)")
        if cfg.overwrite:
            raise ValueError("resume and overwrite: a run is either continued or replaced, not both")
        cfg, ckpt = resumed_config(cfg, "finetune_config", "gptcore finetune")
    _check_config(cfg)
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *a, **k: None)

    # everything is read and checked before anything is written
    if cfg.out and not cfg.resume and not cfg.overwrite:
        refuse_existing_run(cfg.out, ("log.jsonl", CHECKPOINT_NAME, MODEL_NAME))
    if cfg.train is None:
        raise ValueError("train: expected a JSONL file of labelled examples")
    train_data = _task_data(cfg.train, cfg.task)
    val_data = _task_data(cfg.val, cfg.task) if cfg.val is not None else None
    if ckpt is not None:
        tm = load_task_model(os.path.join(cfg.out, CHECKPOINT_NAME), device=cfg.device)
        tm.head.dropout = cfg.head_dropout
        tm.model.seed = tm.head.seed = cfg.seed  # they key the dropout masks
        tm.model.train()
    else:
        labels = LabelSpace.from_data(train_data)
        tm = _new_task_model(cfg, labels, base if base is not None else cfg.checkpoint)
    check_examples(train_data, tm.labels)  # (a resumed run: the checkpoint's labels)
    train_y = tm.labels.encode(train_data)
    if val_data is not None:
        if not val_data.has_labels:
            first = next(w for ex, w in zip(val_data.examples, val_data.where) if "label" not in ex)
            raise ValueError(f"{first}: missing field 'label' (validation examples need labels)")
        check_examples(val_data, tm.labels)

    model = tm.model
    opt = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, seed=cfg.seed)
    n = len(train_data)
    per_epoch = -(-n // cfg.batch_size)
    total = per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup * total))
    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        st = ckpt["state"]
        step, elapsed_before = int(st["step"]), float(st.get("elapsed", 0.0))
        model.dropout_step, tm.head.step = int(st["dropout_step"]), int(st["head_step"])
        say(f"Resumed from {os.path.join(cfg.out, CHECKPOINT_NAME)} at step {step} of {total}")

    cut = {"train": tm.encoder.count_truncated(train_data.examples)}
    if val_data is not None:
        cut["val"] = tm.encoder.count_truncated(val_data.examples)
    per_example = tm.encoder.group or max(len(ex["choices"]) for ex in train_data.examples)
    check_memory(model.config, cfg.batch_size * per_example, tm.encoder.longest, model.dtype,
                 model.device, what="this fine-tuning run")
    log_file = open_run_log(cfg.out, step if ckpt is not None else None) if cfg.out else None
    emit(log_file, {"step": step, **{f"truncated_{k}": v for k, v in cut.items()},
                     "n_ctx": tm.encoder.n_ctx})
    say(f"{model!r}\nfine-tune {cfg.task}: {n} train examples"
        f"{'' if val_data is None else f', {len(val_data)} val'}; {cfg.epochs} epochs x "
        f"{per_epoch} steps of {cfg.batch_size}; lr {cfg.lr:g}, LM weight {cfg.lm_weight:g}")
    losses: List[float] = []
    history: List[Dict[str, Any]] = []
    t_start = time.perf_counter()

    def state_now() -> Dict[str, Any]:
        return {"step": step, "dropout_step": model.dropout_step, "head_step": tm.head.step,
                "finetune_config": cfg.to_dict(), "truncated": cut,
                "elapsed": elapsed_before + time.perf_counter() - t_start}

    saver = Checkpointer(os.path.join(cfg.out, CHECKPOINT_NAME) if cfg.out else None,
                         lambda _: tm.save(saver.path, optimizer=opt, state=state_now()),
                         lambda msg: bar.write(msg), last_saved=step if ckpt is not None else None)

    def validate(epoch: int) -> None:
        if val_data is None:
            return
        m = evaluate_task(tm, val_data, cfg.batch_size)
        rec = {"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in m.items()}}
        history.append(rec)
        emit(log_file, rec)
        bar.write(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))

    bar = Progress(total=total, desc=f"finetune {cfg.task}", unit="step", enabled=cfg.progress,
                   initial=step)
    stopped = interrupted = False
    failure = None
    try:
        with StopFlag() as stop:
            while step < total:
                epoch, pos = divmod(step, per_epoch)
                order = _epoch_order(cfg.seed, epoch, n)[pos * cfg.batch_size:
                                                         (pos + 1) * cfg.batch_size]
                batch = next(tm.batches(train_data, order, cfg.batch_size, train_y))
                t0 = time.perf_counter()
                lr = linear_lr(step, cfg.lr, warmup, total, 0.0)
                model.zero_grad()
                loss, lm = _loss_and_backward(tm, batch, cfg.lm_weight)
                # a non-finite gradient norm makes AdamW skip the update: the weights stay good
                norm = opt.step(lr=lr, grad_clip=cfg.grad_clip or None) if math.isfinite(loss) else float("nan")
                if not math.isfinite(loss) or not math.isfinite(norm):
                    failure = diverged(model, step + 1, loss, norm, cfg.lr, saver)
                    emit(log_file, {"step": step + 1, "loss": loss, "grad_norm": norm,
                                    "error": failure})
                    stopped = True
                    break
                step += 1
                dt = time.perf_counter() - t0
                losses.append(loss)
                rec = {"step": step, "epoch": epoch, "loss": loss,
                       "lm_loss": None if math.isnan(lm) else lm, "lr": lr, "grad_norm": norm,
                       "examples_per_s": batch.n_examples / dt}
                emit(log_file, rec)
                bar.update(1, postfix=f"loss {loss:.4f} | {batch.n_examples / dt:,.0f} ex/s")
                if after_update(step, epoch, per_epoch, total, validate, saver, stop, bar,
                                stop_after=cfg.stop_after):
                    stopped, interrupted = True, stop.requested
                    break
            if not stopped:
                saver.save(step, final=True)
                if cfg.out:
                    tm.save(os.path.join(cfg.out, MODEL_NAME),
                            state={"step": step, "truncated": cut})
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if failure is not None:
        raise TrainingDiverged(failure)
    model.eval()
    elapsed = elapsed_before + time.perf_counter() - t_start
    if any(cut.values()):
        say("note: examples longer than n_ctx " f"{tm.encoder.n_ctx} were truncated: "
            + ", ".join(f"{v} of {k}" for k, v in cut.items()) + " (see log.jsonl)")
    if cfg.progress and not stopped:
        where = f"; model in {os.path.join(cfg.out, MODEL_NAME)}" if cfg.out else ""
        say(f"done: {step} steps in {format_duration(elapsed)}{where}")
    return {"model": tm, "steps": step, "losses": losses, "val": history,
            "stopped_early": stopped, "interrupted": interrupted, "truncated": cut, "elapsed": elapsed,
            "out": cfg.out}
