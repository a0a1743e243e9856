"""GPTConfig: the shape of a GPT model, and the named presets (GPT-1, GPT-2, GPT-3, demos).

A config is pure data: building one never allocates a model, so the parameter count of
GPT-3 175B can be read from ``GPTConfig.preset("gpt3-175b").num_parameters()``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .._fileio import parse_json
from .schema import count_parameters

__all__ = ["GPTConfig", "PRESETS", "GPT3_BAND_WIDTH"]

# GPT-3 (Brown et al. 2020, section 2.1) alternates dense and "locally banded sparse attention"
# layers without giving the band width. We use a band of 256 positions (a query sees itself and
# the 255 keys before it) on the odd layers; the even layers, layer 0 included, are dense.
GPT3_BAND_WIDTH = 256

# Vocabulary rows are padded to a multiple of this for the kernels; padding never reaches users.
VOCAB_PAD = 128


@dataclass
class GPTConfig:
    """Hyper-parameters of a decoder-only transformer.

    n_layer, n_head, n_embd: depth, heads per layer and model width (n_embd % n_head == 0).
    block_size: the number of learned positions (the longest sequence the model takes).
    vocab_size: real vocabulary entries; the embedding is padded to ``padded_vocab_size``.
    prenorm: True for GPT-2/3 (LayerNorm before each sub-block, plus a final LayerNorm);
        False for GPT-1 (LayerNorm after each residual add, no final LayerNorm).
    attn_window: one entry per layer, None for dense causal attention or w for a local band
        (query t sees keys t-w < s <= t). ``None`` as a whole means all layers dense.
    bias: whether linear layers and LayerNorms have biases.
    ln_eps: LayerNorm epsilon.
    embd_pdrop, attn_pdrop, resid_pdrop: dropout probabilities (transformers' names) on the
        embedding output, the attention probabilities, and each sub-block's output before its
        residual add. Applied only in training mode (``GPT.train()``). GPT-1 and GPT-2 trained
        with 0.1 everywhere; the default here is 0 (pre-training from scratch as nanoGPT and
        llm.c do); checkpoints from transformers bring their own values.
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    prenorm: bool = True
    attn_window: Optional[List[Optional[int]]] = None
    bias: bool = True
    ln_eps: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: {self.n_head} does not divide n_embd = {self.n_embd}")
        if self.vocab_size > 65536 * 64:
            raise ValueError(f"vocab_size: {self.vocab_size} is implausibly large")
        if self.attn_window is None:
            self.attn_window = [None] * self.n_layer
        else:
            windows = list(self.attn_window)
            if len(windows) != self.n_layer:
                raise ValueError(f"attn_window: expected {self.n_layer} entries (one per layer), "
                                 f"got {len(windows)}")
            for i, w in enumerate(windows):
                if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                    raise ValueError(f"attn_window[{i}]: expected None (dense) or an int >= 1, got {w!r}")
            self.attn_window = windows
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps >= 0):
            raise ValueError(f"ln_eps: expected a number >= 0, got {self.ln_eps!r}")
        self.ln_eps = float(self.ln_eps)
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name}: expected a dropout probability in [0, 1), got {p!r}")
            setattr(self, name, float(p))
        self.prenorm = bool(self.prenorm)
        self.bias = bool(self.bias)

    # ---- derived sizes ------------------------------------------------------------------

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of 128 (the embedding's real row count)."""
        return (self.vocab_size + VOCAB_PAD - 1) // VOCAB_PAD * VOCAB_PAD

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self, padded: bool = False, non_embedding: bool = False) -> int:
        """Number of parameters, computed from the shapes (nothing is allocated).

        The LM head is tied to the token embedding and not counted twice. ``padded`` counts the
        embedding's padding rows too; ``non_embedding`` leaves out both embeddings (the count
        that scaling-law papers use).
        """
        return count_parameters(self, padded=padded, non_embedding=non_embedding)

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward, matmuls only): 6 N + 12 L T C style.

        N counts the matmul weights including the LM head (padded vocab, as the kernels run
        it); the attention term uses the average number of keys a query sees.
        """
        T = self.block_size if seq_len is None else int(seq_len)
        C, L = self.n_embd, self.n_layer
        matmul = L * 12 * C * C + self.padded_vocab_size * C
        keys = 0.0
        for w in self.attn_window:
            n = T if w is None else min(w, T)
            keys += (n * (n + 1) / 2 + max(T - n, 0) * n) / T  # mean keys per query
        return int(6 * matmul + 12 * C * keys)  # QK^T and PV: 2 matmuls x 2 flops x 3 (fwd+bwd)

    # ---- (de)serialisation --------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GPTConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "GPTConfig":
        return cls.from_dict(parse_json(text, "config"))

    def replace(self, **changes) -> "GPTConfig":
        """A copy with some fields changed (attn_window is re-derived if n_layer changes)."""
        d = self.to_dict()
        if "n_layer" in changes and "attn_window" not in changes:
            old = d["attn_window"]
            if all(w is None for w in old):
                d["attn_window"] = None
            else:  # keep the alternation pattern
                d["attn_window"] = [old[i % len(old)] for i in range(changes["n_layer"])]
        d.update(changes)
        return GPTConfig(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration; ``overrides`` replace fields (e.g. ``vocab_size=257``).

        Names: see ``GPTConfig.presets()``.
        """
        if not isinstance(name, str):
            raise TypeError(f"name: expected a preset name (str), got {type(name).__name__}")
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        d = dict(PRESETS[key]["config"])
        if "attn_window" in d and d["attn_window"] is not None:
            d["attn_window"] = list(d["attn_window"])
        cfg = cls(**d)
        return cfg.replace(**overrides) if overrides else cfg

    @staticmethod
    def presets() -> Dict[str, str]:
        """Preset names and one-line descriptions."""
        return {k: v["about"] for k, v in PRESETS.items()}


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> Dict[str, Any]:
    windows = [None if i % 2 == 0 else GPT3_BAND_WIDTH for i in range(n_layer)]
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=2048, vocab_size=50257,
                attn_window=windows)


# name -> config fields and a description. Paper sizes: GPT-1 (Radford et al. 2018), GPT-2
# (Radford et al. 2019, sizes as released), GPT-3 (Brown et al. 2020, Table 2.1).
PRESETS: Dict[str, Dict[str, Any]] = {
    "gpt1": dict(about="GPT-1 117M: 12 layers, 768 wide, 12 heads, 512 positions, post-LN",
                 config=dict(n_layer=12, n_head=12, n_embd=768, block_size=512,
                             vocab_size=40478, prenorm=False)),
    "gpt2": dict(about="GPT-2 124M: 12 layers, 768 wide, 12 heads, 1024 positions",
                 config=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)),
    "gpt2-medium": dict(about="GPT-2 350M: 24 layers, 1024 wide, 16 heads",
                        config=dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024,
                                    vocab_size=50257)),
    "gpt2-large": dict(about="GPT-2 774M: 36 layers, 1280 wide, 20 heads",
                       config=dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024,
                                   vocab_size=50257)),
    "gpt2-xl": dict(about="GPT-2 1.5B: 48 layers, 1600 wide, 25 heads",
                    config=dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024,
                                vocab_size=50257)),
    "gpt3-small": dict(about="GPT-3 Small 125M: 12 layers, 768 wide, 12 heads, 2048 positions",
                       config=_gpt3(12, 768, 12)),
    "gpt3-medium": dict(about="GPT-3 Medium 350M: 24 layers, 1024 wide, 16 heads",
                        config=_gpt3(24, 1024, 16)),
    "gpt3-large": dict(about="GPT-3 Large 760M: 24 layers, 1536 wide, 16 heads",
                       config=_gpt3(24, 1536, 16)),
    # The table lists 24 heads of 128 for a 2048-wide model (24 x 128 = 3072); we keep the width
    # and the head size, which gives 16 heads. The head count does not change the parameters.
    "gpt3-xl": dict(about="GPT-3 XL 1.3B: 24 layers, 2048 wide, 16 heads of 128",
                    config=_gpt3(24, 2048, 16)),
    "gpt3-2.7b": dict(about="GPT-3 2.7B: 32 layers, 2560 wide, 32 heads",
                      config=_gpt3(32, 2560, 32)),
    "gpt3-6.7b": dict(about="GPT-3 6.7B: 32 layers, 4096 wide, 32 heads",
                      config=_gpt3(32, 4096, 32)),
    # The paper's table gives d_model 5140 with 40 heads of 128; 40 x 128 = 5120 is the width
    # that the head count and head size imply (5140 is not divisible by 40).
    "gpt3-13b": dict(about="GPT-3 13B: 40 layers, 5120 wide, 40 heads",
                     config=_gpt3(40, 5120, 40)),
    "gpt3-175b": dict(about="GPT-3 175B: 96 layers, 12288 wide, 96 heads",
                      config=_gpt3(96, 12288, 96)),
    # Small models for CPU demos and tests; their vocab_size is replaced by the data's.
    "tiny": dict(about="demo: 2 layers, 64 wide, 4 heads, 128 positions (~0.1M + embeddings)",
                 config=dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=257)),
    "mini": dict(about="demo (default of `gptcore train`): 4 layers, 128 wide, 4 heads, 128 positions",
                 config=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=257)),
    "small": dict(about="demo: 6 layers, 256 wide, 8 heads, 256 positions (~4.7M)",
                  config=dict(n_layer=6, n_head=8, n_embd=256, block_size=256, vocab_size=257)),
}

# Presets whose vocabulary follows the training data instead of a paper.
DEMO_PRESETS = ("tiny", "mini", "small")
