"""KV-cache decoding (to be folded into the trunk)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .. import ops
from ..tensor import Tensor, empty, tensor, zeros

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


