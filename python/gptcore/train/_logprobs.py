"""Log-probabilities of completions given prompts through a GPT, forward and backward: the
piece DPO and PPO (and anything else that scores a continuation) share.

A prompt ``p`` (P tokens) and its completion ``c`` (L tokens) become one row of
``p + c[:-1]`` (P + L - 1 positions); the target at position ``P - 1 + j`` is ``c[j]``, every
other target is -1 (ignored). Rows are right-padded, so causal attention keeps the padding out of
every real position. :func:`pack` builds such a batch, :class:`Policy` runs it:

    >>> batch = pack(prompt_ids, completion_ids, block_size=model.config.block_size)
    >>> pol = Policy(model)
    >>> logp = pol.logprobs(batch, grad=True)        # (B, T), 0 outside batch.mask
    >>> seq = batch.sum(logp)                        # (B,) log pi(c | p)
    >>> pol.backward(dlogp)                          # dlogp (B, T): d loss / d logp

:class:`ValueModel` is a GPT trunk with a scalar head read at the same positions (the value of
the state in which each completion token is chosen), for PPO.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .. import io as gio
from ..data.sft import SFTEncoder
from ..models.heads import LinearHead, LMHead
from .checkpoint import checkpoint_tokenizer

__all__ = ["SequenceBatch", "pack", "Policy", "ValueModel", "check_same_vocabulary",
           "load_policy", "load_reference", "TextEncoder"]


def _ids(seq, what: str) -> List[int]:
    if isinstance(seq, np.ndarray):
        if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(f"{what}: expected a 1-D sequence of token ids, got {seq.dtype} {seq.shape}")
        return [int(t) for t in seq]
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{what}: expected a list of token ids, got {type(seq).__name__}")
    for t in seq:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{what}: expected integer token ids, got {type(t).__name__}")
    return [int(t) for t in seq]


@dataclass
class SequenceBatch:
    """Prompt + completion rows. ``ids`` (B, T) int32 inputs, ``targets`` (B, T) int64 (the
    completion tokens where they are predicted, -1 elsewhere), ``mask`` (B, T) float32 (1 on
    those positions), ``prompt_lens`` and ``completion_lens`` (B,)."""

    ids: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    prompt_lens: np.ndarray
    completion_lens: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def last(self) -> np.ndarray:
        """(B,) the position of each row's last completion token."""
        return self.prompt_lens + self.completion_lens - 2

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) positions in the batch: what a forward pass costs."""
        return int((self.prompt_lens + self.completion_lens - 1).sum())

    def sum(self, per_token: np.ndarray) -> np.ndarray:
        """(B,) per-sequence sums of a (B, T) per-token quantity over the completion tokens."""
        return (np.asarray(per_token, np.float64) * self.mask).sum(axis=1)

    def rows(self, idx) -> "SequenceBatch":
        """The sub-batch of rows ``idx``, trimmed to its longest row."""
        idx = np.asarray(idx)
        P, L = self.prompt_lens[idx], self.completion_lens[idx]
        T = _padded_len(int((P + L - 1).max()), self.ids.shape[1])
        return SequenceBatch(self.ids[idx, :T].copy(), self.targets[idx, :T].copy(),
                             self.mask[idx, :T].copy(), P.copy(), L.copy())


def _padded_len(n: int, limit: int) -> int:
    """Row length ``n`` rounded up to a multiple of 8 (fewer distinct workspace shapes for the
    model to allocate), never past ``limit``."""
    return min(-(-n // 8) * 8, max(limit, n))


def pack(prompts: Sequence, completions: Sequence, block_size: int, pad_id: int = 0,
         where: str = "examples") -> SequenceBatch:
    """A :class:`SequenceBatch` of token-id prompts and completions (both non-empty).

    A prompt + completion longer than ``block_size`` + 1 tokens (the model's context) raises
    ValueError naming ``where[i]``: nothing is cut silently."""
    if len(prompts) != len(completions):
        raise ValueError(f"completions: expected one per prompt ({len(prompts)}), got {len(completions)}")
    if not len(prompts):
        raise ValueError(f"{where}: expected at least one prompt and completion")
    ps = [_ids(p, f"{where}[{i}] prompt") for i, p in enumerate(prompts)]
    cs = [_ids(c, f"{where}[{i}] completion") for i, c in enumerate(completions)]
    for i, (p, c) in enumerate(zip(ps, cs)):
        if not p:
            raise ValueError(f"{where}[{i}]: empty prompt (start it with the end-of-text token)")
        if not c:
            raise ValueError(f"{where}[{i}]: empty completion")
        if len(p) + len(c) - 1 > block_size:
            raise ValueError(f"{where}[{i}]: the prompt ({len(p)} tokens) and completion "
                             f"({len(c)} tokens) need {len(p) + len(c) - 1} positions, more than "
                             f"the model's context of {block_size}")
    B = len(ps)
    T = _padded_len(max(len(p) + len(c) - 1 for p, c in zip(ps, cs)), block_size)
    ids = np.full((B, T), pad_id, np.int32)
    targets = np.full((B, T), -1, np.int64)
    mask = np.zeros((B, T), np.float32)
    for b, (p, c) in enumerate(zip(ps, cs)):
        row = p + c[:-1]
        ids[b, :len(row)] = row
        targets[b, len(p) - 1: len(p) - 1 + len(c)] = c
        mask[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return SequenceBatch(ids, targets, mask, np.array([len(p) for p in ps], np.int64),
                         np.array([len(c) for c in cs], np.int64))


def check_same_vocabulary(policy, other, what: str) -> None:
    """A reference (or value) model must read the policy's token ids the same way and cover its
    context: different vocabularies would compare log-probabilities of different tokens."""
    pv, ov = policy.config.vocab_size, other.config.vocab_size
    if pv != ov:
        raise ValueError(f"{what}: its vocabulary has {ov} tokens, the policy's {pv}; it must be "
                         "the same model family (the same tokenizer) as the policy")
    if other.config.block_size < policy.config.block_size:
        raise ValueError(f"{what}: its context ({other.config.block_size} positions) is shorter "
                         f"than the policy's ({policy.config.block_size})")


class Policy:
    """A GPT as a policy over completions: per-token log-probs of a :class:`SequenceBatch`
    (through the tied LM head) and their backward into the model's gradients."""

    def __init__(self, model):
        self.model = model
        self.lm = LMHead(model)
        self._pending = None  # (selected positions, hidden-state shape) for backward

    def logprobs(self, batch: SequenceBatch, grad: bool = False) -> np.ndarray:
        """(B, T) float32 log pi(target | prefix), 0 outside ``batch.mask``. With ``grad`` the
        forward is kept for one :meth:`backward`.

        The LM head runs on the completion positions only (their hidden states gathered into
        one (1, N, C) row): prompt and padding positions would cost a (vocab x width) GEMM row
        each, forward and backward, for logits nobody reads -- about half the head's work when
        prompts are as long as answers."""
        h = self.model.hidden_states(batch.ids)
        B, T, C = h.shape
        sel = np.flatnonzero(batch.mask.reshape(-1) > 0)
        rows = np.asarray(h.numpy()).reshape(B * T, C)[sel]  # (N, C) copy, host
        out = np.zeros(B * T, np.float32)
        out[sel] = self.lm.token_logprobs(rows[None], batch.targets.reshape(-1)[sel][None])[0]
        self._pending = (sel, (B, T, C)) if grad else None
        if not grad:
            self.lm._saved = None  # drop the (N, vocab) buffer now
        return out.reshape(B, T)

    def backward(self, dlogp: np.ndarray, batch: SequenceBatch) -> None:
        """Accumulate the parameter gradients of a loss whose gradient on the last
        :meth:`logprobs` (with ``grad``) is ``dlogp`` (B, T) (masked to the completion)."""
        if self._pending is None:
            raise RuntimeError("Policy.backward: call logprobs(batch, grad=True) first")
        sel, (B, T, C) = self._pending
        self._pending = None
        d = np.asarray(dlogp, np.float32).reshape(-1)[sel]
        dh = np.zeros((B * T, C), np.float32)
        dh[sel] = np.asarray(self.lm.backward(d[None]).numpy()).reshape(-1, C)
        self.model.backward(dh=dh.reshape(B, T, C))

    def sequence_logprobs(self, batch: SequenceBatch, batch_size: int = 16) -> np.ndarray:
        """(B,) float64 log pi(completion | prompt), in chunks of ``batch_size`` rows, no grad."""
        out = np.empty(len(batch), np.float64)
        for s in range(0, len(batch), batch_size):
            sub = batch.rows(np.arange(s, min(s + batch_size, len(batch))))
            out[s: s + len(sub)] = sub.sum(self.logprobs(sub))
        return out


class ValueModel:
    """A GPT trunk with a scalar head ``value`` (:class:`gptcore.models.heads.LinearHead`)
    read at every position: ``values(batch)`` (B, T) is the value of the state in which the
    token at each completion position is chosen (the same positions as :meth:`Policy.logprobs`).
    The head starts at zero (weight and bias), so the first values are exactly 0."""

    HEAD = "value"

    def __init__(self, model):
        self.model = model
        if self.HEAD not in model.heads:
            head = LinearHead(model.config.n_embd, 1, self.HEAD, device=model.device,
                              dtype=model.dtype, init_std=0.0)
            model.add_head(head)
        self.head = model.heads[self.HEAD]
        self._shape: Optional[tuple] = None

    def values(self, batch: SequenceBatch, grad: bool = False) -> np.ndarray:
        h = self.model.hidden_states(batch.ids)
        B, T, C = h.shape
        v = self.head.forward(h.view([B * T, C]))[:, 0].reshape(B, T)
        self._shape = (B, T, C) if grad else None
        if not grad:
            self.head._saved = None
        return v * batch.mask

    def backward(self, dvalues: np.ndarray, batch: SequenceBatch) -> None:
        """Gradient (B, T) of the loss on the last :meth:`values` (with ``grad``)."""
        if self._shape is None:
            raise RuntimeError("ValueModel.backward: call values(batch, grad=True) first")
        B, T, C = self._shape
        self._shape = None
        d = (np.asarray(dvalues, np.float32) * batch.mask).reshape(B * T, 1)
        dh = self.head.backward(d).reshape(B, T, C)
        self.model.backward(dh=dh)


# ---- models and text ---------------------------------------------------------------------------


def load_policy(path, device: str = "cpu"):
    """(model, tokenizer, path) of a language-model checkpoint: a gptcore/transformers GPT-2
    directory, a `gptcore train`/`sft` run directory (its model/ or checkpoint/ inside), an
    llm.c .bin. Dropout is off (eval mode): PPO's ratio pi/pi_old must be exactly 1 before the
    first update, and DPO follows the same rule."""
    from .finetune import _model_dir  # (finetune's run-directory lookup, shared)

    if path is None:
        raise ValueError("policy: expected the SFT model's checkpoint directory")
    path = _model_dir(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"policy: {path!r} does not exist")
    model = gio.load_pretrained(path, device=device)
    if model.heads:
        raise ValueError(f"policy: {path!r} holds task head(s) {sorted(model.heads)}; expected a "
                         "language model (an SFT checkpoint)")
    return model.eval(), checkpoint_tokenizer(path, model.config.vocab_size), path


def load_reference(path, policy, policy_path: str, device: str = "cpu"):
    """The frozen reference: the checkpoint ``path`` (default: the policy's own), in eval mode,
    checked to read the policy's vocabulary and cover its context."""
    from .finetune import _model_dir

    src = policy_path if path is None else _model_dir(path)
    if not os.path.exists(src):
        raise FileNotFoundError(f"ref: {src!r} does not exist")
    ref = gio.load_pretrained(src, device=device).eval()
    check_same_vocabulary(policy, ref, "ref")
    return ref


class TextEncoder:
    """Prompts and completions as token ids, the way SFT trained the policy
    (:class:`gptcore.data.sft.SFTEncoder`): each part encoded on its own, a completion ending with
    the end-of-text token when the tokenizer has one, an empty prompt starting from it."""

    def __init__(self, tokenizer, n_ctx: int):
        self.enc = SFTEncoder(tokenizer, n_ctx)
        self.tokenizer, self.eot = tokenizer, self.enc.eot

    def prompt(self, text: str, where: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"{where}: prompt: expected str, got {type(text).__name__}")
        ids = self.enc.prompt_ids(text)
        if not ids:
            if self.eot is None:
                raise ValueError(f"{where}: empty prompt, and the tokenizer has no end-of-text "
                                 "token to start from")
            ids = [self.eot]
        return ids

    def completion(self, text: str, where: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"{where}: completion: expected str, got {type(text).__name__}")
        ids = self.enc.prompt_ids(text) + ([self.eot] if self.eot is not None else [])
        if not ids:
            raise ValueError(f"{where}: empty completion (and no end-of-text token)")
        return ids

    def decode(self, ids) -> str:
        """Text of completion ids, without the end-of-text token."""
        return self.tokenizer.decode([int(t) for t in ids if t != self.eot])
