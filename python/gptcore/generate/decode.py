"""Generation: a KV-cache sampler with GPT-3's completion controls.

    >>> tokens = generate(model, idx, 50, temperature=0.8, top_p=0.95, seed=0)   # (B, T + 50)
    >>> text = complete(model, tokenizer, "Once upon a time", max_new_tokens=50, stop=["\\n\\n"])

How a batch is decoded (:class:`Decoder`):

* The prompt is run through the model once (*prefill*), writing every layer's keys and values
  into a cache allocated once per call, (B, n_head, max_len, head_dim) per layer, in the model's
  dtype and on its device. After that each step feeds one position per row and attends over
  the cache with :func:`gptcore.ops.attention_kvcache` (GPT-3's banded layers keep their window).
* All rows share one position counter. Prompts of different lengths are left-aligned: the
  common prefix (the shortest prompt) is prefilled for every row at once, then rows still inside
  their prompt are fed their next prompt token instead of a sample until they reach its end.
  A row's result is therefore exactly what running it alone gives.
* Only the last position's logits are computed by the LM head, and the next tokens are chosen
  on the model's device by :func:`gptcore.ops.sample_tokens` (which also keeps the rows'
  token counts and draw counters there), writing them straight into the next step's input.
  The host only reads the B chosen tokens back for stop checks and streaming.

Sampling controls, applied in this order to each row's next-token logits:

1. ``logit_bias``  {token id: bias} added to the logits (``-inf`` bans a token).
2. ``frequency_penalty``, ``presence_penalty`` (OpenAI's definition): ``logit[j] -= count[j] *
   frequency_penalty + (count[j] > 0) * presence_penalty``, where ``count[j]`` counts how often the
   row has *generated* token j so far (the prompt does not count).
3. ``temperature``: the logits are divided by it; ``temperature=0`` is greedy (argmax, the
   filters below cannot change it).
4. ``top_k``: only the k most likely tokens stay (and any tied with the k-th).
5. ``top_p`` (nucleus): of those, only the smallest most-likely-first set whose probability
   reaches ``top_p`` stays (the most likely token always does, and so do tokens exactly as
   likely as the last one kept).

The next token is then drawn from the renormalised probabilities by inverse-CDF with one
uniform number hashed from ``(seed, row, that row's draw count)`` (see
:func:`gptcore.ops.sample_tokens`), so seeded runs repeat and a row's draws do not depend on
what the other rows of the batch do. Without ``seed`` a random one is taken.

``logprobs=k`` reports, per generated token, its log-probability and the k most likely tokens
with theirs, under the distribution after steps 1-2 (logit bias and penalties) but before
temperature and the filters, i.e. what the model (as adjusted) believes, not the sampler.

Stopping: a row stops after ``max_new_tokens`` tokens, when it produces the tokenizer's
end-of-text token (when a tokenizer is given; the token is not returned), or when it produces
one of the ``stop`` sequences (not returned either). Stop sequences are strings, matched on the
decoded text (they need a tokenizer), or sequences of token ids, matched on the tokens. Rows
that stop early are padded with ``PAD`` (-1) and their lengths can be returned.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..models.kvcache import Decoder
from .sampler import (
    PAD,
    Logprobs,
    TokenLogprob,
    _Controls,
    _GraphStep,
    _prompts,
    _Sampler,
    _use_cuda_graphs,
)

__all__ = ["generate", "complete"]


# ---- one row's progress ----------------------------------------------------------------------------


class _Row:
    """A row's generated tokens, its stop checks and what may be released to a stream."""

    def __init__(self, prompt: np.ndarray, ctl: _Controls, tokenizer, eot: Optional[int],
                 track_text: bool):
        self.prompt = prompt
        self.L = len(prompt)
        self.ctl, self.tok, self.eot = ctl, tokenizer, eot
        self.gen: List[int] = []
        self.lps: List[Optional[TokenLogprob]] = []
        self.n_sampled = 0
        self.done = False
        self.finish = None  # "length", "stop" or "eot"
        self.track = track_text or bool(ctl.stop_text)
        self.text = ""
        self.ends: List[int] = []  # len(decode(gen[:i+1]))
        self.safe_tokens = 0  # tokens that no later stop can take back
        self.safe_chars = 0
        self.released = 0
        self.released_chars = 0

    def accept(self, token: int, lp: Optional[TokenLogprob]) -> None:
        self.n_sampled += 1
        if self.eot is not None and token == self.eot:
            self._end("eot")
            return
        self.gen.append(int(token))
        self.lps.append(lp)
        ctl = self.ctl
        for s in ctl.stop_ids:
            if len(self.gen) >= len(s) and self.gen[-len(s):] == s:
                self._cut_tokens(len(self.gen) - len(s))
                self._end("stop")
                return
        if self.track:
            prev = len(self.text)
            self.text = self.tok.decode(self.gen)
            self.ends.append(len(self.text))
            if ctl.stop_text:
                longest = max(len(s) for s in ctl.stop_text)
                start = max(0, prev - longest - 2)  # a match must reach into the new text
                hits = [p for p in (self.text.find(s, start) for s in ctl.stop_text) if p >= 0]
                if hits:
                    p = min(hits)  # the text is cut exactly there; the tokens before it
                    self._cut_tokens(bisect.bisect_right(self.ends, p), text=self.text[:p])
                    self._end("stop")
                    return
        if self.n_sampled >= ctl.max_new_tokens:
            self._end("length")
            return
        self._update_safe()

    def _cut_tokens(self, m: int, text: Optional[str] = None) -> None:
        del self.gen[m:]
        del self.lps[m:]
        del self.ends[m:]
        if self.track:
            self.text = self.tok.decode(self.gen) if text is None else text

    def _end(self, why: str) -> None:
        self.done, self.finish = True, why
        self.safe_tokens = len(self.gen)
        self.safe_chars = len(self.text)

    def _update_safe(self) -> None:
        """Hold back the tail that could still turn into a stop sequence."""
        n = len(self.gen)
        for s in self.ctl.stop_ids:  # longest suffix of gen that is a proper prefix of s
            for k in range(min(len(s) - 1, len(self.gen)), 0, -1):
                if self.gen[-k:] == s[:k]:
                    n = min(n, len(self.gen) - k)
                    break
        q = len(self.text)
        if self.track:
            while q > 0 and self.text[q - 1] == "\ufffd":  # an unfinished UTF-8 character
                q -= 1
            q0, head = q, self.text[:q]
            for s in self.ctl.stop_text:  # longest suffix of the text that begins s
                for k in range(min(len(s) - 1, q0), 0, -1):
                    if head.endswith(s[:k]):
                        q = min(q, q0 - k)
                        break
            if self.ctl.stop_text:
                n = min(n, bisect.bisect_right(self.ends, q))
            if n < len(self.gen):  # held-back tokens hold back their text too
                q = min(q, self.ends[n - 1] if n else 0)
        self.safe_tokens, self.safe_chars = n, q

    def take_tokens(self) -> list:
        out = self.lps if self.ctl.logprobs is not None else self.gen
        new = out[self.released:self.safe_tokens]
        self.released = max(self.released, self.safe_tokens)
        return list(new)

    def take_text(self) -> str:
        new = self.text[self.released_chars:self.safe_chars]
        self.released_chars = max(self.released_chars, self.safe_chars)
        return new


# ---- the loop ----------------------------------------------------------------------------------------


class _Generation:
    def __init__(self, model, idx, max_new_tokens, temperature, top_k, top_p, frequency_penalty,
                 presence_penalty, logit_bias, stop, seed, logprobs, tokenizer, track_text=False):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "parameters"):
            raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
        V = cfg.vocab_size
        self.model, self.cfg, self.V = model, cfg, V
        self.prompts, self.single = _prompts(idx, V)
        self.ctl = _Controls(V, max_new_tokens, temperature, top_k, top_p, frequency_penalty,
                             presence_penalty, logit_bias, stop, seed, logprobs, tokenizer)
        Lmax = max(len(p) for p in self.prompts)
        if Lmax + self.ctl.max_new_tokens > cfg.block_size:
            raise ValueError(f"max_new_tokens: the longest prompt ({Lmax} tokens) plus {max_new_tokens} "
                             f"new tokens exceeds the model's context of {cfg.block_size} positions")
        eot = getattr(tokenizer, "eot_token", None) if tokenizer is not None else None
        self.tokenizer = tokenizer
        self.rows = [_Row(p, self.ctl, tokenizer, eot, track_text) for p in self.prompts]
        self.Lmax = Lmax

    def steps(self) -> Iterator[None]:
        """Runs the batch; yields after every sampling step (rows then hold new tokens)."""
        rows, ctl = self.rows, self.ctl
        B, N = len(rows), ctl.max_new_tokens
        if N == 0:
            for r in rows:
                r._end("length")
            return
        m = min(r.L for r in rows)
        dec = Decoder(self.model, B, self.Lmax + N - 1)
        sampler = _Sampler(ctl, B, self.V, dec.device)
        logits = dec.prefill(np.stack([r.prompt[:m] for r in rows]))
        graph = _GraphStep(dec, sampler) if _use_cuda_graphs(dec, ctl) else None
        p = m  # the position whose token is decided in this step
        forced = sampler.forced_host
        while True:
            want = [b for b, r in enumerate(rows) if not r.done and p >= r.L]
            for b, r in enumerate(rows):  # a prompt token, -1 (sample), or 0 (filler once done)
                forced[b] = r.prompt[p] if p < r.L else (0 if r.done else -1)
            if logits is None:  # forward and draw in one replayed graph
                toks, lps = graph(want), [None] * len(want)
            else:
                toks, lps = sampler(logits, want)  # also writes the next input, sampler.ids
            if want:
                for n, b in enumerate(want):
                    rows[b].accept(int(toks[b]), lps[n])
                yield
            if all(r.done for r in rows):
                return
            logits = None if graph is not None else dec.forward_tensor(sampler.ids)
            p += 1

    def result(self, return_lengths: bool):
        rows, ctl = self.rows, self.ctl
        lengths = np.array([r.L + len(r.gen) for r in rows], np.int64)
        out = np.full((len(rows), int(lengths.max())), PAD, np.int64)
        for b, r in enumerate(rows):
            out[b, :r.L] = r.prompt
            out[b, r.L:lengths[b]] = r.gen
        extra: List[Any] = []
        if return_lengths:
            extra.append(lengths)
        if ctl.logprobs is not None:
            N, k = ctl.max_new_tokens, ctl.logprobs
            tl = np.full((len(rows), N), np.nan, np.float32)
            tt = np.full((len(rows), N, k), PAD, np.int64)
            tp = np.full((len(rows), N, k), np.nan, np.float32)
            for b, r in enumerate(rows):
                for n, e in enumerate(r.lps):
                    tl[b, n] = e.logprob
                    for j, (t, v) in enumerate(e.top):
                        tt[b, n, j], tp[b, n, j] = t, v
            lp = Logprobs(tl, tt, tp)
            extra.append(Logprobs(tl[0], tt[0], tp[0]) if self.single else lp)
        if self.single:
            out = out[0]
            if return_lengths:
                extra[0] = int(lengths[0])
        return out if not extra else (out, *extra)


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, logit_bias: Optional[Dict[int, float]] = None,
             stop=None, seed: Optional[int] = None, stream: bool = False,
             logprobs: Optional[int] = None, tokenizer=None, return_lengths: bool = False):
    """Continue each prompt in ``idx`` by up to ``max_new_tokens`` tokens (see the module doc
    for the controls and the order they apply in).

    idx: a (B, T) integer array, a list of B token-id lists of any lengths, or one 1-D prompt
    (then results drop the batch axis). The prompts plus ``max_new_tokens`` must fit the
    model's block_size. ``tokenizer`` (default ``model.tokenizer`` if present) enables text stop
    sequences and stopping at its end-of-text token.

    Returns an int64 array (B, W): each row is its prompt followed by its new tokens, padded
    with PAD (-1) after rows that stopped early; W is the longest row. With
    ``return_lengths=True`` and/or ``logprobs=k`` a tuple ``(tokens, lengths, Logprobs)`` (the
    parts asked for, in that order) is returned instead.

    ``stream=True`` returns an iterator instead. Each item is one step: a list with one entry
    per row, the list of tokens that row released at this step (usually one; empty when it is
    still reading its prompt or has stopped; a token that might begin a stop sequence is held
    back until that is decided). With ``logprobs`` the entries are :class:`TokenLogprob`. For a
    1-D prompt each item is that row's list alone.
    """
    if not isinstance(stream, bool):
        raise TypeError(f"stream: expected a bool, got {type(stream).__name__}")
    g = _Generation(model, idx, max_new_tokens, temperature, top_k, top_p, frequency_penalty,
                    presence_penalty, logit_bias, stop, seed, logprobs, tokenizer)
    if not stream:
        for _ in g.steps():
            pass
        return g.result(return_lengths)
    return _stream_tokens(g)


def _stream_tokens(g: _Generation):
    for _ in g.steps():
        items = [r.take_tokens() for r in g.rows]
        if any(items):
            yield items[0] if g.single else items


# ---- text in, text out --------------------------------------------------------------------------------


def _encode_prompt(tokenizer, text: str, arg: str, allowed_special) -> List[int]:
    """Prompt ids. As tiktoken's ``encode`` by default, the text of a special token (a typed
    ``<|endoftext|>``) is refused unless ``allowed_special`` lets it become that token."""
    if not isinstance(text, str):
        raise TypeError(f"{arg}: expected a str, got {type(text).__name__}")
    try:
        ids = list(tokenizer.encode(text, allowed_special=allowed_special))
    except TypeError:  # a tokenizer without special-token controls (bytes: no special text)
        ids = list(tokenizer.encode(text))
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from None
    if not ids:
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise ValueError(f"{arg}: empty prompt, and the tokenizer has no end-of-text token to "
                             f"start from")
        ids = [int(eot)]
    return ids


def complete(model, tokenizer, prompt: Union[str, Sequence[str]], max_new_tokens: int = 16,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             logit_bias: Optional[Dict[int, float]] = None, stop=None, seed: Optional[int] = None,
             stream: bool = False, logprobs: Optional[int] = None,
             allowed_special: Union[str, frozenset, set] = frozenset()):
    """Text in, text out: GPT-3's completion interface over :func:`generate`.

    ``prompt`` is a str (returns the completion str) or a list of str (returns a list). The
    completion excludes the prompt, the end-of-text token and any stop sequence; it is cut
    exactly where a stop sequence begins. An empty prompt starts from end-of-text. As with
    tiktoken, the text of a special token in a prompt is refused unless ``allowed_special``
    (a set of such texts, or ``"all"``) makes it the control token.
    With ``logprobs=k`` returns ``(completion(s), Logprobs)``.

    ``stream=True`` returns an iterator of text pieces as they are decided: for a str prompt
    plain str pieces; for a list, ``(index, piece)`` pairs. Text that might begin a stop
    sequence, or an unfinished UTF-8 character, is held back until it is decided.
    """
    if tokenizer is None or not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
        raise TypeError("tokenizer: expected a tokenizer with encode() and decode()")
    if not isinstance(stream, bool):
        raise TypeError(f"stream: expected a bool, got {type(stream).__name__}")
    single = isinstance(prompt, str)
    if single:
        ids = [_encode_prompt(tokenizer, prompt, "prompt", allowed_special)]
    elif isinstance(prompt, (list, tuple)) and prompt:
        ids = [_encode_prompt(tokenizer, p, f"prompt[{i}]", allowed_special)
               for i, p in enumerate(prompt)]
    else:
        raise TypeError("prompt: expected a str or a non-empty list of str")
    if stream and logprobs is not None:
        raise ValueError("logprobs: not available with complete(stream=True); use "
                         "generate(stream=True, logprobs=k), which streams TokenLogprob entries")
    g = _Generation(model, ids, max_new_tokens, temperature, top_k, top_p, frequency_penalty,
                    presence_penalty, logit_bias, stop, seed, logprobs, tokenizer,
                    track_text=stream)
    if stream:
        return _stream_text(g, single)
    for _ in g.steps():
        pass
    texts = [r.text if r.track else tokenizer.decode(r.gen) for r in g.rows]
    out: Any = texts[0] if single else texts
    if logprobs is not None:
        lp = g.result(False)[1]  # (B, ...): complete passes a batch even for one prompt
        out = (out, Logprobs(lp.token_logprobs[0], lp.top_tokens[0], lp.top_logprobs[0])
               if single else lp)
    return out


def _stream_text(g: _Generation, single: bool):
    for _ in g.steps():
        for b, r in enumerate(g.rows):
            piece = r.take_text()
            if piece:
                yield piece if single else (b, piece)


