"""Sampling controls and the device-side sampler."""

from __future__ import annotations

import math
import os
import warnings
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from .. import ops, reference
from ..models.kvcache import Decoder
from ..tensor import Tensor, empty, tensor, zeros

__all__ = ["Logprobs", "TokenLogprob", "PAD", "filtered_distribution"]

PAD = -1  # fills the end of rows that stopped early (never a token id)


# ---- results -----------------------------------------------------------------------------------


class Logprobs(NamedTuple):
    """Per generated token: ``token_logprobs`` (B, N) the chosen token's log-probability,
    ``top_tokens`` (B, N, k) and ``top_logprobs`` (B, N, k) the k most likely tokens, most likely
    first. N = max_new_tokens; entries past a row's last generated token are NaN / PAD."""

    token_logprobs: np.ndarray
    top_tokens: np.ndarray
    top_logprobs: np.ndarray


class TokenLogprob(NamedTuple):
    """One streamed token with its log-probability and the top-k alternatives [(id, logprob)]."""

    token: int
    logprob: float
    top: List[Tuple[int, float]]


# ---- argument checks ---------------------------------------------------------------------------


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _is_num(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def _prompts(idx, V: int) -> Tuple[List[np.ndarray], bool]:
    """idx -> list of int64 rows (lengths may differ) and whether the input was one 1-D row."""
    if isinstance(idx, Tensor):
        if idx.dtype not in ("int32", "int64", "uint16"):
            raise TypeError(f"idx: expected integer token ids, got a {idx.dtype} tensor")
        idx = np.asarray(idx.numpy())
    if isinstance(idx, np.ndarray) or hasattr(idx, "__array__") and not isinstance(idx, (list, tuple)):
        arr = np.asarray(idx)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"idx: expected integer token ids, got dtype {arr.dtype}")
        if arr.ndim == 1:
            rows, single = [arr], True
        elif arr.ndim == 2:
            rows, single = list(arr), False
        else:
            raise ValueError(f"idx: expected a (B, T) array of token ids, got shape {arr.shape}")
    elif isinstance(idx, (list, tuple)):
        if len(idx) == 0:
            raise ValueError("idx: empty batch")
        if all(_is_int(t) for t in idx):
            rows, single = [np.asarray(idx)], True
        else:
            rows, single = [], False
            for b, r in enumerate(idx):
                a = np.asarray(r.numpy() if isinstance(r, Tensor) else r)
                if a.ndim != 1 or (a.size and (a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer))):
                    raise TypeError(f"idx[{b}]: expected a sequence of integer token ids")
                rows.append(a)
    else:
        raise TypeError(f"idx: expected a (B, T) integer array or a list of token-id lists, "
                        f"got {type(idx).__name__}")
    if not rows:
        raise ValueError("idx: empty batch")
    out = []
    for b, r in enumerate(rows):
        r = np.asarray(r, dtype=np.int64).reshape(-1)
        if r.size == 0:
            raise ValueError(f"idx[{b}]: empty prompt (give at least one token, e.g. end-of-text)")
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"idx[{b}]: token id {lo if lo < 0 else hi} is outside the "
                             f"vocabulary [0, {V})")
        out.append(r)
    return out, single


class _Controls:
    """Validated sampling controls."""

    def __init__(self, V, max_new_tokens, temperature, top_k, top_p, frequency_penalty,
                 presence_penalty, logit_bias, stop, seed, logprobs, tokenizer):
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if not _is_num(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
        if top_p is not None and (not _is_num(top_p) or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
        for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if not _is_num(v) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
        if seed is not None and not _is_int(seed):
            raise TypeError(f"seed: expected None or an int, got {type(seed).__name__}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed}")
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= V):
            raise ValueError(f"logprobs: expected None or an int in [0, {V}], got {logprobs!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_k = None if top_k is None or top_k >= V else int(top_k)
        self.top_p = None if top_p is None or top_p >= 1 else float(top_p)
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.seed = seed
        self.logprobs = None if logprobs is None else int(logprobs)
        # logit_bias -> (ids, biases)
        self.bias_ids = self.bias_vals = None
        if logit_bias is not None:
            if not isinstance(logit_bias, dict):
                raise TypeError(f"logit_bias: expected a dict {{token id: bias}}, got {type(logit_bias).__name__}")
            ids, vals = [], []
            for t, b in logit_bias.items():
                if isinstance(t, str) and t.strip().lstrip("-").isdigit():
                    t = int(t)  # JSON keys are strings (as in OpenAI's API)
                if not _is_int(t) or not 0 <= t < V:
                    raise ValueError(f"logit_bias: key {t!r} is not a token id in [0, {V})")
                if not _is_num(b) or math.isnan(b) or b == math.inf:
                    raise ValueError(f"logit_bias[{t}]: expected a finite number (or -inf to ban), got {b!r}")
                ids.append(int(t))
                vals.append(float(b))
            if ids:
                self.bias_ids, self.bias_vals = np.asarray(ids), np.asarray(vals)
        # stop -> text stops and/or token-sequence stops
        self.stop_text: List[str] = []
        self.stop_ids: List[List[int]] = []
        if stop is not None:
            items = [stop] if isinstance(stop, str) else stop
            if not isinstance(items, (list, tuple)):
                raise TypeError(f"stop: expected a str, a list of str or a list of token-id lists, "
                                f"got {type(stop).__name__}")
            for n, s in enumerate(items):
                if isinstance(s, str):
                    if not s:
                        raise ValueError(f"stop[{n}]: empty string")
                    self.stop_text.append(s)
                elif isinstance(s, (list, tuple, np.ndarray)) and len(s) > 0 and all(_is_int(t) for t in s):
                    self.stop_ids.append([int(t) for t in s])
                else:
                    raise TypeError(f"stop[{n}]: expected a non-empty str or a non-empty list of token ids, "
                                    f"got {s!r}")
            if self.stop_text and (tokenizer is None or not hasattr(tokenizer, "decode")):
                raise ValueError("stop: text stop sequences are matched on decoded text and need a "
                                 "tokenizer (pass tokenizer=, or give stop sequences as token-id lists)")


# ---- sampling -----------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def filtered_distribution(logits, temperature: float = 1.0, top_k: Optional[int] = None,
                          top_p: Optional[float] = None) -> np.ndarray:
    """The probabilities (V,) the sampler draws from for one row of (already biased and
    penalised) logits: temperature, then top-k, then top-p. For inspection and tests."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    V = z.shape[0]
    c = _Controls(V, 0, temperature if temperature > 0 else 1.0, top_k, top_p, 0.0, 0.0,
                  None, None, None, None, None)
    out = np.zeros(V)
    if temperature == 0:
        out[int(np.argmax(z))] = 1.0
        return out
    w = reference._sample_filter(z, c.temperature, c.top_k, c.top_p)
    return w / w.sum()


class _Sampler:
    """Chooses every row's next token with :func:`gptcore.ops.sample_tokens` on the model's
    device, writing them into ``ids`` (B, 1), the decoder's next input. Sampling state lives
    next to it: per-row draw counters, per-row token counts (only with penalties), the dense
    logit bias, and ``forced`` (B,) -- the token of each row that is not sampled this step (a
    prompt token, or filler for a finished row; -1 where the row samples).

    ``logprobs`` are computed on the host from a copy of the logits, with the same bias and
    penalties, so asking for them never changes which tokens are drawn."""

    def __init__(self, ctl: _Controls, B: int, V: int, device: str):
        self.ctl, self.B, self.V, self.device = ctl, B, V, device
        self.seed = (int(ctl.seed) if ctl.seed is not None
                     else int(np.random.SeedSequence().entropy) % (1 << 63))
        penalties = bool(ctl.frequency_penalty or ctl.presence_penalty)
        self.counter = zeros([B], "int64", device)
        self.counts = zeros([B, V], "int32", device) if penalties else None
        self.bias = None
        self.bias_host = None
        if ctl.bias_ids is not None:
            self.bias_host = np.zeros(V, np.float32)
            self.bias_host[ctl.bias_ids] = ctl.bias_vals
            self.bias = tensor(self.bias_host, device=device)
        self.forced_host = np.full(B, -1, np.int32)
        self.forced = empty([B], "int32", device)
        self.ids = empty([B, 1], "int32", device)
        # logprobs need the counts on the host too (before each step's update)
        self.counts_host = (np.zeros((B, V), np.int32)
                            if penalties and ctl.logprobs is not None else None)

    def __call__(self, logits: Tensor, rows: List[int]):
        """Tokens (B,) for this step from the (B, Vp) logits (rows not in ``rows`` take
        ``forced_host``); returns (tokens, logprob entries for ``rows``)."""
        ctl = self.ctl
        lps: List[Optional[TokenLogprob]] = [None] * len(rows)
        if ctl.logprobs is not None and rows:
            host = np.asarray(logits.numpy(), dtype=np.float64)[rows, : self.V]
            lps = self._logprobs(host, rows)
        self.upload_forced()
        self.draw(logits)
        toks = self.read(rows)
        if self.counts_host is not None:
            self.counts_host[rows, toks[rows]] += 1
        for n, b in enumerate(rows):
            if lps[n] is not None:
                lps[n] = lps[n]._replace(token=int(toks[b]), logprob=float(lps[n].logprob[toks[b]]))
        return toks, lps

    def upload_forced(self) -> None:
        """forced_host -> the device (outside a captured step: a host copy)."""
        self.forced.copy_(tensor(self.forced_host))

    def draw(self, logits: Tensor) -> None:
        """The device part: tokens into ``ids``, counts and counters advanced (capturable)."""
        ctl = self.ctl
        ops.sample_tokens(logits, vocab_size=self.V, temperature=ctl.temperature, top_k=ctl.top_k,
                          top_p=ctl.top_p, frequency_penalty=ctl.frequency_penalty,
                          presence_penalty=ctl.presence_penalty, counts=self.counts,
                          logit_bias=self.bias, seed=self.seed, counter=self.counter,
                          forced=self.forced, out=self.ids.view([self.B]))

    def read(self, rows: List[int]) -> np.ndarray:
        """The chosen tokens (B,) on the host; a row in ``rows`` that had nothing to sample
        raises."""
        toks = np.asarray(self.ids.numpy()).reshape(-1).astype(np.int64)
        for b in rows:
            if toks[b] < 0:
                raise ValueError(f"logit_bias: row {b} has no token left to sample (every logit is "
                                 f"-inf or the model produced non-finite logits)")
        return toks

    def _logprobs(self, z: np.ndarray, rows: List[int]) -> List[TokenLogprob]:
        """Log-probabilities after bias and penalties; the chosen token's is filled in later
        (``logprob`` holds the whole row until then)."""
        ctl = self.ctl
        if self.bias_host is not None:
            z = z + self.bias_host
        if self.counts_host is not None:
            cnt = self.counts_host[rows]
            z = z - (cnt * ctl.frequency_penalty + (cnt > 0) * ctl.presence_penalty)
        with np.errstate(invalid="ignore"):
            lp = _log_softmax(z)
        k, out = ctl.logprobs, []
        for n in range(len(rows)):
            pairs = []
            if k:
                top = np.argpartition(lp[n], self.V - k)[self.V - k:]
                top = top[np.argsort(-lp[n][top], kind="stable")]
                pairs = [(int(t), float(lp[n][t])) for t in top]
            out.append(TokenLogprob(-1, lp[n], pairs))
        return out


class _GraphStep:
    """The decode step -- the decoder's forward over the B tokens in ``sampler.ids`` at the
    current position, then the sampler's draw writing the next tokens back into ``sampler.ids``
    -- captured once as a CUDA graph and replayed every step: one launch instead of about six
    per layer, and no Python in between. Per step the host only writes the position and the
    forced tokens into device buffers and reads the B chosen tokens back.

    The first step runs eagerly (its results are used) with the same buffers and the device
    position, which also fills gptcore's memory cache with the scratch the kernels take; the
    capture right after it records the same launches (capturing runs nothing)."""

    def __init__(self, dec: Decoder, sampler: _Sampler):
        from .. import cuda

        self.dec, self.sampler = dec, sampler
        self.graph = cuda.Graph()
        self.pos = empty([1], "int32", dec.device)

    def _launches(self) -> None:
        logits = self.dec.forward_tensor(self.sampler.ids, pos_tensor=self.pos)
        self.sampler.draw(logits)

    def __call__(self, rows: List[int]) -> np.ndarray:
        self.sampler.upload_forced()
        self.pos.copy_(tensor(np.array([self.dec.pos], np.int32)))
        if self.graph is not None and self.graph.captured:
            self.graph.replay()
            self.dec.pos += 1
        else:
            self._launches()  # eager: advances dec.pos
            if self.graph is not None:
                pos = self.dec.pos
                try:
                    with self.graph.capture():
                        self._launches()
                except RuntimeError as e:  # e.g. a kernel's scratch not in the cache: stay eager
                    warnings.warn(f"generate: CUDA graph capture failed, decoding without graphs "
                                  f"({e})", RuntimeWarning, stacklevel=3)
                    self.graph = None
                finally:
                    self.dec.pos = pos  # the capture ran nothing: undo its bookkeeping
        return self.sampler.read(rows)


def _use_cuda_graphs(dec: Decoder, ctl: _Controls) -> bool:
    """Decode steps replay a CUDA graph on a GPU unless logprobs need the logits on the host
    between forward and draw, or GPTCORE_CUDA_GRAPHS=0 turns graphs off."""
    return (dec.device != "cpu" and ctl.logprobs is None
            and os.environ.get("GPTCORE_CUDA_GRAPHS", "1") != "0")


