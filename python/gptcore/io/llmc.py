"""llm.c's model files (a 256-int32 header, magic 20240326, version 3 = fp32 / 5 = bf16)."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .._fileio import atomic_file as _atomic_file
from ..data.shards import HEADER_BYTES as _LLMC_HEADER_BYTES
from ..data.shards import HEADER_INTS as _LLMC_HEADER_INTS
from ..data.shards import read_llmc_header
from ..models import schema
from ..models.config import GPTConfig
from .hf import _check_state
from .safetensors import (
    CheckpointError,
    PathLike,
    _map_file,
    _p,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
)

# ================================================================================================
# llm.c model .bin
#
#   header  256 x int32: [0] 20240326, [1] version (3: fp32, 5: bf16), [2] maxT, [3] V, [4] L,
#           [5] NH, [6] C, [7] Vp (V padded, llm.c pads to a multiple of 128)
#   params  in this order, each row-major, linear weights (out, in) like gptcore's:
#           wte (Vp, C), wpe (maxT, C), ln1w (L, C), ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
#           attprojw (L, C, C), attprojb (L, C), ln2w (L, C), ln2b (L, C), fcw (L, 4C, C),
#           fcb (L, 4C), fcprojw (L, C, 4C), fcprojb (L, C), lnfw (C), lnfb (C)
# ================================================================================================

LLMC_MODEL_MAGIC = 20240326
LLMC_TOKENIZER_MAGIC = 20240328
LLMC_SHARD_MAGIC = 20240520
_LLMC_VERSIONS = {3: "float32", 5: "bfloat16"}


def _read_header(path: str, what: str) -> Tuple[np.ndarray, int]:
    return read_llmc_header(path, what, error=CheckpointError)


def read_llmc_model(path: PathLike) -> Tuple[GPTConfig, Dict[str, np.ndarray], str]:
    """(config, gptcore-named arrays, 'float32'|'bfloat16') from an llm.c model .bin.

    fp32 files are memory-mapped (the arrays are views); bf16 ones are converted to float32.
    """
    path = _p(path)
    h, size = _read_header(path, "llm.c model file")
    if int(h[0]) != LLMC_MODEL_MAGIC:
        raise CheckpointError(f"{path!r} is not an llm.c model file: magic {int(h[0])}, expected "
                              f"{LLMC_MODEL_MAGIC}")
    version = int(h[1])
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    if version not in _LLMC_VERSIONS or Vp == 0:
        raise CheckpointError(f"{path!r}: llm.c model version {version}"
                              f"{' without a padded vocabulary size' if Vp == 0 else ''} is not supported "
                              "(gptcore reads version 3 = fp32 and 5 = bf16 with a padded vocabulary; "
                              "re-export it with llm.c's current train_gpt2.py)")
    for name, v in (("max_seq_len", maxT), ("vocab_size", V), ("num_layers", L), ("num_heads", NH),
                    ("channels", C), ("padded_vocab_size", Vp)):
        if v < 1:
            raise CheckpointError(f"{path!r}: damaged header, {name} = {v}")
    if Vp < V:
        raise CheckpointError(f"{path!r}: damaged header, padded_vocab_size {Vp} < vocab_size {V}")
    if C % NH:
        raise CheckpointError(f"{path!r}: damaged header, {NH} heads do not divide {C} channels")
    dtype = _LLMC_VERSIONS[version]
    item = 4 if dtype == "float32" else 2
    try:
        cfg = GPTConfig(n_layer=L, n_head=NH, n_embd=C, block_size=maxT, vocab_size=V)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r}: {e}") from None
    # the file's own padded vocabulary size decides the stored wte rows
    layout = [(g, (Vp, C) if g == "wte" else s, ps) for g, s, ps in schema.llmc_groups(cfg)]
    n_params = sum(math.prod(s) for _, s, _ in layout)
    expected = _LLMC_HEADER_BYTES + n_params * item
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"{path!r} is {what}: the header (L={L}, C={C}, maxT={maxT}, Vp={Vp}, "
                              f"{dtype}) needs {expected} bytes, the file has {size}")
    flat = _map_file(path, _LLMC_HEADER_BYTES, n_params * item, prefetch=True).view(
        "<f4" if item == 4 else "<u2")
    state: Dict[str, np.ndarray] = {}
    pos = 0
    for group, shape, params in layout:
        n = math.prod(shape)
        block = flat[pos:pos + n].reshape(shape)
        pos += n
        if item == 2:
            block = bf16_bits_to_float32(block)
        if group == "wte":
            state["wte"] = block[:V]
        elif params[0].layer is None:
            state[params[0].name] = block
        else:
            for p in params:
                state[p.name] = block[p.layer]
    return cfg, state, dtype


def _llmc_compatible(cfg: GPTConfig, where: str) -> None:
    why = None
    if not cfg.prenorm:
        why = "it holds pre-LN GPT-2 models only (this is a post-LN GPT-1)"
    elif any(w is not None for w in cfg.attn_window):
        why = "llm.c's attention is dense (this model has banded layers)"
    elif cfg.ln_eps != 1e-5:
        why = f"llm.c's LayerNorm epsilon is 1e-5 (this model's is {cfg.ln_eps})"
    if why:
        raise ValueError(f"{where}: cannot write this model in llm.c's format: {why}")


def _write_llmc(f, cfg: GPTConfig, state: Mapping[str, np.ndarray], dtype: str) -> None:
    version = {v: k for k, v in _LLMC_VERSIONS.items()}[dtype]
    L, C, V, Vp, maxT = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size, cfg.block_size
    header = np.zeros(_LLMC_HEADER_INTS, dtype="<i4")
    header[:8] = [LLMC_MODEL_MAGIC, version, maxT, V, L, cfg.n_head, C, Vp]
    f.write(header.tobytes())

    def put(arr):
        if dtype == "bfloat16":
            data = float32_to_bf16_bits(np.asarray(arr, dtype=np.float32))
        else:
            data = np.ascontiguousarray(arr, dtype="<f4")
        f.write(memoryview(data.reshape(-1)).cast("B"))

    for group, shape, params in schema.llmc_groups(cfg):
        if group == "wte":
            put(state["wte"])
            if Vp > V:
                put(np.zeros((Vp - V, C), np.float32))
            continue
        for p in params:  # a bias-free model's absent biases are written as zeros
            put(state[p.name] if p.name in state else np.zeros(p.shape, np.float32))


def write_llmc_model(path: PathLike, cfg: GPTConfig, state: Mapping[str, Any],
                     dtype: str = "float32") -> None:
    """Write gptcore-named arrays as an llm.c model .bin (version 3 fp32 or 5 bf16), atomically."""
    dt = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype: llm.c model files are 'float32' or 'bfloat16', got {dtype!r}")
    _llmc_compatible(cfg, _p(path))
    _check_state(cfg, state, "state")
    extra = sorted(set(state) - set(schema.expected_shapes(cfg)))
    if extra:  # rather than dropping them without a word
        raise ValueError(f"{_p(path)}: llm.c's model file holds no task heads; {extra} would be lost "
                         "(save with save_pretrained, or drop the heads from the state)")
    with _atomic_file(path) as f:
        _write_llmc(f, cfg, state, dt)


# ================================================================================================
