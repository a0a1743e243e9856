"""Cached decoding: a KV cache per batch, and the decoder that feeds new positions through the
model's trunk (:meth:`gptcore.models.gpt.GPT._trunk_forward`, the same block code that training
runs) and its tied LM head.

    >>> dec = Decoder(model, batch_size=1, max_len=64)
    >>> logits = dec.forward(prompt_ids[None, :])     # prefill
    >>> logits = dec.forward([[next_id]])              # one step

Rows at their own positions (continuous batching: each row a slot a request joins and leaves):

    >>> dec = Decoder(model, batch_size=16, max_len=1024)
    >>> logits = dec.prefill_row(3, prompt_ids)        # row 3 starts a new prompt
    >>> logits = dec.step_rows(ids, positions)         # one token per row, each at its position
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .. import ops
from ..tensor import Tensor, empty

__all__ = ["KVCache", "Decoder"]


class KVCache:
    """Every layer's keys and values for ``batch_size`` rows and up to ``max_len`` positions:
    ``k[i]``, ``v[i]`` (B, n_head, max_len, head_dim) in the model's dtype on its device,
    allocated once. ``pos`` counts the positions written so far when all rows share it
    (:meth:`Decoder.forward`; the row API leaves per-row positions to its caller)."""

    def __init__(self, model, batch_size: int, max_len: int):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "_trunk_forward"):
            raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
        for name, v in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if max_len > cfg.block_size:
            raise ValueError(f"max_len: {max_len} exceeds the model's block_size {cfg.block_size}")
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        shape = [self.batch_size, cfg.n_head, self.max_len, cfg.head_dim]
        self.k: List[Tensor] = [empty(shape, model.dtype, model.device) for _ in range(cfg.n_layer)]
        self.v: List[Tensor] = [empty(shape, model.dtype, model.device) for _ in range(cfg.n_layer)]
        self.pos = 0


class Decoder:
    """Incremental inference over a :class:`KVCache` for one batch of ``batch_size`` rows.

    ``forward(tokens)`` takes the next (B, Tn) token ids of every row, at positions
    ``pos .. pos+Tn-1``, appends their keys and values to the cache, advances ``pos`` and returns
    the float32 logits (B, vocab_size) of the last of those positions. Every intermediate lands
    in buffers allocated once (one set shared by all layers), so a one-position step allocates
    nothing; dropout never applies.

    Rows at their own positions (a server's continuous batch, each row a slot):
    ``prefill_row(b, tokens)`` starts row b over with a prompt, ``step_rows(ids, positions)``
    feeds one token to every row at that row's position, in one batched pass. The caller keeps
    each row's position; these two leave :attr:`pos` alone (do not mix them with
    :meth:`forward` on one Decoder unless every row is restarted).
    """

    def __init__(self, model, batch_size: int, max_len: int):
        self.cache = KVCache(model, batch_size, max_len)
        self.model = model
        self.config = model.config
        self.batch_size, self.max_len = self.cache.batch_size, self.cache.max_len
        self.device, self.dtype = model.device, model.dtype
        self.logits = empty([self.batch_size, self.config.padded_vocab_size], self.dtype, self.device)
        self._step = None     # the one-position step's buffers, made once
        self._prefill = None  # a prefill's, kept until a prefill of another length
        self._rows: List[_RowCache] = []  # batch-1 views of each row's cache, made once
        self._row_step = None     # a one-row, one-position step's buffers
        self._row_prefill = None  # a one-row prefill's, kept until a prefill of another length
        self._leading = {}    # k -> a view of rows 0..k-1 (step_rows over the leading rows)
        self._row_steps = {}  # k -> one-position step buffers of k rows

    @property
    def pos(self) -> int:
        return self.cache.pos

    @pos.setter
    def pos(self, value: int) -> None:
        self.cache.pos = int(value)

    def reset(self) -> None:
        """Start over at position 0 (the caches are reused)."""
        self.cache.pos = 0

    def touch(self) -> None:
        """Write the whole KV cache once now. A fresh cache's pages are mapped on first write,
        so without this a long-lived decoder (a server's) pays them inside its first requests
        of every row: a 124M model's first prefill of a row took ~10x its steady time."""
        for t in self.cache.k + self.cache.v:
            t.zero_()

    def _buffers(self, Tn: int):
        from .gpt import _Workspace  # the trunk's workspace, in its shared-layers form

        if Tn == 1:
            if self._step is None:
                self._step = _Workspace(self.model, self.batch_size, 1, shared=True)
            return self._step
        if self._prefill is None or self._prefill.T != Tn:
            self._prefill = None  # release the old prefill buffers first
            self._prefill = _Workspace(self.model, self.batch_size, Tn, shared=True)
        return self._prefill

    def _row_buffers(self, Tn: int):
        """The batch-1 workspaces of the row API (prefill_row, the per-row step)."""
        from .gpt import _Workspace

        if Tn == 1:
            if self._row_step is None:
                self._row_step = _Workspace(self.model, 1, 1, shared=True)
            return self._row_step
        if self._row_prefill is None or self._row_prefill.T != Tn:
            self._row_prefill = None
            self._row_prefill = _Workspace(self.model, 1, Tn, shared=True)
        return self._row_prefill

    def _row(self, b: int) -> "_RowCache":
        if not self._rows:
            self._rows = [_RowCache(self.cache, r) for r in range(self.batch_size)]
        return self._rows[b]

    def _feed(self, idx: Tensor, ws, cache, pos, logits: Optional[Tensor]) -> Optional[Tensor]:
        """Run (B, Tn) device ids through the trunk into ``ws`` at ``pos`` of ``cache``; with a
        ``logits`` buffer (B, padded_vocab_size) (one position only) run the LM head into it."""
        h = self.model._trunk_forward(idx, ws, cache=cache, pos=pos, final_ln=logits is not None)
        if logits is None:
            return None
        last = h.view([idx.shape[0], self.config.n_embd])
        return ops.linear_forward(last, self.model.parameters()["wte"], None, out=logits)[0]

    def _host_logits(self, logits: Tensor) -> np.ndarray:
        """A float32 NumPy copy of a logits buffer without the vocabulary padding."""
        out = np.asarray(logits.numpy())[:, : self.config.vocab_size]
        return np.array(out, dtype=np.float32, order="C", copy=True)  # never a view of the buffer

    # ---- rows at their own positions (continuous batching) ------------------------------

    def _check_row(self, b) -> int:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"b: expected an int row index, got {type(b).__name__}")
        if not 0 <= b < self.batch_size:
            raise ValueError(f"b: row {b} is outside [0, {self.batch_size})")
        return int(b)

    def _check_ints(self, x, name: str, shape: tuple) -> np.ndarray:
        """An integer host array of exactly ``shape`` (lists, NumPy arrays, gptcore tensors)."""
        arr = np.asarray(x.numpy() if isinstance(x, Tensor) else x)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
        return arr

    def prefill_row(self, b: int, tokens) -> np.ndarray:
        """Start row ``b`` over with a prompt: feed ``tokens`` (1-D ints, 1 <= len <= max_len) at
        positions ``0 .. len-1`` of row b; the row's previous content is discarded and the other
        rows are untouched. Returns the float32 logits (vocab_size,) of the last prompt position
        (the distribution of the token at position len). Runs on batch-1 views of row b's cache;
        leaves :attr:`pos` (the shared position of :meth:`forward`) alone."""
        b = self._check_row(b)
        arr = np.asarray(tokens.numpy() if isinstance(tokens, Tensor) else tokens)
        if arr.ndim != 1 or arr.shape[0] < 1:
            raise ValueError(f"tokens: expected a 1-D array of 1 to {self.max_len} token ids, "
                             f"got shape {arr.shape}")
        arr = self.model.check_ids(arr[None, :], "tokens", max_len=self.max_len)
        row, n = self._row(b), arr.shape[1]
        if n > 1:
            self._feed(self.model._to_device_ids(arr[:, :-1]), self._row_buffers(n - 1), row, 0,
                       None)
        logits = self._feed(self.model._to_device_ids(arr[:, -1:]), self._row_buffers(1), row,
                            n - 1, self.logits.narrow(b, 1))
        return self._host_logits(logits)[0]

    def prefill_rows(self, rows: Sequence[int], prompts: Sequence) -> np.ndarray:
        """:meth:`prefill_row` for several rows in one batched pass: row ``rows[j]`` starts over
        with ``prompts[j]`` (1-D token ids). Returns float32 logits (len(rows), vocab_size), each
        row's distribution of the token after its prompt.

        The prompts run together through a scratch cache of len(rows) rows (all but each
        prompt's last token in one pass, shorter prompts padded at the end; then every last
        token as a one-position step at its own position, which overwrites the padding's first
        position and reads none of the rest), and each row's keys and values are then copied
        into its own row. On CUDA, where there is no strided device copy yet, the rows are
        prefilled one by one."""
        rows = [self._check_row(b) for b in rows]
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows: each row at most once, got {rows}")
        if len(prompts) != len(rows):
            raise ValueError(f"prompts: expected {len(rows)} prompts (one per row), got {len(prompts)}")
        arrs = []
        for j, p in enumerate(prompts):
            a = np.asarray(p.numpy() if isinstance(p, Tensor) else p)
            if a.ndim != 1 or a.shape[0] < 1:
                raise ValueError(f"prompts[{j}]: expected a 1-D array of 1 to {self.max_len} token "
                                 f"ids, got shape {a.shape}")
            arrs.append(self.model.check_ids(a[None, :], f"prompts[{j}]", max_len=self.max_len)[0])
        if not rows:
            return np.zeros((0, self.config.vocab_size), np.float32)
        if self.device != "cpu" or len(rows) == 1:
            return np.stack([self.prefill_row(b, a) for b, a in zip(rows, arrs)])
        from .gpt import _Workspace

        k, lens = len(rows), [len(a) for a in arrs]
        L = max(lens)
        scratch = KVCache(self.model, k, L)
        if L > 1:  # every prompt but its last token; the padding (token 0) lands after it
            head = np.zeros((k, L - 1), np.int32)
            for j, a in enumerate(arrs):
                head[j, : len(a) - 1] = a[:-1]
            self._feed(self.model._to_device_ids(head),
                       _Workspace(self.model, k, L - 1, shared=True), scratch, 0, None)
        last = self.model._to_device_ids(np.array([[a[-1]] for a in arrs], np.int32))
        pos = self.model._to_device_ids(np.array(lens, np.int32) - 1)
        out = self._host_logits(self._feed(last, self._step_buffers(k), scratch, pos,
                                           self.logits.narrow(0, k)))
        for src, dst in zip(scratch.k + scratch.v, self.cache.k + self.cache.v):
            s, d = src.numpy(), dst.numpy()
            for j, (b, n) in enumerate(zip(rows, lens)):
                d[b, :, :n] = s[j, :, :n]
        return out

    def step_rows(self, ids, positions) -> np.ndarray:
        """One decoding step with every row at its own position: feeds ``ids[b]`` at position
        ``positions[b]`` of row b (both int arrays of the same shape (k,), 1 <= k <= batch_size:
        rows 0 .. k-1 step, the others are neither computed nor touched); row b attends to its
        own cache positions ``0 .. positions[b]`` (window-limited on banded layers). Returns the
        float32 logits (k, vocab_size). A row the caller does not use still gets a valid token
        and a position in [0, max_len): its logits are garbage and its cache row may be
        overwritten at that position. Leaves :attr:`pos` alone. (A server that seats requests in
        the lowest free rows passes k = its highest busy row + 1, so a lone request pays for one
        row, not batch_size.)

        One batched pass through the trunk: the embedding and attention kernels take the
        positions as a (k,) int32 device tensor."""
        S = self.batch_size
        ids = np.asarray(ids.numpy() if isinstance(ids, Tensor) else ids)
        k = len(ids) if ids.ndim == 1 and 1 <= len(ids) <= S else S  # else the check below fails
        ids = self._check_ints(ids, "ids", (k,))
        pos = self._check_ints(positions, "positions", (k,))
        if int(pos.min()) < 0 or int(pos.max()) >= self.max_len:
            bad = int(pos.min()) if int(pos.min()) < 0 else int(pos.max())
            raise ValueError(f"positions: position {bad} is outside [0, {self.max_len}) "
                             f"(the cache's max_len)")
        idx = self.model._to_device_ids(self.model.check_ids(ids[:, None], "ids"))
        # one batched pass: the kernels read row b's position from element b of a (S,) int32
        # tensor on the device
        pos_t = self.model._to_device_ids(pos)
        view = self.cache if k == S else self._leading_rows(k)
        return self._host_logits(self._feed(idx, self._step_buffers(k), view, pos_t,
                                            self.logits.narrow(0, k)))

    def _leading_rows(self, k: int) -> "_RowCache":
        """Rows 0 .. k-1 of the cache as a cache of k rows (made once per k)."""
        if k not in self._leading:
            self._leading[k] = _RowCache(self.cache, 0, k)
        return self._leading[k]

    def _step_buffers(self, k: int):
        """One-position step buffers for k rows: the full batch's for k = batch_size, else made
        once per k."""
        from .gpt import _Workspace

        if k == self.batch_size:
            return self._buffers(1)
        if k not in self._row_steps:
            self._row_steps[k] = _Workspace(self.model, k, 1, shared=True)
        return self._row_steps[k]

    def forward(self, tokens) -> np.ndarray:
        """Feed (B, Tn) tokens; returns the last position's logits, float32 (B, vocab_size)."""
        return self._host_logits(self.prefill(tokens))

    def prefill(self, tokens) -> Tensor:
        """Feed (B, Tn) host tokens; returns the logits buffer (B, padded_vocab_size) of the last
        position. All but the last position go through the blocks in one pass without the LM
        head; the last one is then fed as a one-position step, so its hidden state is already
        (B, C) for the head -- no gather of the last position of each row."""
        arr = np.asarray(tokens)
        if arr.ndim != 2 or arr.shape[0] != self.batch_size:
            raise ValueError(f"tokens: expected shape ({self.batch_size}, Tn >= 1), got {arr.shape}")
        arr = self.model.check_ids(arr, "tokens", max_len=self.max_len - self.pos)
        if arr.shape[1] > 1:
            self.forward_tensor(self.model._to_device_ids(arr[:, :-1]), head=False)
        return self.forward_tensor(self.model._to_device_ids(arr[:, -1:]))

    def forward_tensor(self, idx: Tensor, pos_tensor: Optional[Tensor] = None,
                       head: bool = True) -> Optional[Tensor]:
        """Feed (B, Tn) int32 ids already on the model's device. With ``head`` (one position
        only) returns the logits buffer (B, padded_vocab_size) itself, overwritten by the next
        call; without, only the caches are filled and None is returned.

        With ``pos_tensor`` (a 1-element int32 tensor on the device that holds ``self.pos``) the
        kernels read the position from device memory and the step does no host work at all: it
        can be captured in a CUDA graph."""
        Tn = idx.shape[1]
        if head and Tn != 1:
            raise ValueError(f"idx: the LM head runs on one position; got {Tn} (use prefill(), "
                             f"or head=False)")
        pos = self.cache.pos if pos_tensor is None else pos_tensor
        logits = self._feed(idx, self._buffers(Tn), self.cache, pos, self.logits if head else None)
        self.cache.pos += Tn
        return logits


class _RowCache:
    """Rows ``b .. b+n-1`` of a :class:`KVCache` as a cache of n rows: per layer, a (n, n_head,
    max_len, head_dim) view of the keys and values (contiguous, sharing the cache's memory),
    which is what the trunk reads and writes."""

    def __init__(self, cache: KVCache, b: int, n: int = 1):
        self.k = [t.narrow(b, n) for t in cache.k]
        self.v = [t.narrow(b, n) for t in cache.v]
