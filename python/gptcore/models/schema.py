"""The parameter list of a GPT, written once.

Every place that needs to know what parameters a model has reads it from here: the model's
initialisation (:mod:`gptcore.models.gpt`), the transformers reader and writer
(:mod:`gptcore.io.hf`), llm.c's file layout (:mod:`gptcore.io.llmc`) and the parameter counts
(:meth:`GPTConfig.num_parameters`).

A parameter is described by a :class:`Param`: its gptcore name (GPT-2's, e.g.
``h.3.attn.c_attn.weight``), its shape as users see it (the token embedding ``wte`` unpadded,
(vocab_size, C); linear weights (out_features, in_features)), its initialisation, its
transformers key and whether transformers stores it transposed (GPT-2's Conv1D keeps (in, out)),
and where llm.c's model file keeps it (a tensor group and, for per-layer parameters, the layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["Param", "parameters", "expected_shapes", "llmc_groups", "count_parameters",
           "INITS"]

# 'normal': N(0, 0.02); 'resid': N(0, 0.02 / sqrt(2 n_layer)) for the projections that write
# into the residual stream (GPT-2's scaling); 'ones' / 'zeros' for LayerNorms and biases.
INITS = ("normal", "resid", "ones", "zeros")


@dataclass(frozen=True)
class Param:
    name: str                   # gptcore name
    shape: Tuple[int, ...]      # the user-visible shape (wte: (vocab_size, C))
    init: str                   # one of INITS
    hf_key: str                 # transformers key, with the "transformer." prefix
    hf_transposed: bool         # transformers stores it (in, out) (GPT-2's Conv1D)
    llmc_group: str             # llm.c's tensor group (wte, wpe, ln1w, qkvw, ... lnfb)
    layer: Optional[int] = None  # the block, for per-layer parameters

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_bias(self) -> bool:
        return self.name.endswith(".bias")


# One block's parameters in llm.c's file order: (suffix, shape(C), init, llm.c group, Conv1D).
# Biases are listed too; models without biases skip them (llm.c's file then holds zeros).
def _block(C: int):
    return (
        ("ln_1.weight", (C,), "ones", "ln1w", False),
        ("ln_1.bias", (C,), "zeros", "ln1b", False),
        ("attn.c_attn.weight", (3 * C, C), "normal", "qkvw", True),
        ("attn.c_attn.bias", (3 * C,), "zeros", "qkvb", False),
        ("attn.c_proj.weight", (C, C), "resid", "attprojw", True),
        ("attn.c_proj.bias", (C,), "zeros", "attprojb", False),
        ("ln_2.weight", (C,), "ones", "ln2w", False),
        ("ln_2.bias", (C,), "zeros", "ln2b", False),
        ("mlp.c_fc.weight", (4 * C, C), "normal", "fcw", True),
        ("mlp.c_fc.bias", (4 * C,), "zeros", "fcb", False),
        ("mlp.c_proj.weight", (C, 4 * C), "resid", "fcprojw", True),
        ("mlp.c_proj.bias", (C,), "zeros", "fcprojb", False),
    )


def parameters(cfg, with_absent_biases: bool = False) -> List[Param]:
    """The model's parameters in model order (embeddings, block 0, block 1, ..., ln_f).

    ``with_absent_biases`` also lists the biases a bias-free model (``cfg.bias=False``) lacks:
    formats that always hold them (transformers', llm.c's) store zeros there."""
    C = cfg.n_embd
    # GPT-1's transformers model (OpenAIGPTModel) names its embeddings differently
    wte_key, wpe_key = (("wte", "wpe") if cfg.prenorm else ("tokens_embed", "positions_embed"))
    out = [Param("wte", (cfg.vocab_size, C), "normal", f"transformer.{wte_key}.weight", False, "wte"),
           Param("wpe", (cfg.block_size, C), "normal", f"transformer.{wpe_key}.weight", False, "wpe")]
    for i in range(cfg.n_layer):
        for suffix, shape, init, group, conv1d in _block(C):
            if suffix.endswith(".bias") and not (cfg.bias or with_absent_biases):
                continue
            name = f"h.{i}.{suffix}"
            out.append(Param(name, shape, init, "transformer." + name, conv1d, group, i))
    if cfg.prenorm:  # GPT-1 has no final LayerNorm
        out.append(Param("ln_f.weight", (C,), "ones", "transformer.ln_f.weight", False, "lnfw"))
        if cfg.bias or with_absent_biases:
            out.append(Param("ln_f.bias", (C,), "zeros", "transformer.ln_f.bias", False, "lnfb"))
    return out


def expected_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """gptcore name -> user-visible shape, in model order."""
    return {p.name: p.shape for p in parameters(cfg)}


def llmc_groups(cfg) -> List[Tuple[str, Tuple[int, ...], List[Param]]]:
    """llm.c's model-file layout: (group, stored shape, the parameters stacked in it) in file
    order. Stored shapes use the padded vocabulary for wte and stack per-layer tensors (L, ...).
    Biases a bias-free model lacks are still listed (the file holds zeros for them)."""
    groups: Dict[str, List[Param]] = {}
    for p in parameters(cfg, with_absent_biases=True):
        groups.setdefault(p.llmc_group, []).append(p)
    out = []
    for group, params in groups.items():
        if group == "wte":
            shape: Tuple[int, ...] = (cfg.padded_vocab_size, cfg.n_embd)
        elif params[0].layer is None:
            shape = params[0].shape
        else:
            shape = (cfg.n_layer, *params[0].shape)
        out.append((group, shape, params))
    # llm.c's order: embeddings, per-layer groups in block order, then the final LayerNorm
    return out


def count_parameters(cfg, padded: bool = False, non_embedding: bool = False) -> int:
    """The parameter count from the list (the tied LM head counted once)."""
    one_layer = cfg.replace(n_layer=1, attn_window=None)  # every block has the same parameters
    total = 0
    for p in parameters(one_layer):
        n = p.numel * (cfg.n_layer if p.layer is not None else 1)
        if p.name in ("wte", "wpe"):
            if non_embedding:
                continue
            if p.name == "wte" and padded:
                n = cfg.padded_vocab_size * cfg.n_embd
        total += n
    return total
