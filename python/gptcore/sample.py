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
import math
import os
import sys
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import ops, reference
from .tensor import Tensor, empty, tensor, zeros

__all__ = ["generate", "complete", "Decoder", "Logprobs", "TokenLogprob", "PAD",
           "add_sample_subcommand", "sample_command", "load_for_sampling"]

PAD = -1  # fills the end of rows that stopped early (never a token id)


# ---- incremental inference --------------------------------------------------------------------


class Decoder:
    """Incremental inference over a KV cache for one batch of ``batch_size`` rows.

    ``forward(tokens)`` takes the next (B, Tn) token ids of every row, at positions
    ``pos .. pos+Tn-1``, appends their keys and values to the cache, advances ``pos`` and returns
    the float32 logits (B, vocab_size) of the last of those positions. The caches hold
    ``max_len`` positions (at most the model's block_size) and are allocated here, once.

        >>> dec = Decoder(model, batch_size=1, max_len=64)
        >>> logits = dec.forward(prompt_ids[None, :])     # prefill
        >>> logits = dec.forward([[next_id]])              # one step
    """

    def __init__(self, model, batch_size: int, max_len: int):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "parameters"):
            raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
        for name, v in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if max_len > cfg.block_size:
            raise ValueError(f"max_len: {max_len} exceeds the model's block_size {cfg.block_size}")
        self.model = model
        self.config = cfg
        self.batch_size = int(batch_size)
        self.max_len = int(max_len)
        self.device = getattr(model, "device", "cpu")
        self.dtype = getattr(model, "dtype", "float32")
        self.params: Dict[str, Tensor] = model.parameters()
        B, H, D = self.batch_size, cfg.n_head, cfg.n_embd // cfg.n_head
        shape = [B, H, self.max_len, D]
        self.k_cache = [empty(shape, self.dtype, self.device) for _ in range(cfg.n_layer)]
        self.v_cache = [empty(shape, self.dtype, self.device) for _ in range(cfg.n_layer)]
        # bias-free models still hand LayerNorm a bias: a zero vector
        self._zero = None if cfg.bias else zeros([cfg.n_embd], self.dtype, self.device)
        self.logits = empty([B, cfg.padded_vocab_size], self.dtype, self.device)
        self._step: Optional[_StepBuffers] = None
        self._prefill: Optional[_StepBuffers] = None
        self.pos = 0

    def reset(self) -> None:
        """Start over at position 0 (the caches are reused)."""
        self.pos = 0

    def _checked_ids(self, tokens) -> np.ndarray:
        """(B, Tn) host token ids, validated against the vocabulary and the cache, as int32."""
        arr = np.asarray(tokens)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[0] != self.batch_size or arr.shape[1] < 1:
            raise ValueError(f"tokens: expected shape ({self.batch_size}, Tn >= 1), got {arr.shape}")
        V = self.config.vocab_size
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"tokens: id {lo if lo < 0 else hi} is outside the vocabulary [0, {V})")
        Tn = arr.shape[1]
        if self.pos + Tn > self.max_len:
            raise ValueError(f"tokens: {Tn} more positions after {self.pos} exceed the cache's "
                             f"{self.max_len}")
        return arr.astype(np.int32, copy=False)

    def _upload(self, ids: np.ndarray) -> Tensor:
        host = tensor(np.ascontiguousarray(ids))
        return host if self.device == "cpu" else host.to(device=self.device)

    def _ln_bias(self, name: str) -> Tensor:
        return self.params[name] if self.config.bias else self._zero

    def _buffers(self, Tn: int) -> "_StepBuffers":
        """Buffers for feeding Tn positions: the one-position step's are made once and kept;
        a prefill's are kept until a prefill of another length needs its own."""
        if Tn == 1:
            if self._step is None:
                self._step = _StepBuffers(self, 1)
            return self._step
        if self._prefill is None or self._prefill.Tn != Tn:
            self._prefill = None  # release the old prefill buffers first
            self._prefill = _StepBuffers(self, Tn)
        return self._prefill

    def forward(self, tokens) -> np.ndarray:
        """Feed (B, Tn) tokens; returns the last position's logits, float32 (B, vocab_size)."""
        logits = self.prefill(tokens)
        out = np.asarray(logits.numpy())[:, : self.config.vocab_size]
        return np.array(out, dtype=np.float32, order="C", copy=True)  # never a view of the buffer

    def prefill(self, tokens) -> Tensor:
        """Feed (B, Tn) host tokens; returns the logits buffer (B, padded_vocab_size) of the last
        position. All but the last position go through the blocks in one pass without the LM
        head; the last one is then fed as a one-position step, so its hidden state is already
        (B, C) for the head -- no gather of the last position of each row."""
        arr = self._checked_ids(tokens)  # the whole block, before anything runs
        if arr.shape[1] > 1:
            self.forward_tensor(self._upload(arr[:, :-1]), head=False)
        return self.forward_tensor(self._upload(arr[:, -1:]))

    def forward_tensor(self, idx: Tensor, pos_tensor: Optional[Tensor] = None,
                       head: bool = True) -> Optional[Tensor]:
        """Feed (B, Tn) int32 ids already on the model's device. With ``head`` (one position
        only) returns the logits buffer (B, padded_vocab_size) itself, overwritten by the next
        call; without, only the caches are filled and None is returned.

        Every intermediate lands in buffers allocated once (:class:`_StepBuffers`), so a
        one-position step allocates nothing. With ``pos_tensor`` (a 1-element int32 tensor on
        the device that holds ``self.pos``) the kernels read the position from device memory
        and the step does no host work at all: it can be captured in a CUDA graph."""
        cfg, P, eps = self.config, self.params, self.config.ln_eps
        B, Tn = idx.shape
        if head and Tn != 1:
            raise ValueError(f"idx: the LM head runs on one position; got {Tn} (use prefill(), "
                             f"or head=False)")
        pos = self.pos if pos_tensor is None else pos_tensor
        H, S = cfg.n_head, self._buffers(Tn)
        x = ops.embedding_forward(idx, P["wte"], P["wpe"], pos, out=S.x0)

        def lin(x, prefix, out, gelu=False):
            w, b = P[prefix + ".weight"], P.get(prefix + ".bias")
            return ops.linear_forward(x, w, b, gelu=gelu, out=out)

        def attend(h_in, i):  # attention sub-block; its c_proj output lands in S.scratch
            lin(h_in, f"h.{i}.attn.c_attn", S.qkv)
            ops.attention_kvcache(S.qkv, self.k_cache[i], self.v_cache[i], pos, H,
                                  cfg.attn_window[i], out=S.att)
            lin(S.att, f"h.{i}.attn.c_proj", S.scratch)

        def mlp(h_in, i):  # MLP sub-block; its output lands in S.scratch
            lin(h_in, f"h.{i}.mlp.c_fc", (S.fc, S.fc_pre), gelu=True)
            lin(S.fc, f"h.{i}.mlp.c_proj", S.scratch)

        def res_ln(x, residual, prefix, sum_out, ln_out):
            ops.residual_layernorm_forward(x, residual, P[prefix + ".weight"],
                                           self._ln_bias(prefix + ".bias"), eps,
                                           out=(sum_out, ln_out, S.mean, S.rstd))
            return sum_out, ln_out

        if cfg.prenorm:  # GPT-2/3: residual adds fused with the next LayerNorm
            # residual stream: x0 -> res_mid (r1) -> res (r0) -> res_mid (r1) -> ...
            res = x
            for i in range(cfg.n_layer):
                h = f"h.{i}"
                if i == 0:
                    ops.layernorm_forward(x, P[h + ".ln_1.weight"], self._ln_bias(h + ".ln_1.bias"),
                                          eps, out=(S.ln, S.mean, S.rstd))
                else:
                    res, _ = res_ln(S.scratch, res, h + ".ln_1", S.r0, S.ln)
                attend(S.ln, i)
                res, _ = res_ln(S.scratch, res, h + ".ln_2", S.r1, S.ln)
                mlp(S.ln, i)
            if head:  # the final LayerNorm only feeds the head
                _, xf = res_ln(S.scratch, res, "ln_f", S.r0, S.ln)
        else:  # GPT-1: x = LN(x + attn(x)); x = LN(x + mlp(x))
            xf = x
            for i in range(cfg.n_layer):
                h = f"h.{i}"
                attend(xf, i)
                _, n1 = res_ln(S.scratch, xf, h + ".ln_1", S.r0, S.ln)
                mlp(n1, i)
                _, xf = res_ln(S.scratch, n1, h + ".ln_2", S.r1, S.out)
        self.pos += Tn
        if not head:
            return None
        last = xf.view([B, cfg.n_embd])
        return ops.linear_forward(last, P["wte"], None, out=self.logits)[0]  # tied head


class _StepBuffers:
    """Every intermediate of a decoder forward over Tn positions, allocated once.

    Nothing is kept for a backward pass, so all blocks share one set: a residual stream that
    alternates between ``r0`` and ``r1`` (a fused residual+LayerNorm may not write its own
    input), one LayerNorm output, qkv, attention output, MLP hidden (and its pre-GELU twin,
    which the fused GELU GEMM writes), and the ``scratch`` that carries each sub-block's output
    to the next residual add."""

    def __init__(self, dec: Decoder, Tn: int):
        B, C, dt, dev = dec.batch_size, dec.config.n_embd, dec.dtype, dec.device
        act = lambda n: empty([B, Tn, n], dt, dev)
        self.Tn = Tn
        self.x0, self.r0, self.r1, self.ln, self.out = (act(C) for _ in range(5))
        self.qkv, self.att, self.scratch = act(3 * C), act(C), act(C)
        self.fc, self.fc_pre = act(4 * C), act(4 * C)
        self.mean, self.rstd = empty([B, Tn], "float32", dev), empty([B, Tn], "float32", dev)


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
        from . import cuda

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


def _encode_prompt(tokenizer, text: str, arg: str) -> List[int]:
    if not isinstance(text, str):
        raise TypeError(f"{arg}: expected a str, got {type(text).__name__}")
    try:
        ids = list(tokenizer.encode(text, allowed_special="all"))
    except TypeError:  # a tokenizer without special-token controls
        ids = list(tokenizer.encode(text))
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
             stream: bool = False, logprobs: Optional[int] = None):
    """Text in, text out: GPT-3's completion interface over :func:`generate`.

    ``prompt`` is a str (returns the completion str) or a list of str (returns a list). The
    completion excludes the prompt, the end-of-text token and any stop sequence; it is cut
    exactly where a stop sequence begins. An empty prompt starts from end-of-text.
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
        ids = [_encode_prompt(tokenizer, prompt, "prompt")]
    elif isinstance(prompt, (list, tuple)) and prompt:
        ids = [_encode_prompt(tokenizer, p, f"prompt[{i}]") for i, p in enumerate(prompt)]
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


# ---- the `gptcore sample` command -----------------------------------------------------------------------


def _resolve_tokenizer(spec: Optional[str], path: str, vocab_size: int, meta_name: Optional[str]):
    """A tokenizer for a checkpoint: --tokenizer NAME|DIR, else the checkpoint's own files,
    else the training data's tokenizer, else by vocabulary size (GPT-2's 50257, bytes' 257)."""
    from . import data as gdata

    def from_dir(d):
        enc, bpe = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        if os.path.isfile(enc) and os.path.isfile(bpe):
            from .tokenizer import Tokenizer

            return Tokenizer.from_files(enc, bpe)
        return None

    if spec:
        if os.path.isdir(spec):
            tok = from_dir(spec)
            if tok is None:
                from .tokenizer import Tokenizer

                tok = Tokenizer.load(spec)
            return tok
        return gdata.get_tokenizer(spec)
    if os.path.isdir(path):
        tok = from_dir(path)
        if tok is not None:
            return tok
    if meta_name:
        return gdata.get_tokenizer(meta_name)
    if vocab_size == 257:
        return gdata.get_tokenizer("byte")
    if vocab_size in (50257, 50304):
        return gdata.get_tokenizer("gpt2")
    raise ValueError(f"--tokenizer: cannot tell which tokenizer a {vocab_size}-token model uses; "
                     f"pass --tokenizer gpt2|byte|DIR")


def load_for_sampling(path: str, device: str = "cpu", dtype: str = "float32",
                      tokenizer: Optional[str] = None):
    """(model, tokenizer) from a checkpoint: a `gptcore train` run directory or its checkpoint/,
    a transformers/gptcore checkpoint directory, or an llm.c model .bin."""
    from .model import GPT

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint: {path!r} does not exist")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isdir(os.path.join(path, "checkpoint")):
        path = os.path.join(path, "checkpoint")  # a `gptcore train --out DIR` directory
    from .train import is_native_v1_checkpoint, load_checkpoint, recorded_tokenizer

    if os.path.isdir(path) and is_native_v1_checkpoint(path):  # written by an older gptcore train
        ck = load_checkpoint(path)
        model = GPT(ck["config"], device=device, dtype=dtype, init=False)
        model.load_state_dict(ck["model"])
    else:
        from .checkpoint import load_pretrained

        model = load_pretrained(path, device=device, dtype=dtype)
    # a byte-level `gptcore train` run saves no vocabulary files, only its tokenizer's name
    meta_name = recorded_tokenizer(path) if os.path.isdir(path) else None
    tok = _resolve_tokenizer(tokenizer, path, model.config.vocab_size, meta_name)
    return model, tok


def _parse_bias(items: Optional[List[str]]) -> Optional[Dict[int, float]]:
    if not items:
        return None
    out = {}
    for s in items:
        tok, sep, val = s.partition("=")
        try:
            out[int(tok)] = float(val)
        except ValueError:
            raise ValueError(f"--logit-bias: expected TOKEN_ID=BIAS, got {s!r}") from None
        if not sep:
            raise ValueError(f"--logit-bias: expected TOKEN_ID=BIAS, got {s!r}")
    return out


def add_sample_subcommand(subparsers) -> None:
    """Registers ``gptcore sample`` on an argparse sub-parser collection."""
    import argparse

    s = subparsers.add_parser(
        "sample", help="continue a prompt with a trained model, streaming the text",
        description="Sample text from a checkpoint with a KV cache, streaming it to the terminal. "
                    "The checkpoint is a `gptcore train --out` directory (or its checkpoint/), a "
                    "transformers/gptcore checkpoint directory, or an llm.c model .bin.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gptcore sample --checkpoint gptcore-run --prompt 'def '\n"
               "  gptcore sample --checkpoint gpt2-dir --prompt 'Hello' --temperature 0.8 --top-p 0.9 "
               "--stop '\\n\\n'\n")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="model to sample from")
    s.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    s.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to generate at most (default 200)")
    s.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="independent completions of the prompt (default 1)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--logit-bias", action="append", metavar="TOKEN_ID=BIAS",
                   help="add BIAS to a token's logit (repeatable; -inf bans)")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when TEXT is generated (repeatable; backslash escapes like \\n work)")
    s.add_argument("--seed", type=int, default=None, help="makes the sample reproducible")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16"])
    s.add_argument("--tokenizer", default=None, metavar="NAME|DIR",
                   help="gpt2, byte, or a directory with vocab.json + merges.txt "
                        "(default: the checkpoint's)")


def _unescape(s: str) -> str:
    try:
        return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return s


def sample_command(args, out=None) -> int:
    """Runs ``gptcore sample`` for parsed ``args``; streams text to ``out`` (default stdout)."""
    out = out or sys.stdout
    if args.num_samples < 1:
        raise ValueError(f"--num-samples: expected >= 1, got {args.num_samples}")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    model, tok = load_for_sampling(args.checkpoint, device=args.device, dtype=dtype,
                                   tokenizer=args.tokenizer)
    stop = [_unescape(s) for s in args.stop] if args.stop else None
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, logit_bias=_parse_bias(args.logit_bias),
              stop=stop, stream=True)
    for n in range(args.num_samples):
        seed = None if args.seed is None else args.seed + n
        if args.num_samples > 1:
            out.write(f"---- sample {n + 1} ----\n")
        out.write(args.prompt)
        out.flush()
        for piece in complete(model, tok, args.prompt, seed=seed, **kw):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0
