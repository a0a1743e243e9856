"""Continuous batching: the decode loop a completion server drives.

One thread owns the model and a :class:`~gptcore.models.kvcache.Decoder` of ``max_batch`` rows
(*slots*). Requests wait in a bounded queue; every step the loop

1. admits waiting requests, first come first served, while enough slots are free (a request
   with ``n`` choices takes ``n`` slots): the admitted slots are prefilled with their prompts
   in batched passes (``Decoder.prefill_rows``) and each request's first tokens are drawn from
   those logits;
2. runs one decoding step for every busy slot at its own position (``Decoder.step_rows``);
3. draws each request's next tokens with that request's own controls and seed, and releases the
   slots of choices that finished (stop sequence, end-of-text, ``max_tokens``) or were cancelled.

A request joins at the next step and leaves when it finishes. Its result does not depend on what
else is in the batch: every request has its own sampler (:class:`~gptcore.generate.sampler.
_Sampler`, the one :func:`~gptcore.generate.generate` uses) whose choice ``i`` draws with
``(seed, i, draw count)``, so ``n`` choices with ``seed=s`` are what ``complete([prompt] * n,
seed=s)`` gives, and a greedy request is what ``complete(..., temperature=0)`` gives. Stop
sequences and the release of text that can no longer be taken back are the per-row logic of
:class:`~gptcore.generate.decode._Row`.

    >>> engine = Engine(model, tokenizer, max_batch=16, max_queue=64).start()
    >>> req = engine.submit(tokenizer.encode("Hello"), max_tokens=20, temperature=0)
    >>> req.wait(); req.choices[0].text
    >>> engine.stop()

Results reach the caller through ``on_event`` (called on the engine thread, so it must be quick:
hand the event to another thread or event loop) as :class:`Piece` items -- new text of one choice
as soon as it is decided -- and one final :class:`Done`; or by waiting on the request.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from ..models.kvcache import Decoder
from ..tensor import tensor
from .decode import _Row
from .sampler import TokenLogprob, _Controls, _is_int, _log_softmax, _Sampler

__all__ = ["Engine", "Request", "Piece", "Done", "QueueFull", "EngineStopped"]


class QueueFull(RuntimeError):
    """The engine's waiting queue is full (the server answers 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or stopped and takes no new requests (503)."""


class Piece(NamedTuple):
    """New output of choice ``index``: the ``text`` released since the last piece, its token ids
    and, with logprobs, their :class:`TokenLogprob` entries. ``finish_reason`` ("stop" or
    "length") is set on the choice's last piece, None before."""

    index: int
    text: str
    tokens: List[int]
    logprobs: Optional[List[TokenLogprob]]
    finish_reason: Optional[str]


class Done(NamedTuple):
    """The request is over: every choice finished (``error`` None), or it failed or was cancelled
    (``error`` says why)."""

    error: Optional[str]


class Choice(NamedTuple):
    """One finished choice: its text, token ids, logprob entries (or None) and finish reason."""

    text: str
    tokens: List[int]
    logprobs: Optional[List[TokenLogprob]]
    finish_reason: Optional[str]


def _finish_reason(row: _Row) -> Optional[str]:
    # end-of-text is a stop, as in OpenAI's API
    return None if row.finish is None else ("length" if row.finish == "length" else "stop")


class Request:
    """One prompt's work: ``n`` choices continuing ``prompt`` (token ids) under one set of
    sampling controls. Made by :meth:`Engine.submit`; ``cancel()`` frees its slots at the next
    step; ``wait()`` blocks until it is over; ``choices`` then holds the results."""

    def __init__(self, prompt: np.ndarray, n: int, ctl: _Controls, tokenizer, eot: Optional[int],
                 prompt_logprobs: bool, on_event: Optional[Callable]):
        self.prompt = prompt
        self.n = n
        self.ctl = ctl
        self.rows = [_Row(prompt, ctl, tokenizer, eot, track_text=True) for _ in range(n)]
        self.want_prompt_logprobs = prompt_logprobs
        self.prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None
        self.on_event = on_event
        self.slots: List[int] = []  # the decoder rows of choices 0..n-1 while admitted
        self.sampler: Optional[_Sampler] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self._done = threading.Event()
        self.submitted = time.monotonic()

    # ---- caller side ----

    def cancel(self) -> None:
        """Stop this request at the next step (a client that went away); its slots are freed."""
        self.cancelled = True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the request is over; False if ``timeout`` seconds passed first."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, over all choices (stop sequences and end-of-text count)."""
        return sum(r.n_sampled for r in self.rows)

    @property
    def choices(self) -> List[Choice]:
        return [Choice(r.text, list(r.gen), list(r.lps) if self.ctl.logprobs is not None else None,
                       _finish_reason(r)) for r in self.rows]

    # ---- engine side ----

    def _emit(self, ev) -> None:
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a consumer's failure must not stop the engine
                self.cancelled = True

    def _release(self, i: int) -> None:
        """Hand choice i's newly decided output to the caller."""
        r = self.rows[i]
        text = r.take_text()
        taken = r.take_tokens()
        lps = taken if self.ctl.logprobs is not None else None
        toks = [e.token for e in taken] if lps is not None else taken
        if text or toks or r.done:
            self._emit(Piece(i, text, toks, lps, _finish_reason(r) if r.done else None))

    def _finish(self, error: Optional[str] = None) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._done.set()  # before the event: whoever receives it sees the request done
        self._emit(Done(error))


class Engine:
    """The continuous-batching decode loop over ``model`` on one thread (see the module doc).

    max_batch: decoder rows (slots) shared by the running requests. max_queue: requests that may
    wait for slots (0: none, a request either gets slots at the next step or is refused);
    :meth:`submit` raises :class:`QueueFull` beyond that. ``max_len`` (default the
    model's block_size) bounds prompt + max_tokens.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 max_len: Optional[int] = None):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "parameters"):
            raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise TypeError("tokenizer: expected a tokenizer with encode() and decode()")
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not _is_int(v) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        max_len = cfg.block_size if max_len is None else max_len
        if not _is_int(max_len) or not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len: expected an int in [1, {cfg.block_size}], got {max_len!r}")
        self.model, self.tokenizer = model, tokenizer
        self.V = cfg.vocab_size
        self.max_batch, self.max_queue, self.max_len = int(max_batch), int(max_queue), int(max_len)
        self.eot = getattr(tokenizer, "eot_token", None)
        self._dec: Optional[Decoder] = None
        self._cond = threading.Condition()
        self._waiting: Deque[Request] = collections.deque()
        self._active: List[Request] = []
        self._free: List[int] = list(range(self.max_batch))
        self._accepting = True
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        # statistics (read by /health and the benchmark)
        self.steps = 0
        self.tokens_generated = 0

    # ---- lifecycle ----

    def start(self) -> "Engine":
        """Allocate the decoder (the KV cache for max_batch x max_len, touched once so requests do
        not pay its page faults) and start the loop."""
        if self._thread is not None:
            raise RuntimeError("Engine.start: already started")
        self._dec = Decoder(self.model, self.max_batch, self.max_len)
        self._dec.touch()  # else the first requests of every row pay its page faults
        self._thread = threading.Thread(target=self._loop, name="gptcore-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop admitting; with ``drain`` let running and waiting requests finish (up to
        ``timeout`` seconds), then cancel whatever is left and end the loop."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        if drain and self._thread is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._cond:
                while self._active or self._waiting:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(0.05 if left is None else min(left, 0.05))
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:  # never started, or left behind: nothing may hang on them
            for req in list(self._waiting) + self._active:
                req._finish("the server is shutting down")
            self._waiting.clear()
            self._active.clear()

    @property
    def running(self) -> bool:
        """Started, and still taking requests."""
        return self._thread is not None and self._accepting and not self._stopping

    def stats(self) -> Dict[str, int]:
        with self._cond:
            return {"active_requests": len(self._active), "busy_slots": self.max_batch - len(self._free),
                    "waiting_requests": len(self._waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self.steps,
                    "tokens_generated": self.tokens_generated}

    # ---- requests ----

    def submit(self, prompt: Sequence[int], *, n: int = 1, max_tokens: int = 16,
               temperature: float = 1.0, top_p: Optional[float] = None, top_k: Optional[int] = None,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               logit_bias: Optional[dict] = None, stop=None, seed: Optional[int] = None,
               logprobs: Optional[int] = None, prompt_logprobs: bool = False,
               on_event: Optional[Callable] = None) -> Request:
        """Queue ``n`` continuations of ``prompt`` (token ids). The controls are those of
        :func:`gptcore.generate.generate` (``max_tokens`` is its max_new_tokens);
        ``prompt_logprobs`` also computes the prompt tokens' logprobs (OpenAI's echo + logprobs).
        Raises ValueError/TypeError for bad arguments, :class:`QueueFull` when max_queue requests
        already wait, :class:`EngineStopped` when shutting down."""
        ids = np.asarray(prompt)
        if (ids.ndim != 1 or ids.size == 0 or ids.dtype == np.bool_
                or not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError("prompt: expected a non-empty list of token ids")
        ids = ids.astype(np.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.V:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {self.V})")
        if not _is_int(n) or not 1 <= n <= self.max_batch:
            raise ValueError(f"n: expected an int in [1, {self.max_batch}] (the server's batch), got {n!r}")
        ctl = _Controls(self.V, max_tokens, temperature, top_k, top_p, frequency_penalty,
                        presence_penalty, logit_bias, stop, seed, logprobs, self.tokenizer)
        if len(ids) + ctl.max_new_tokens > self.max_len:
            raise ValueError(f"max_tokens: the prompt ({len(ids)} tokens) plus max_tokens "
                             f"({ctl.max_new_tokens}) exceeds the model's context of {self.max_len} tokens")
        req = Request(ids, int(n), ctl, self.tokenizer, self.eot, bool(prompt_logprobs), on_event)
        with self._cond:
            if not self._accepting or self._stopping:
                raise EngineStopped("the server is shutting down")
            queued = self._queued_behind(req.n)
            if queued is not None and queued >= self.max_queue:
                raise QueueFull(f"the server is busy: {queued} requests are waiting for room in "
                                f"the batch (max_queue {self.max_queue}); retry later")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def _queued_behind(self, n: int) -> Optional[int]:
        """None if a new request of ``n`` choices gets slots at the next step (after the waiting
        requests, first come first served), else how many waiting requests will still be
        waiting for slots then (holding the lock)."""
        free, behind = len(self._free), 0
        for r in self._waiting:
            if behind == 0 and not r.cancelled and r.n <= free:
                free -= r.n
            elif not r.cancelled:
                behind += 1
        return None if behind == 0 and n <= free else behind

    # ---- the loop ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            try:
                self._start(admitted)
                self._step()
            except Exception as e:  # noqa: BLE001 -- a bug must not hang the clients
                for req in list(self._active):
                    self._retire(req, f"internal error: {type(e).__name__}: {e}")
            with self._cond:
                self._cond.notify_all()  # stop(drain=True) watches the queues

    def _admit(self) -> List[Request]:
        """Waiting requests that get slots now, first come first served (holding the lock)."""
        out = []
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                req._finish("cancelled")
                continue
            if req.n > len(self._free):
                break  # no overtaking: the head waits for its slots
            self._waiting.popleft()
            req.slots = [self._free.pop(0) for _ in range(req.n)]
            self._active.append(req)
            out.append(req)
        return out

    # prompt tokens one batched prefill pass takes (the admitted rows are cut into such groups)
    PREFILL_TOKENS = 2048

    def _start(self, admitted: List[Request]) -> None:
        """Prefill the admitted requests' slots, batched (:meth:`Decoder.prefill_rows`, rows of
        similar prompt lengths together), and draw their first tokens."""
        work = []  # (prompt length, request)
        for req in admitted:
            try:
                if req.want_prompt_logprobs:
                    req.prompt_logprobs = self._prompt_logprobs(req)
                if req.ctl.max_new_tokens == 0:
                    for r in req.rows:
                        r._end("length")
                    for i in range(req.n):
                        req._release(i)
                    self._retire(req)
                    continue
                req.sampler = _Sampler(req.ctl, req.n, self.V, "cpu")
                work.append(req)
            except Exception as e:  # noqa: BLE001 -- the request fails, the engine goes on
                self._retire(req, f"{type(e).__name__}: {e}")
        work.sort(key=lambda req: len(req.prompt))
        group: List[Request] = []
        for req in work + [None]:
            if group and (req is None or
                          (sum(r.n for r in group) + req.n) * len(req.prompt) > self.PREFILL_TOKENS):
                self._prefill(group)
                group = []
            if req is not None:
                group.append(req)

    def _prefill(self, group: List[Request]) -> None:
        """One prefill pass for every slot of ``group``'s requests, then their first draws."""
        try:
            logits = self._dec.prefill_rows([s for req in group for s in req.slots],
                                            [req.prompt for req in group for _ in req.slots])
        except Exception as e:  # noqa: BLE001 -- these requests fail, the engine goes on
            for req in group:
                self._retire(req, f"{type(e).__name__}: {e}")
            return
        at = 0
        for req in group:
            try:
                self._sample(req, logits[at:at + req.n])
            except Exception as e:  # noqa: BLE001
                self._retire(req, f"{type(e).__name__}: {e}")
            at += req.n

    def _prompt_logprobs(self, req: Request) -> List[Optional[TokenLogprob]]:
        """Each prompt token's logprob under the model given the tokens before it (None for the
        first) with the top ``logprobs`` alternatives, from one full forward of the prompt."""
        k = req.ctl.logprobs or 0
        p = req.prompt
        out: List[Optional[TokenLogprob]] = [None]
        if len(p) < 2:
            return out
        lp = _log_softmax(np.asarray(self.model.logits(p[None, :-1])[0], np.float64))
        for t in range(1, len(p)):
            row = lp[t - 1]
            top = []
            if k:
                idx = np.argpartition(row, self.V - k)[self.V - k:]
                idx = idx[np.argsort(-row[idx], kind="stable")]
                top = [(int(j), float(row[j])) for j in idx]
            out.append(TokenLogprob(int(p[t]), float(row[p[t]]), top))
        return out

    def _sample(self, req: Request, logits: np.ndarray) -> None:
        """Draw the next token of every running choice from its logits (n, V) and hand out what
        is decided; finished choices release their slots."""
        want = [i for i, r in enumerate(req.rows) if not r.done]
        forced = req.sampler.forced_host
        for i, r in enumerate(req.rows):
            forced[i] = 0 if r.done else -1  # a finished choice's row draws nothing
        toks, lps = req.sampler(tensor(np.ascontiguousarray(logits, np.float32)), want)
        for n, i in enumerate(want):
            req.rows[i].accept(int(toks[i]), lps[n])
            self.tokens_generated += 1
            req._release(i)
        if all(r.done for r in req.rows):
            self._retire(req)

    def _step(self) -> None:
        """One decoding step for every running choice, then its sampling."""
        running = [req for req in self._active if not req.cancelled]
        for req in [r for r in self._active if r.cancelled]:
            self._retire(req, "cancelled")
        if not running:
            return
        # rows 0 .. S-1 step (slots are taken lowest first, so S is usually the busy count)
        S = 1 + max((req.slots[i] for req in running for i, r in enumerate(req.rows) if not r.done),
                    default=0)
        ids = np.zeros(S, np.int64)
        pos = np.zeros(S, np.int64)  # idle rows: token 0 at position 0, output ignored
        for req in running:
            for i, r in enumerate(req.rows):
                if not r.done:
                    b = req.slots[i]
                    ids[b] = r.gen[-1]  # not done: the last token is still there (no cut)
                    pos[b] = r.L + r.n_sampled - 1
        try:
            logits = self._dec.step_rows(ids, pos)
        except Exception as e:  # noqa: BLE001 -- every running request fails, the engine goes on
            for req in running:
                self._retire(req, f"{type(e).__name__}: {e}")
            return
        self.steps += 1
        for req in running:
            try:
                self._sample(req, logits[req.slots])
            except Exception as e:  # noqa: BLE001
                self._retire(req, f"{type(e).__name__}: {e}")

    def _retire(self, req: Request, error: Optional[str] = None) -> None:
        """Free the request's slots and tell its caller it is over."""
        with self._cond:
            if req in self._active:
                self._active.remove(req)
                self._free.extend(req.slots)
                self._free.sort()
            req.slots = []
        req._finish(error)
