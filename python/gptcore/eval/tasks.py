"""Evaluation tasks: the task file format, readers for public formats, GPT-3's k-shot prompts,
and the metrics.

The task file (JSON Lines, UTF-8). The first line is a header naming the kind of task; every
other line is one example::

    {"kind": "multiple_choice", "name": "tiny-mc", "description": "Pick the ending."}
    {"context": "The sky is", "choices": ["blue", "green"], "label": 0}
    {"context": "Water is", "choices": ["wet", "dry"], "label": 0, "split": "train"}

Header keys: ``kind`` (required): ``multiple_choice``, ``cloze``, ``perplexity`` or
``generation``; ``name`` (default: the file name); ``description`` (optional, prepended to
every prompt, GPT-3's task description); ``target_delimiter`` (default ``" "``: what joins a
context and its answer); for generation ``until`` (stop strings, default ``["\\n"]``) and
``max_tokens`` (default 32).

Example keys by kind:

* ``multiple_choice``: ``context``, ``choices`` (list of str), ``label`` (index of the right
  one). Each choice is scored as the continuation ``target_delimiter + choice``.
* ``cloze`` (LAMBADA-style): ``context``, ``target`` (the word to predict).
* ``generation``: ``context``, ``answer`` (a str, or a list of acceptable str).
* ``perplexity``: ``text``.

An example with ``"split": "train"`` is a demonstration only: k-shot prompts draw from those
(GPT-3 drew from the training set); without any, demonstrations come from the other examples.

k-shot prompts, as GPT-3 built them: the description (if any), then k demonstrations (each
``context + target_delimiter + answer``), drawn without replacement with a seed per example,
joined with ``"\\n\\n"``, then ``"\\n\\n"`` and the example's own context.

Public formats (``format=`` or detected): ``hellaswag`` (the original JSONL with ``ctx``,
``endings``, ``label``, ``activity_label``, preprocessed as the harness does), ``lambada``
(lambada_openai's JSONL of ``{"text": ...}``: the last word is the target) and ``wikitext``
(a ``wiki.*.raw`` file split into articles at its `` = Title = `` headings, or JSONL with a
``page`` field; scored as written, without the harness's detokenizer).

Metrics. Multiple choice: ``acc`` (the highest total log-likelihood), ``acc_norm`` (divided by
the choice's length in characters, as the harness), ``acc_norm_tokens`` (by its number of
tokens, as GPT-3 and llm.c). Cloze: ``acc`` (the whole target is the greedy continuation) and
``perplexity`` (exp of minus the mean log-likelihood of the target). Perplexity:
``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``, ``token_perplexity``. Generation:
``exact_match`` and ``f1`` (SQuAD-style, best over the answers). Means carry their standard
error (sample standard deviation / sqrt(n)); perplexities have none.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .._fileio import jsonl_records

__all__ = ["Task", "KINDS", "load_task", "build_prompt", "evaluate"]

KINDS = ("multiple_choice", "cloze", "perplexity", "generation")
_FORMATS = ("auto", "gptcore", "hellaswag", "lambada", "wikitext")
_HEADER_KEYS = {"kind", "name", "description", "target_delimiter", "until", "max_tokens"}
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Task:
    """A task read from a file: its examples (``docs``, normalised to the fields of its kind)
    and the demonstrations' pool (``fewshot_docs``)."""

    name: str
    kind: str
    docs: List[dict]
    fewshot_docs: List[dict] = field(default_factory=list)
    description: str = ""
    target_delimiter: str = " "
    until: List[str] = field(default_factory=lambda: ["\n"])
    max_tokens: int = 32
    path: str = ""


# ---- reading ------------------------------------------------------------------------------


def _read_jsonl(path: str) -> List[tuple]:
    """(line number, object) of every non-blank line; a malformed line names file and line."""
    out = []
    for n, obj in jsonl_records(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def _detect(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", "replace")
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return "wikitext"  # plain text
    if isinstance(obj, dict):
        if "kind" in obj:
            return "gptcore"
        if {"ctx", "endings", "label"} <= set(obj):
            return "hellaswag"
        if "page" in obj:
            return "wikitext"
        if set(obj) == {"text"}:
            return "lambada"
    raise ValueError(f"{path}:1: cannot tell the task format (expected a gptcore header line with "
                     f"'kind', HellaSwag's ctx/endings/label, LAMBADA's text or WikiText's page); "
                     f"pass format=")


def load_task(path, format: str = "auto", fewshot_path=None) -> Task:
    """Read a task file (see the module doc); ``fewshot_path``: a file of the same format whose
    examples are the demonstrations' pool (e.g. HellaSwag's train split)."""
    path = os.fspath(path)
    if format not in _FORMATS:
        raise ValueError(f"format: expected one of {', '.join(_FORMATS)}, got {format!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path!r} does not exist")
    fmt = _detect(path) if format == "auto" else format
    task = {"gptcore": _read_gptcore, "hellaswag": _read_hellaswag, "lambada": _read_lambada,
            "wikitext": _read_wikitext}[fmt](path)
    if fewshot_path is not None:
        pool = load_task(fewshot_path, format=fmt)
        if pool.kind != task.kind:
            raise ValueError(f"{os.fspath(fewshot_path)}: a {pool.kind} task cannot give "
                             f"demonstrations to the {task.kind} task {path}")
        task.fewshot_docs = pool.docs + pool.fewshot_docs
    if not task.docs:
        raise ValueError(f"{path}: no examples to evaluate")
    return task


def _str_field(obj, key, where) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(v).__name__}")
    return v


def _normalise(kind: str, obj: dict, where: str) -> dict:
    """One example of ``kind`` checked and reduced to its fields."""
    if kind == "multiple_choice":
        ctx = _str_field(obj, "context", where)
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(
                isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        label = obj.get("label")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{where}: 'label' must be an integer, got {label!r}")
        if not 0 <= label < len(choices):
            raise ValueError(f"{where}: label {label} is out of range for {len(choices)} choices")
        return {"context": ctx, "choices": choices, "label": label}
    if kind == "cloze":
        target = _str_field(obj, "target", where)
        if not target.strip():
            raise ValueError(f"{where}: 'target' is empty")
        return {"context": _str_field(obj, "context", where), "target": target}
    if kind == "generation":
        ans = obj.get("answer")
        answers = [ans] if isinstance(ans, str) else ans
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of strings")
        return {"context": _str_field(obj, "context", where), "answers": answers}
    text = _str_field(obj, "text", where)
    if not text:
        raise ValueError(f"{where}: 'text' is empty")
    return {"text": text}


def _read_gptcore(path: str) -> Task:
    lines = _read_jsonl(path)
    if not lines or "kind" not in lines[0][1]:
        raise ValueError(f"{path}:1: the first line must be the task header, e.g. "
                         f'{{"kind": "multiple_choice"}}')
    n0, head = lines[0]
    unknown = set(head) - _HEADER_KEYS
    if unknown:
        raise ValueError(f"{path}:{n0}: unknown header keys {sorted(unknown)}")
    kind = head["kind"]
    if kind not in KINDS:
        raise ValueError(f"{path}:{n0}: kind {kind!r} is not one of {', '.join(KINDS)}")
    until = head.get("until", ["\n"])
    until = [until] if isinstance(until, str) else until
    max_tokens = head.get("max_tokens", 32)
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"{path}:{n0}: 'until' must be a string or a list of strings")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{path}:{n0}: 'max_tokens' must be an integer >= 1")
    task = Task(name=str(head.get("name") or _stem(path)), kind=kind, docs=[], path=path,
                description=_str_field({"d": head.get("description", "")}, "d", f"{path}:{n0}"),
                target_delimiter=_str_field({"t": head.get("target_delimiter", " ")}, "t",
                                            f"{path}:{n0}"),
                until=until, max_tokens=max_tokens)
    for n, obj in lines[1:]:
        where = f"{path}:{n}"
        if "kind" in obj:
            raise ValueError(f"{where}: a second header line")
        split = obj.get("split", "test")
        doc = _normalise(kind, obj, where)
        (task.fewshot_docs if split == "train" else task.docs).append(doc)
    return task


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _hellaswag_clean(text: str) -> str:
    # the harness's preprocessing: WikiHow's " [title]" marks end a sentence, other bracketed
    # markers go, double spaces close up
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _read_hellaswag(path: str) -> Task:
    task = Task(name=_stem(path), kind="multiple_choice", docs=[], path=path)
    for n, obj in _read_jsonl(path):
        where = f"{path}:{n}"
        try:
            ctx = obj["ctx_a"] + " " + obj["ctx_b"].capitalize() if "ctx_a" in obj else obj["ctx"]
            query = _hellaswag_clean(obj.get("activity_label", "") + ": " + ctx)
            choices = [_hellaswag_clean(e) for e in obj["endings"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: not a HellaSwag example ({e!r})") from None
        task.docs.append(_normalise("multiple_choice", {"context": query, "choices": choices,
                                                        "label": obj.get("label")}, where))
    return task


def _read_lambada(path: str) -> Task:
    task = Task(name=_stem(path), kind="cloze", docs=[], path=path)
    for n, obj in _read_jsonl(path):
        text = _str_field(obj, "text", f"{path}:{n}").strip()
        if " " not in text:
            raise ValueError(f"{path}:{n}: a LAMBADA passage needs a context before its last word")
        ctx, last = text.rsplit(" ", 1)
        task.docs.append({"context": ctx, "target": last})
    return task


def _read_wikitext(path: str) -> Task:
    task = Task(name=_stem(path), kind="perplexity", docs=[], path=path)
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
    if head == "{":
        for n, obj in _read_jsonl(path):
            task.docs.append(_normalise("perplexity", {"text": obj.get("page")}, f"{path}:{n}"))
        return task
    # wiki.*.raw: an article starts at a " = Title = " line (one '=' each side)
    article: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if re.fullmatch(r" = [^=].*[^=] = \n?", line) and any(s.strip() for s in article):
                task.docs.append({"text": "".join(article)})
                article = []
            article.append(line)
    if any(s.strip() for s in article):
        task.docs.append({"text": "".join(article)})
    return task


# ---- prompts ------------------------------------------------------------------------------


def _answer(task: Task, doc: dict) -> str:
    if task.kind == "multiple_choice":
        return doc["choices"][doc["label"]]
    if task.kind == "cloze":
        return doc["target"]
    return doc["answers"][0]


def build_prompt(task: Task, index: int, shots: int, seed: int = 1234) -> str:
    """The k-shot context of ``task.docs[index]``: description, ``shots`` demonstrations drawn
    with ``seed`` (and the example's index) from the pool, each joined by ``"\\n\\n"``."""
    doc = task.docs[index]
    parts = [task.description] if task.description else []
    if shots:
        pool = task.fewshot_docs or [d for j, d in enumerate(task.docs) if j != index]
        if shots > len(pool):
            raise ValueError(f"shots: {shots} demonstrations asked for, {task.name} has "
                             f"{len(pool)} to draw from")
        rng = np.random.default_rng([seed, index])
        for j in rng.choice(len(pool), size=shots, replace=False):
            d = pool[int(j)]
            parts.append(d["context"] + task.target_delimiter + _answer(task, d))
    parts.append(doc["context"])
    return FEWSHOT_DELIMITER.join(parts)


# ---- metrics ------------------------------------------------------------------------------


def _mean_stderr(values) -> tuple:
    x = np.asarray(values, np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(x.mean()), se


def _normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize_answer(pred).split(), _normalize_answer(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def evaluate(scorer, task: Task, shots: Sequence[int] = (0,), limit: Optional[int] = None,
             seed: int = 1234, progress=None) -> List[Dict]:
    """Score ``task`` at every number of ``shots`` with a :class:`~gptcore.eval.Scorer`.
    Returns result rows ``{task, kind, shots, metric, value, stderr, n, truncated}``.
    Perplexity tasks take no demonstrations (only 0 shots). ``progress(desc, total)``, when
    given, makes a bar (``update(n)``, ``close()``) for each number of shots, counted in
    requests (one per choice, example or text)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected an int >= 1, got {limit!r}")
    shots = list(shots)
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots):
        raise ValueError(f"shots: expected integers >= 0, got {shots!r}")
    if task.kind == "perplexity" and shots != [0]:
        raise ValueError(f"shots: {task.name} is a perplexity task, which takes no "
                         f"demonstrations (use 0)")
    idx = range(len(task.docs) if limit is None else min(limit, len(task.docs)))
    rows = []
    for k in shots:
        before = scorer.truncated
        bar = None
        if progress is not None:
            per_doc = [len(task.docs[i]["choices"]) if task.kind == "multiple_choice" else 1
                       for i in idx]
            bar = progress(f"{task.name} {k}-shot", sum(per_doc))
            scorer.progress = bar.update
        try:
            metrics = _score(scorer, task, list(idx), k, seed)
        finally:
            if bar is not None:
                scorer.progress = None
                bar.close()
        for name, (value, se) in metrics.items():
            rows.append({"task": task.name, "kind": task.kind, "shots": k, "metric": name,
                         "value": value, "stderr": se, "n": len(idx),
                         "truncated": scorer.truncated - before})
    return rows


def _score(scorer, task: Task, idx: List[int], k: int, seed: int) -> Dict[str, tuple]:
    docs = [task.docs[i] for i in idx]
    if task.kind == "perplexity":
        texts = [d["text"] for d in docs]
        res = scorer.loglikelihood_rolling(texts)
        ll = sum(r[0] for r in res)
        tokens = sum(r[1] for r in res)
        words = sum(len(re.split(r"\s+", t)) for t in texts)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        return {"word_perplexity": (math.exp(-ll / words), None),
                "byte_perplexity": (math.exp(-ll / nbytes), None),
                "bits_per_byte": (-ll / nbytes / math.log(2), None),
                "token_perplexity": (math.exp(-ll / tokens), None)}
    prompts = [build_prompt(task, i, k, seed) for i in idx]
    delim = task.target_delimiter
    if task.kind == "multiple_choice":
        pairs = [scorer.encode_pair(p, delim + c) for p, d in zip(prompts, docs)
                 for c in d["choices"]]
        res = scorer.loglikelihood_tokens(pairs)
        acc, acc_norm, acc_tok = [], [], []
        s = 0
        for d in docs:
            n = len(d["choices"])
            ll = np.array([r[0] for r in res[s: s + n]])
            ntok = np.array([len(cont) for _, cont in pairs[s: s + n]])
            nchar = np.array([len(c) for c in d["choices"]], np.float64)
            acc.append(float(np.argmax(ll) == d["label"]))
            acc_norm.append(float(np.argmax(ll / nchar) == d["label"]))
            acc_tok.append(float(np.argmax(ll / ntok) == d["label"]))
            s += n
        return {"acc": _mean_stderr(acc), "acc_norm": _mean_stderr(acc_norm),
                "acc_norm_tokens": _mean_stderr(acc_tok)}
    if task.kind == "cloze":
        res = scorer.loglikelihood([(p, delim + d["target"]) for p, d in zip(prompts, docs)])
        lls = [r[0] for r in res]
        return {"acc": _mean_stderr([float(r[1]) for r in res]),
                "perplexity": (math.exp(-float(np.mean(lls))), None)}
    outs = scorer.generate_until([(p, task.until, task.max_tokens) for p in prompts])
    em = [float(any(o.strip() == a.strip() for a in d["answers"])) for o, d in zip(outs, docs)]
    f1 = [max(_f1(o, a) for a in d["answers"]) for o, d in zip(outs, docs)]
    return {"exact_match": _mean_stderr(em), "f1": _mean_stderr(f1)}
