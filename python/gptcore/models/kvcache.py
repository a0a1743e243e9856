"""Cached decoding: a KV cache per batch, and the decoder that feeds new positions through the
model's trunk (:meth:`gptcore.models.gpt.GPT._trunk_forward`, the same block code that training
runs) and its tied LM head.

    >>> dec = Decoder(model, batch_size=1, max_len=64)
    >>> logits = dec.forward(prompt_ids[None, :])     # prefill
    >>> logits = dec.forward([[next_id]])              # one step
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .. import ops
from ..tensor import Tensor, empty

__all__ = ["KVCache", "Decoder"]


class KVCache:
    """Every layer's keys and values for ``batch_size`` rows and up to ``max_len`` positions:
    ``k[i]``, ``v[i]`` (B, n_head, max_len, head_dim) in the model's dtype on its device,
    allocated once. ``pos`` counts the positions written so far (all rows share it)."""

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

    @property
    def pos(self) -> int:
        return self.cache.pos

    @pos.setter
    def pos(self, value: int) -> None:
        self.cache.pos = int(value)

    def reset(self) -> None:
        """Start over at position 0 (the caches are reused)."""
        self.cache.pos = 0

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
        B, Tn = idx.shape
        if head and Tn != 1:
            raise ValueError(f"idx: the LM head runs on one position; got {Tn} (use prefill(), "
                             f"or head=False)")
        pos = self.cache.pos if pos_tensor is None else pos_tensor
        h = self.model._trunk_forward(idx, self._buffers(Tn), cache=self.cache, pos=pos,
                                      final_ln=head)
        self.cache.pos += Tn
        if not head:
            return None
        last = h.view([B, self.config.n_embd])
        return ops.linear_forward(last, self.model.parameters()["wte"], None, out=self.logits)[0]
