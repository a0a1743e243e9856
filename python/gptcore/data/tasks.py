"""GPT-1's task data: JSONL formats, the input transformations, truncation and batching.

Radford et al. (2018) fine-tune one pre-trained decoder on every task by turning each input into
token sequences framed by three new tokens, start, delimiter and extract; a linear head reads the
final hidden state of the extract token (the last token of every sequence here):

    classify  {"text", "label"}                         [start] text [extract]
    entail    {"premise", "hypothesis", "label"}        [start] premise [delim] hypothesis [extract]
    similar   {"text_a", "text_b", "label"}             [start] a [delim] b [extract] and
                                                        [start] b [delim] a [extract]; the two extract
                                                        states are summed before the head
    choice    {"context", "choices": [...], "label"}    [start] context [delim] choice [extract]
                                                        per choice; one score each, softmax over them

Labels: classify / entail / similar take str or int class labels (a model's classes are the
sorted distinct labels of its training file); a float label in a ``similar`` training file means
regression (MSE on one output). ``choice`` labels are the index of the right choice.

Over-long inputs are cut as the paper's code does: with two parts each keeps its first
``n_ctx // 2 - 2`` tokens; a single text keeps its first ``n_ctx - 2``. :class:`TaskEncoder`
counts the examples it cut.

Every error names the file and line: a malformed JSON line, a missing or mistyped field, an
unknown label, an empty choice list, a choice count that differs from the file's first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._fileio import jsonl_records

__all__ = ["TASKS", "TASK_FIELDS", "SPECIAL_TOKENS", "TaskData", "LabelSpace", "read_jsonl",
           "check_example", "check_examples", "TaskEncoder", "Batch", "collate"]

TASKS = ("classify", "entail", "similar", "choice")
# the text fields of each task, in the order they enter the sequence
TASK_FIELDS: Dict[str, Tuple[str, ...]] = {
    "classify": ("text",), "entail": ("premise", "hypothesis"), "similar": ("text_a", "text_b"),
    "choice": ("context", "choices"),
}
# the new tokens, in the order their ids follow the pre-trained vocabulary (V, V+1, V+2), and
# the text a BPE tokenizer learns them as (special tokens: never produced from ordinary text)
SPECIAL_TOKENS: Tuple[Tuple[str, str], ...] = (
    ("start", "<|start|>"), ("delim", "<|delim|>"), ("extract", "<|extract|>"))


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    return task


@dataclass
class TaskData:
    """Examples read from a JSONL file: ``examples[i]`` is the line's object, ``where[i]`` its
    ``file:line`` (for error messages), ``has_labels`` whether every line carried a label."""

    task: str
    path: str
    examples: List[Dict[str, Any]]
    where: List[str]
    has_labels: bool

    def __len__(self) -> int:
        return len(self.examples)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def check_example(task: str, ex: Any, where: str, need_label: bool) -> None:
    """Raise ValueError naming ``where`` unless ``ex`` is a valid ``task`` example (a label is
    required when ``need_label``)."""
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for name in TASK_FIELDS[task]:
        if name not in ex:
            raise ValueError(f"{where}: missing field {name!r} (a {task} example has "
                             f"{', '.join(TASK_FIELDS[task])}, label)")
    if task == "choice":
        if not isinstance(ex["context"], str):
            raise ValueError(f"{where}: field 'context' must be a string, got "
                             f"{type(ex['context']).__name__}")
        ch = ex["choices"]
        if not isinstance(ch, list) or not ch:
            raise ValueError(f"{where}: field 'choices' must be a non-empty list of strings, got "
                             f"{ch!r}")
        if not all(isinstance(c, str) for c in ch):
            raise ValueError(f"{where}: field 'choices' must hold strings only")
    else:
        for name in TASK_FIELDS[task]:
            if not isinstance(ex[name], str):
                raise ValueError(f"{where}: field {name!r} must be a string, got "
                                 f"{type(ex[name]).__name__}")
    if "label" not in ex:
        if need_label:
            raise ValueError(f"{where}: missing field 'label'")
        return
    y = ex["label"]
    if task == "choice":
        if not _is_int(y) or not 0 <= y < len(ex["choices"]):
            raise ValueError(f"{where}: label must be the index of the right choice, an int in "
                             f"[0, {len(ex['choices'])}), got {y!r}")
    elif task == "similar":
        if not (isinstance(y, str) or _is_num(y)):
            raise ValueError(f"{where}: label must be a class (str or int) or a finite number "
                             f"(regression), got {y!r}")
    elif not (isinstance(y, str) or _is_int(y)):
        raise ValueError(f"{where}: label must be a class name (str) or an int, got {y!r}")


def read_jsonl(path, task: str, need_labels: bool = True) -> TaskData:
    """Read and validate a task's JSONL file (one example per line; blank lines are skipped).

    Raises FileNotFoundError for a missing file and ValueError naming ``file:line`` for anything
    wrong in it. With ``need_labels=False`` (prediction) labels may be absent.
    """
    _check_task(task)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist (expected a JSONL file of {task} examples)")
    examples, where = [], []
    labelled = 0
    for lineno, ex in jsonl_records(path):
        at = f"{path}:{lineno}"
        check_example(task, ex, at, need_labels)
        labelled += "label" in ex
        examples.append(ex)
        where.append(at)
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    if task == "choice":  # one choice count per file: the batch is (examples, choices)
        k = len(examples[0]["choices"])
        for ex, at in zip(examples, where):
            if len(ex["choices"]) != k:
                raise ValueError(f"{at}: {len(ex['choices'])} choices, but {where[0]} has {k} "
                                 "(every example of a file needs the same number of choices)")
    return TaskData(task, path, examples, where, labelled == len(examples))


@dataclass
class LabelSpace:
    """What a model's head predicts. ``kind``: "classes" (``names``: the class labels, index =
    class id), "regression" (one number) or "choice" (``n_choices`` scores)."""

    kind: str
    names: Optional[List[Any]] = None
    n_choices: Optional[int] = None

    @property
    def n_out(self) -> int:
        return len(self.names) if self.kind == "classes" else 1

    @classmethod
    def from_data(cls, data: TaskData) -> "LabelSpace":
        """The label space of a training file (every line must carry a label)."""
        if not data.has_labels:
            first = next(w for ex, w in zip(data.examples, data.where) if "label" not in ex)
            raise ValueError(f"{first}: missing field 'label' (training data needs labels)")
        labels = [ex["label"] for ex in data.examples]
        if data.task == "choice":
            return cls("choice", n_choices=len(data.examples[0]["choices"]))
        if data.task == "similar" and any(isinstance(y, float) for y in labels):
            bad = [w for y, w in zip(labels, data.where) if not _is_num(y)]
            if bad:
                raise ValueError(f"{bad[0]}: a non-numeric label in a file of float labels "
                                 "(regression)")
            return cls("regression")
        kinds = {type(y) for y in labels}
        if len(kinds) > 1:
            i = next(i for i, y in enumerate(labels) if type(y) is not type(labels[0]))
            raise ValueError(f"{data.where[i]}: label {labels[i]!r} mixes numbers and strings "
                             f"with {data.where[0]}'s {labels[0]!r}")
        names = sorted(set(labels))
        if len(names) < 2:
            raise ValueError(f"{data.path}: every example has the label {names[0]!r}; a classifier "
                             "needs at least two classes")
        return cls("classes", names=names)

    def encode(self, data: TaskData) -> np.ndarray:
        """The labels of ``data`` as class ids (int64) or targets (float32); an unknown class
        label raises ValueError naming its line."""
        if self.kind == "regression":
            bad = [w for ex, w in zip(data.examples, data.where) if not _is_num(ex["label"])]
            if bad:
                raise ValueError(f"{bad[0]}: expected a number (this model does regression)")
            return np.array([float(ex["label"]) for ex in data.examples], np.float32)
        if self.kind == "choice":
            return np.array([ex["label"] for ex in data.examples], np.int64)
        index = {y: i for i, y in enumerate(self.names)}
        out = np.empty(len(data), np.int64)
        for i, (ex, at) in enumerate(zip(data.examples, data.where)):
            y = ex["label"]
            if y not in index or type(y) is not type(self.names[0]):
                raise ValueError(f"{at}: unknown label {y!r} (the model's classes are "
                                 f"{self.names})")
            out[i] = index[y]
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "names": self.names, "n_choices": self.n_choices}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LabelSpace":
        return cls(d["kind"], d.get("names"), d.get("n_choices"))


def check_examples(data: TaskData, labels: LabelSpace) -> None:
    """Raise ValueError (naming the line) when ``data`` does not fit a model's label space:
    a choice count other than the model's, an unknown label."""
    if labels.kind == "choice":
        k = len(data.examples[0]["choices"])
        if k != labels.n_choices:
            raise ValueError(f"{data.where[0]}: {k} choices, but the model was trained with "
                             f"{labels.n_choices}")
    if data.has_labels:
        labels.encode(data)


class TaskEncoder:
    """Turns examples into token sequences with GPT-1's transformations.

    ``encode(text) -> list of ids`` is the pre-trained tokenizer (ordinary text only);
    ``specials`` maps "start", "delim", "extract" to their ids; ``n_ctx`` bounds every sequence.
    ``truncated`` counts the examples whose text was cut since the encoder was made, and
    ``longest`` is the longest sequence made so far.
    """

    def __init__(self, task: str, encode: Callable[[str], Sequence[int]], specials: Dict[str, int],
                 n_ctx: int):
        self.task = _check_task(task)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 8:
            raise ValueError(f"n_ctx: expected an int >= 8, got {n_ctx!r}")
        missing = [n for n, _ in SPECIAL_TOKENS if n not in specials]
        if missing:
            raise ValueError(f"specials: missing {missing}")
        self._encode = encode
        self.start, self.delim, self.extract = (int(specials[n]) for n, _ in SPECIAL_TOKENS)
        self.n_ctx = n_ctx
        self.truncated = 0
        self.longest = 0
        self._cache: Dict[str, List[int]] = {}

    def _ids(self, text: str) -> List[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = [int(i) for i in self._encode(text)]
        return ids

    def _one(self, a: str, b: Optional[str] = None) -> Tuple[List[int], bool]:
        if b is None:
            x = self._ids(a)
            keep = self.n_ctx - 2
            return [self.start] + x[:keep] + [self.extract], len(x) > keep
        x1, x2 = self._ids(a), self._ids(b)
        keep = self.n_ctx // 2 - 2
        seq = [self.start] + x1[:keep] + [self.delim] + x2[:keep] + [self.extract]
        return seq, len(x1) > keep or len(x2) > keep

    def sequences(self, ex: Dict[str, Any]) -> List[List[int]]:
        """The sequences of one example: 1 (classify, entail), 2 (similar: both orders) or one
        per choice; each ends with the extract token."""
        t = self.task
        if t == "classify":
            out = [self._one(ex["text"])]
        elif t == "entail":
            out = [self._one(ex["premise"], ex["hypothesis"])]
        elif t == "similar":
            out = [self._one(ex["text_a"], ex["text_b"]), self._one(ex["text_b"], ex["text_a"])]
        else:
            out = [self._one(ex["context"], c) for c in ex["choices"]]
        self.truncated += any(cut for _, cut in out)
        self.longest = max(self.longest, max(len(s) for s, _ in out))
        return [s for s, _ in out]

    def count_truncated(self, examples) -> int:
        """How many of ``examples`` are cut to fit ``n_ctx`` (also added to ``truncated``)."""
        before = self.truncated
        for ex in examples:
            self.sequences(ex)
        return self.truncated - before

    @property
    def group(self) -> int:
        """Sequences per example (for choice: set by the data; see :func:`collate`)."""
        return {"classify": 1, "entail": 1, "similar": 2}.get(self.task, 0)


@dataclass
class Batch:
    """``ids`` (N, T) int32 right-padded sequences, ``targets`` (N, T) their next tokens (-1 past
    each sequence's end: the LM loss's targets), ``extract`` (N,) the last token's position,
    ``group`` sequences per example (N = examples x group), ``labels`` per example or None."""

    ids: np.ndarray
    targets: np.ndarray
    extract: np.ndarray
    group: int
    labels: Optional[np.ndarray]

    @property
    def n_examples(self) -> int:
        return self.ids.shape[0] // self.group


def collate(seqs: Sequence[Sequence[int]], group: int, pad_id: int, labels=None,
            multiple: int = 16, max_len: Optional[int] = None) -> Batch:
    """Right-pad ``seqs`` with ``pad_id`` to one length (the longest, rounded up to ``multiple``
    so that few distinct shapes occur, capped at ``max_len``)."""
    lengths = np.array([len(s) for s in seqs], np.int64)
    if not len(seqs) or lengths.min() < 2:
        raise ValueError("seqs: expected sequences of at least 2 tokens")
    T = int(-(-lengths.max() // multiple) * multiple)
    if max_len is not None:
        T = min(T, max_len)
    if lengths.max() > T:
        raise ValueError(f"seqs: a sequence of {lengths.max()} tokens exceeds {T}")
    ids = np.full((len(seqs), T), pad_id, np.int32)
    targets = np.full((len(seqs), T), -1, np.int32)
    for i, s in enumerate(seqs):
        n = len(s)
        ids[i, :n] = s
        targets[i, : n - 1] = s[1:]
    return Batch(ids, targets, lengths - 1, group, None if labels is None else np.asarray(labels))
