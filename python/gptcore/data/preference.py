"""Preference data (InstructGPT step 2): rankings of K answers to one prompt, and pairs.

JSONL, one JSON object a line; other keys are ignored (the /rank page of `gptcore serve` adds
its own, e.g. a timestamp):

    {"prompt": "...", "ranked": ["best answer", ..., "worst answer"]}     K >= 2 answers
    {"prompt": "...", "chosen": "...", "rejected": "..."}                  a ranking of 2

A ranking of K answers stands for its C(K, 2) (better, worse) pairs (:func:`ranking_pairs`,
:func:`pair_indices`); the reward model trains on all of them with the K answers in one batch,
each through the model once, as InstructGPT did. A line with fewer than 2 answers, the same
answer twice, or a field that is not a string is an error naming file:line; a prompt too long
for the model's context is caught where the model's tokenizer is known
(:meth:`gptcore.data.sft.SFTEncoder.sequence`), also naming the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, NamedTuple, Tuple, Union

from .._fileio import jsonl_records

__all__ = ["Ranking", "PreferencePair", "parse_ranking", "read_rankings", "ranking_pairs",
           "pair_indices"]


@dataclass(frozen=True)
class Ranking:
    """A prompt and its ``answers`` from best to worst (K >= 2, all different), from ``where``."""

    prompt: str
    answers: Tuple[str, ...]
    where: str

    @property
    def k(self) -> int:
        return len(self.answers)


class PreferencePair(NamedTuple):
    """One comparison: ``chosen`` was ranked above ``rejected`` for ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    where: str


def parse_ranking(rec: Any, where: str) -> Ranking:
    """One record (a ranking or a pair) as a :class:`Ranking`; bad input raises ValueError
    naming ``where``."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if "prompt" not in rec:
        raise ValueError(f"{where}: missing field 'prompt'")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    has_pair = "chosen" in rec or "rejected" in rec
    if "ranked" in rec:
        if has_pair:
            raise ValueError(f"{where}: give either 'ranked' or 'chosen'/'rejected', not both")
        answers = rec["ranked"]
        if not isinstance(answers, list):
            raise ValueError(f"{where}: 'ranked' must be a list of answers (best first), got "
                             f"{type(answers).__name__}")
        field = "ranked"
    elif has_pair:
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise ValueError(f"{where}: missing field {key!r} (a pair needs both 'chosen' "
                                 "and 'rejected')")
        answers, field = [rec["chosen"], rec["rejected"]], "chosen/rejected"
    else:
        raise ValueError(f"{where}: missing field 'ranked' (or 'chosen' and 'rejected')")
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            name = f"ranked[{i}]" if field == "ranked" else ("chosen", "rejected")[i]
            raise ValueError(f"{where}: {name} must be a string, got {type(a).__name__}")
    if len(answers) < 2:
        raise ValueError(f"{where}: 'ranked' has {len(answers)} answer"
                         f"{'' if len(answers) == 1 else 's'}; a ranking needs at least 2")
    seen = {}
    for i, a in enumerate(answers):
        if a in seen:
            what = (f"ranked[{seen[a]}] and ranked[{i}] are the same answer" if field == "ranked"
                    else "'chosen' and 'rejected' are the same answer")
            raise ValueError(f"{where}: {what} ({a[:40]!r}); an answer cannot be ranked against "
                             "itself")
        seen[a] = i
    return Ranking(prompt, tuple(answers), where)


def read_rankings(path) -> List[Ranking]:
    """The rankings of a JSONL file of rankings and/or pairs; every error names file:line."""
    out = [parse_ranking(rec, f"{path}:{lineno}") for lineno, rec in jsonl_records(path)]
    if not out:
        raise ValueError(f"{path}: holds no rankings (an empty file)")
    return out


def pair_indices(k: int) -> List[Tuple[int, int]]:
    """The C(k, 2) (better, worse) index pairs of a ranking of k answers, best first: (0, 1),
    (0, 2), ..., (k-2, k-1)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k: expected an int >= 2, got {k!r}")
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def ranking_pairs(rankings: Union[Ranking, Iterable[Ranking]]) -> List[PreferencePair]:
    """Every (chosen, rejected) pair the rankings imply: C(K, 2) per ranking of K, in
    :func:`pair_indices` order (what DPO trains on)."""
    if isinstance(rankings, Ranking):
        rankings = [rankings]
    out = []
    for r in rankings:
        if not isinstance(r, Ranking):
            raise TypeError(f"rankings: expected Ranking objects, got {type(r).__name__}")
        out += [PreferencePair(r.prompt, r.answers[i], r.answers[j], r.where)
                for i, j in pair_indices(r.k)]
    return out
