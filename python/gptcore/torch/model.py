"""A GPT-2 ``nn.Module`` built from gptcore's PyTorch ops (nanoGPT's model, on gptcore kernels).

Parameters carry gptcore's names (``wte``, ``wpe``, ``h.0.ln_1.weight``,
``h.0.attn.c_attn.weight``, ... ``ln_f.bias``; linear weights (out, in)), so ``state_dict()``
is interchangeable with :meth:`gptcore.GPT.state_dict`, and :meth:`GPT.from_pretrained` reads
every checkpoint gptcore reads (gptcore and transformers GPT-2 directories, llm.c files).

The forward fuses what gptcore's own model fuses: each residual add with the LayerNorm that
follows it (and the residual dropout before it), GELU into the MLP's first GEMM, embedding dropout
into the embedding, attention dropout into attention, and the loss's gradient into the
cross-entropy.

Dropout (the config's ``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``; training mode only) uses
gptcore.GPT's generator streams: forward number ``k`` with dropout draws the masks gptcore.GPT's
k-th training forward draws for the same seed, so the two models train identically. The counter
is the buffer ``dropout_step`` (not in ``state_dict``; a tensor, so ``torch.compile`` does not
recompile as it advances).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import ops as F

__all__ = ["GPT"]

# gptcore.GPT's dropout sites and stream layout: stream = (step << 12) | (layer * 4 + site), the
# embedding being layer n_layer (gptcore/models/gpt.py)
_SITE_ATTN, _SITE_RESID_ATTN, _SITE_RESID_MLP = 0, 1, 2
_STREAM_LAYER_BITS = 12


def _check_config(config) -> None:
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if not hasattr(config, name):
            raise TypeError(f"config: expected a gptcore.GPTConfig, got {type(config).__name__} "
                            f"without {name!r}")
    if not getattr(config, "prenorm", True):
        raise ValueError("config: gptcore.torch.GPT is a pre-LayerNorm (GPT-2/GPT-3) model; "
                         "GPT-1's post-LN blocks (prenorm=False) are not built here")
    if not getattr(config, "bias", True):
        raise ValueError("config: bias=False models are not built by gptcore.torch.GPT")


class _Block(nn.Module):
    """One transformer block's parameters (the forward lives in GPT, which fuses each residual
    add with the next block's LayerNorm)."""

    def __init__(self, C: int, window):
        super().__init__()
        self.window = window
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)


class GPT(nn.Module):
    """GPT-2 (pre-LN, learned positions, tied LM head, tanh-GELU) on gptcore's custom ops.

    >>> model = GPT(GPTConfig.preset("tiny"))
    >>> logits, loss = model(idx, targets)     # idx, targets: (B, T) int64 tensors

    ``config`` is a :class:`gptcore.GPTConfig` (pre-LN with biases; GPT-3's banded layers via
    ``attn_window``); its dropout probabilities apply in training mode. ``seed`` seeds the
    initialisation (torch's generator; unseeded: torch's global one) and keys the dropout masks
    (0 when None), as ``gptcore.GPT(config, seed=...)``'s dropout. Parameters are float32 on the
    CPU, float32 or bfloat16 on CUDA (``model.to(...)``).
    """

    def __init__(self, config, seed: Optional[int] = None):
        super().__init__()
        _check_config(config)
        self.config = config
        self.dropout_seed = 0 if seed is None else int(seed)
        if not 0 <= self.dropout_seed < 2 ** 63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
        # forwards run with dropout so far: keys the next one's masks
        self.register_buffer("dropout_step", torch.zeros((), dtype=torch.int64), persistent=False)
        C, L = config.n_embd, config.n_layer
        self.wte = nn.Parameter(torch.empty(config.vocab_size, C))
        self.wpe = nn.Parameter(torch.empty(config.block_size, C))
        windows = getattr(config, "attn_window", None) or [None] * L
        self.h = nn.ModuleList(_Block(C, windows[i]) for i in range(L))
        self.ln_f = nn.LayerNorm(C)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: Optional[int] = None) -> None:
        """GPT-2's initialisation (gptcore.models.schema's: N(0, 0.02), projections into the
        residual stream N(0, 0.02 / sqrt(2 n_layer)), LayerNorms 1 and 0, biases 0), drawn from
        torch's generator (seeded with ``seed`` when given)."""
        from ..models import schema

        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        std = {"normal": 0.02, "resid": 0.02 / math.sqrt(2 * self.config.n_layer)}
        params = dict(self.named_parameters())
        with torch.no_grad():
            for p in schema.parameters(self.config):
                t = params[p.name]
                if p.init in std:
                    t.copy_(torch.randn(t.shape, generator=gen) * std[p.init])
                else:
                    t.fill_(1.0 if p.init == "ones" else 0.0)

    @classmethod
    def from_pretrained(cls, path) -> "GPT":
        """Load a gptcore or transformers GPT-2 directory, or an llm.c model file (through
        :func:`gptcore.io.read_weights`), in evaluation mode as transformers does."""
        from ..io.pretrained import read_weights

        config, state, _ = read_weights(path)
        model = cls(config)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        return model.eval()

    def save_pretrained(self, path, dtype: str = "float32") -> None:
        """Write the weights in transformers' GPT-2 layout (a directory that
        ``transformers.GPT2LMHeadModel.from_pretrained`` and :meth:`from_pretrained` read), or
        an llm.c model file when ``path`` ends in ``.bin`` (:func:`gptcore.io.write_weights`;
        written to a temporary name first, so a failed save leaves nothing half-written)."""
        from ..io.pretrained import write_weights

        state = {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}
        write_weights(path, self.config, state, dtype=dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _dropout(self):
        """p, seed, stream -> the keywords of one dropout site for this forward (a function),
        or None when this forward has no dropout."""
        c = self.config
        probs = {"embd": getattr(c, "embd_pdrop", 0.0), "attn": getattr(c, "attn_pdrop", 0.0),
                 "resid": getattr(c, "resid_pdrop", 0.0)}
        if not self.training or max(probs.values()) == 0:
            return lambda kind, layer, site: {}
        step = self.dropout_step.clone()
        self.dropout_step.add_(1)

        def kw(kind, layer, site):
            if probs[kind] == 0:
                return {}
            stream = step * (1 << _STREAM_LAYER_BITS) + (layer * 4 + site)
            return dict(dropout_p=probs[kind], seed=self.dropout_seed, stream=stream)
        return kw

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C) for token ids idx (B, T)."""
        if idx.dim() != 2:
            raise ValueError(f"idx: expected (B, T) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds block_size "
                             f"{self.config.block_size}")
        eps = getattr(self.config, "ln_eps", 1e-5)
        H, L = self.config.n_head, self.config.n_layer
        drop = self._dropout()
        x = F.embedding(idx, self.wte, self.wpe, **drop("embd", L, 0))
        h = F.layer_norm(x, self.h[0].ln_1.weight, self.h[0].ln_1.bias, eps)
        for i, block in enumerate(self.h):
            a = block.attn
            att = F.attention(F.linear(h, a.c_attn.weight, a.c_attn.bias), H, block.window,
                              **drop("attn", i, _SITE_ATTN))
            x, h = F.residual_layer_norm(F.linear(att, a.c_proj.weight, a.c_proj.bias), x,
                                         block.ln_2.weight, block.ln_2.bias, eps,
                                         **drop("resid", i, _SITE_RESID_ATTN))
            m = block.mlp
            y = F.linear(F.linear_gelu(h, m.c_fc.weight, m.c_fc.bias), m.c_proj.weight,
                         m.c_proj.bias)
            ln = self.h[i + 1].ln_1 if i + 1 < L else self.ln_f
            x, h = F.residual_layer_norm(y, x, ln.weight, ln.bias, eps,
                                         **drop("resid", i, _SITE_RESID_MLP))
        return h

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                ignore_index: int = -1):
        """nanoGPT's interface: returns ``(logits, loss)``, logits (B, T, V) and, when
        ``targets`` (B, T) are given, the mean cross-entropy over positions whose target is not
        ``ignore_index`` (else None)."""
        logits = F.linear(self.hidden_states(idx), self.wte)
        loss = None if targets is None else F.cross_entropy(logits, targets, ignore_index)
        return logits, loss
