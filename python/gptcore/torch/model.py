"""A GPT-2 ``nn.Module`` built from gptcore's PyTorch ops (nanoGPT's model, on gptcore kernels).

Parameters carry gptcore's names (``wte``, ``wpe``, ``h.0.ln_1.weight``,
``h.0.attn.c_attn.weight``, ... ``ln_f.bias``; linear weights (out, in)), so ``state_dict()``
is interchangeable with :meth:`gptcore.GPT.state_dict`, and :meth:`GPT.from_pretrained` reads
every checkpoint gptcore reads (gptcore and transformers GPT-2 directories, llm.c files).

The forward fuses what gptcore's own model fuses: each residual add with the LayerNorm that
follows it, GELU into the MLP's first GEMM, and the loss's gradient into the cross-entropy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops as F

__all__ = ["GPT"]


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
    ``attn_window``). The model has **no dropout**: a config asking for dropout is refused in
    training mode (use one with zero ``*_pdrop``, or ``eval()``). Parameters are float32 on the
    CPU, float32 or bfloat16 on CUDA (``model.to(...)``).
    """

    def __init__(self, config, seed: int = None):
        super().__init__()
        _check_config(config)
        self.config = config
        C, L = config.n_embd, config.n_layer
        self.wte = nn.Parameter(torch.empty(config.vocab_size, C))
        self.wpe = nn.Parameter(torch.empty(config.block_size, C))
        windows = getattr(config, "attn_window", None) or [None] * L
        self.h = nn.ModuleList(_Block(C, windows[i]) for i in range(L))
        self.ln_f = nn.LayerNorm(C)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int = None) -> None:
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_dropout(self) -> None:
        c = self.config
        if self.training and max(getattr(c, "embd_pdrop", 0.0), getattr(c, "attn_pdrop", 0.0),
                                 getattr(c, "resid_pdrop", 0.0)) > 0:
            raise ValueError("gptcore.torch.GPT has no dropout, but its config asks for some: "
                             "set embd_pdrop, attn_pdrop and resid_pdrop to 0, or call eval()")

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C) for token ids idx (B, T)."""
        self._check_dropout()
        if idx.dim() != 2:
            raise ValueError(f"idx: expected (B, T) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds block_size "
                             f"{self.config.block_size}")
        eps = getattr(self.config, "ln_eps", 1e-5)
        H = self.config.n_head
        x = F.embedding(idx, self.wte, self.wpe)
        ln = self.h[0].ln_1 if len(self.h) else self.ln_f
        h = F.layer_norm(x, ln.weight, ln.bias, eps)
        for i, block in enumerate(self.h):
            a = block.attn
            att = F.attention(F.linear(h, a.c_attn.weight, a.c_attn.bias), H, block.window)
            x, h = F.residual_layer_norm(F.linear(att, a.c_proj.weight, a.c_proj.bias), x,
                                         block.ln_2.weight, block.ln_2.bias, eps)
            m = block.mlp
            y = F.linear(F.linear_gelu(h, m.c_fc.weight, m.c_fc.bias), m.c_proj.weight,
                         m.c_proj.bias)
            ln = self.h[i + 1].ln_1 if i + 1 < len(self.h) else self.ln_f
            x, h = F.residual_layer_norm(y, x, ln.weight, ln.bias, eps)
        return h

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None, ignore_index: int = -1):
        """nanoGPT's interface: returns ``(logits, loss)``, logits (B, T, V) and, when
        ``targets`` (B, T) are given, the mean cross-entropy over positions whose target is not
        ``ignore_index`` (else None)."""
        logits = F.linear(self.hidden_states(idx), self.wte)
        loss = None if targets is None else F.cross_entropy(logits, targets, ignore_index)
        return logits, loss
