"""Supervised instruction tuning data (InstructGPT step 1): demonstrations, their plain-text
template, tokenisation with a loss mask, and length-bucketed batches.

Two JSONL record formats (one JSON object a line; other keys are ignored):

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

The template (:func:`render_messages`), plain text a reader can type at a prompt:

    system     "{content}\\n\\n"
    user       "User: {content}\\n"
    assistant  "Assistant: " + "{content}\\n"      (the loss covers "{content}\\n" only)

A prompt/completion record is used verbatim: the text is ``prompt + completion`` and the loss
covers the completion. Every example then ends with the tokenizer's end-of-text token when it
has one (byte-level: 256; GPT-2: 50256), trained when the example ends with a trained part, so a
tuned model learns to stop. To sample from a chat, end the prompt with "Assistant: "
(:func:`chat_prompt`) and stop at "\\nUser:" or end-of-text.

Tokenisation (:class:`SFTEncoder`) encodes each part on its own (ordinary text: special-token
text inside data is never special) and concatenates the ids, so the boundary between what is
trained and what is not falls exactly between tokens, the same way a prompt and its sampled
continuation meet at generation time. An example longer than the context keeps its first
``n_ctx + 1`` tokens (counted as truncated); one whose first trained token lies beyond the
context is an error naming its line.

Batching: *no packing*. The attention kernel is causal over the whole row with no
block-diagonal mask, and the embedding takes one position offset per call, so examples packed
into one row would attend to each other and get shifted positions. Instead each row holds one
example, right-padded with ignored targets (-1): causal attention means padding after an example
never reaches it, so the loss is exactly the per-example one. To keep the padding small,
:func:`length_batches` draws each epoch's batches from pools of similar length (shuffle, sort
pools of 50 batches by length, cut, shuffle the batch order). :class:`SFTBatch` reports how many
of its positions are real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .._fileio import jsonl_records

__all__ = ["ROLES", "SFTExample", "parse_sft_record", "read_sft", "render_messages", "chat_prompt",
           "text_encoder", "SFTEncoder", "EncodedExample", "SFTBatch", "collate_sft",
           "length_batches"]

ROLES = ("system", "user", "assistant")
_POOL = 50  # batches per length-sorted pool (see length_batches)


@dataclass(frozen=True)
class SFTExample:
    """One demonstration: ``segments`` ((text, trained) pairs, in order) and ``where`` it came
    from ("file:line"). ``prompt`` is the text before the last trained part and ``completion``
    that part: a (prompt, completion) pair for any record (what the reward model scores and a
    policy is prompted with)."""

    segments: Tuple[Tuple[str, bool], ...]
    where: str

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)

    @property
    def _last_trained(self) -> int:
        return max(i for i, (_, trained) in enumerate(self.segments) if trained)

    @property
    def prompt(self) -> str:
        return "".join(t for t, _ in self.segments[: self._last_trained])

    @property
    def completion(self) -> str:
        return self.segments[self._last_trained][0]


def _messages(msgs: Any, where: str) -> List[Tuple[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                         "{\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at}: expected an object with 'role' and 'content', got "
                             f"{type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{at}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        raise ValueError(f"{where}: 'messages' has no assistant turn (nothing to learn)")
    return out


def render_messages(messages: Sequence[Any], where: str = "messages") -> List[Tuple[str, bool]]:
    """The template's (text, trained) segments of a conversation (dicts with "role" and
    "content"); the assistant turns' contents are the trained parts (see the module doc)."""
    segs: List[Tuple[str, bool]] = []
    for role, content in _messages(list(messages), where):
        if role == "system":
            segs.append((content + "\n\n", False))
        elif role == "user":
            segs.append((f"User: {content}\n", False))
        else:
            segs += [("Assistant: ", False), (content + "\n", True)]
    return segs


def chat_prompt(messages: Sequence[Any]) -> str:
    """The text that asks for the next assistant turn: the rendered conversation (whose
    assistant turns are all past ones) followed by "Assistant: "."""
    msgs = list(messages)
    for i, m in enumerate(msgs):  # validate (assistant turns are optional here)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{\"role\": one of {', '.join(ROLES)}, "
                             "\"content\": str}")
    if not msgs:
        return "Assistant: "
    segs = render_messages(msgs + [{"role": "assistant", "content": ""}])
    return "".join(t for t, _ in segs[:-1])


def parse_sft_record(rec: Any, where: str) -> SFTExample:
    """One JSONL record (prompt/completion or messages) as an :class:`SFTExample`; a bad record
    raises ValueError naming ``where``."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        if "prompt" in rec or "completion" in rec:
            raise ValueError(f"{where}: give either 'messages' or 'prompt'/'completion', not both")
        return SFTExample(tuple(render_messages(rec["messages"], where)), where)
    for key in ("prompt", "completion"):
        if key not in rec:
            raise ValueError(f"{where}: missing field {key!r} (expected {{\"prompt\", "
                             "\"completion\"}} or {\"messages\": [...]})")
        if not isinstance(rec[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec["completion"]:
        raise ValueError(f"{where}: 'completion' is empty (nothing to learn)")
    return SFTExample(((rec["prompt"], False), (rec["completion"], True)), where)


def read_sft(path) -> List[SFTExample]:
    """The demonstrations of a JSONL file (see the module doc); every error names file:line."""
    out = [parse_sft_record(rec, f"{path}:{lineno}") for lineno, rec in jsonl_records(path)]
    if not out:
        raise ValueError(f"{path}: holds no demonstrations (an empty file)")
    return out


# ---- tokenisation ------------------------------------------------------------------------------


def text_encoder(tokenizer) -> Callable[[str], List[int]]:
    """The tokenizer's encoding of ordinary text (gptcore.Tokenizer's encode_ordinary: special-
    token text inside data is not special; otherwise ``encode``)."""
    for cand in (tokenizer, getattr(tokenizer, "_tok", None)):
        fn = getattr(cand, "encode_ordinary", None)
        if callable(fn):
            return fn
    fn = getattr(tokenizer, "encode", None)
    if not callable(fn):
        raise TypeError(f"tokenizer: expected an object with encode(text), got "
                        f"{type(tokenizer).__name__}")
    return fn


@dataclass
class EncodedExample:
    """Token ids of one example and ``trained`` (same length): whether each token is a target
    of the loss (the model learns to predict it from the tokens before it)."""

    ids: np.ndarray
    trained: np.ndarray
    where: str
    truncated: bool = False

    @property
    def prompt_len(self) -> int:
        """Tokens before the first trained one."""
        return int(np.argmax(self.trained)) if self.trained.any() else len(self.ids)


class SFTEncoder:
    """Tokenises examples for a model with context ``n_ctx``: ``encode(example)`` ->
    :class:`EncodedExample`, at most ``n_ctx + 1`` tokens (inputs and shifted targets fit the
    context). ``eot``: the end-of-text id appended to each example (default: the tokenizer's
    ``eot_token``; None appends nothing). ``prompt_ids(text)`` encodes a prompt alone, as a
    policy sees it; ``sequence(prompt, completion)`` is prompt + completion + eot for scoring."""

    def __init__(self, tokenizer, n_ctx: int, eot: Optional[int] = -1):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 2:
            raise ValueError(f"n_ctx: expected an int >= 2, got {n_ctx!r}")
        self.tokenizer = tokenizer
        self._encode = text_encoder(tokenizer)
        self.n_ctx = int(n_ctx)
        if eot == -1:
            eot = getattr(tokenizer, "eot_token", None)
        self.eot = None if eot is None else int(eot)
        self.pad_id = self.eot if self.eot is not None else 0

    def prompt_ids(self, text: str) -> List[int]:
        """The ids of ``text`` as ordinary text (a prompt, or one part of an example)."""
        if not isinstance(text, str):
            raise TypeError(f"prompt: expected str, got {type(text).__name__}")
        return [int(i) for i in self._encode(text)]

    def encode(self, ex: SFTExample) -> EncodedExample:
        """Ids and loss mask of one example: each segment encoded on its own, the end-of-text
        appended (trained when the last segment is), cut to ``n_ctx + 1`` tokens. A trained part
        that starts beyond the context raises ValueError naming ``ex.where``."""
        ids: List[int] = []
        trained: List[bool] = []
        for text, tr in ex.segments:
            part = self.prompt_ids(text)
            ids += part
            trained += [tr] * len(part)
        if self.eot is not None:
            ids.append(self.eot)
            trained.append(ex.segments[-1][1])
        if True not in trained:
            raise ValueError(f"{ex.where}: the trained part encodes to no tokens")
        first = trained.index(True)
        limit = self.n_ctx + 1
        if first >= limit:
            raise ValueError(f"{ex.where}: the prompt is {first} tokens, which leaves no room for "
                             f"the completion in the model's context of {self.n_ctx}")
        cut = len(ids) > limit
        ids, trained = ids[:limit], trained[:limit]
        trained[0] = False  # the first token is never predicted (nothing comes before it)
        if not any(trained):
            raise ValueError(f"{ex.where}: the completion starts the text, so no token of it can "
                             "be predicted; give a non-empty prompt")
        return EncodedExample(np.asarray(ids, np.int32), np.asarray(trained, bool), ex.where, cut)

    def sequence(self, prompt: str, completion: str, where: str = "input") -> Tuple[List[int], bool]:
        """(ids, truncated): prompt + completion (+ eot), at most ``n_ctx`` tokens, for a model
        that reads the last token (a reward model). A prompt of ``n_ctx`` tokens or more is an
        error naming ``where``; a longer completion is cut at the end (truncated True)."""
        p = self.prompt_ids(prompt)
        if not isinstance(completion, str):
            raise TypeError(f"{where}: completion: expected str, got {type(completion).__name__}")
        if len(p) >= self.n_ctx:
            raise ValueError(f"{where}: the prompt is {len(p)} tokens; the model's context of "
                             f"{self.n_ctx} leaves no room for an answer")
        ids = p + self.prompt_ids(completion) + ([self.eot] if self.eot is not None else [])
        if not ids:
            raise ValueError(f"{where}: empty prompt and completion (and no end-of-text token)")
        return ids[: self.n_ctx], len(ids) > self.n_ctx


# ---- batches -----------------------------------------------------------------------------------


@dataclass
class SFTBatch:
    """``ids`` (B, T) int32 inputs (each row one example, right-padded), ``targets`` (B, T) int32
    next tokens where they are trained and -1 elsewhere (padding, prompts), ``lengths`` (B,) the
    input tokens of each row, ``n_trained`` the trained targets, ``fill`` the fraction of the
    B x T positions that hold real tokens."""

    ids: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    n_trained: int

    @property
    def fill(self) -> float:
        return float(self.lengths.sum()) / float(self.ids.size)


def collate_sft(examples: Sequence[EncodedExample], pad_id: int, multiple: int = 16,
                max_len: Optional[int] = None) -> SFTBatch:
    """One batch: row i is ``examples[i].ids[:-1]`` with targets ``ids[1:]`` where trained,
    right-padded to the longest (rounded up to ``multiple`` so few shapes occur, capped at
    ``max_len``)."""
    if not examples:
        raise ValueError("examples: expected at least one example")
    lengths = np.array([len(e.ids) - 1 for e in examples], np.int64)
    if lengths.min() < 1:
        raise ValueError("examples: each needs at least 2 tokens")
    T = int(-(-lengths.max() // multiple) * multiple)
    if max_len is not None:
        T = max(min(T, max_len), int(lengths.max()))
    ids = np.full((len(examples), T), pad_id, np.int32)
    targets = np.full((len(examples), T), -1, np.int32)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        ids[i, :n] = e.ids[:-1]
        targets[i, :n] = np.where(e.trained[1:], e.ids[1:], -1)
    return SFTBatch(ids, targets, lengths, int((targets >= 0).sum()))


def length_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """One epoch's batches (index arrays) of examples with these lengths: shuffled with
    (seed, epoch), sorted by length within pools of 50 batches, cut into ``batch_size`` pieces,
    batch order shuffled. Every example appears once; there are ceil(n / batch_size) batches
    (only the last pool's last batch may be short). A function of its arguments alone, so a
    resumed run rebuilds the same epoch."""
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(n)
    pool = batch_size * _POOL
    batches: List[np.ndarray] = []
    for start in range(0, n, pool):
        chunk = order[start: start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]
