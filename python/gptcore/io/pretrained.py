"""Checkpoints that travel: Hugging Face GPT-2 / GPT-1 directories, safetensors, and llm.c's files.

gptcore's own checkpoint *is* a Hugging Face GPT-2 directory, so ``transformers`` opens it as it is:

    config.json              GPT2Config fields (or OpenAIGPTConfig for a post-LN GPT-1) plus a
                             "gptcore" section (attention windows, biases) that transformers ignores
    model.safetensors        transformers' key names and layouts: Conv1D weights stored (in, out),
                             the embedding unpadded (vocab_size rows), the tied lm_head left out
    optimizer.safetensors    AdamW moments (and fp32 master weights), gptcore names and shapes
    trainer_state.json       step, optimizer hyper-parameters, whatever the trainer wants to keep
    vocab.json, merges.txt   the tokenizer, when one is given

The other formats are llm.c's (https://github.com/karpathy/llm.c): a model ``.bin`` (256 int32
header, magic 20240326, version 3 = fp32 / 5 = bf16, vocabulary padded), token shards (magic
20240520, see :mod:`gptcore.data`) and a tokenizer ``.bin`` (magic 20240328). :func:`convert`
moves a model, a vocabulary or a shard between any of them.

Reading never copies what it does not have to: safetensors and llm.c files are memory-mapped and
each tensor is copied once, straight into the model's parameter memory (transposing Conv1D
weights on the way). Every file is validated before use (sizes, offsets, shapes, magic numbers,
versions): a foreign or truncated file gets a ValueError naming the file and what is wrong, a
missing tensor or a wrong shape one naming the key, the expected and the found shape. Nothing is
built until everything has been checked, so a failed load never leaves a half-initialised model.
Writing goes to a temporary name next to the target, is fsync'ed, then renamed into place: a
failed save never leaves a half-written checkpoint behind.
"""


from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

# ================================================================================================
# Atomic writing
# ================================================================================================
from .._fileio import atomic_file as _atomic_file  # noqa: E402
from .._fileio import fsync_path as _fsync_path
from .._fileio import remove_stale_temps
from .._fileio import temp_name as _temp_name
from ..models import schema
from ..models.config import GPTConfig
from .hf import _check_state, _read_hf_dir, _read_json, _task_in, _write_hf_dir
from .llmc import (
    LLMC_MODEL_MAGIC,
    LLMC_SHARD_MAGIC,
    LLMC_TOKENIZER_MAGIC,
    read_llmc_model,
    write_llmc_model,
)
from .safetensors import (
    _ST_MAX_HEADER,
    CheckpointError,
    PathLike,
    SafetensorsFile,
    _float_format,
    _p,
    _parallel_copy,
    _write_safetensors,
)
from .vocab import (
    LlmcTokenizer,
    _mirror_vocab_files,
    read_gpt2_vocab,
    read_llmc_tokenizer,
    write_gpt2_vocab,
    write_llmc_tokenizer,
)

# Files a checkpoint directory may hold; anything else found in a directory being replaced is
# carried over to the new one (a README, a model card...), these are not (they would be stale).
_CHECKPOINT_FILES = {
    "config.json", "model.safetensors", "model.safetensors.index.json", "optimizer.safetensors",
    "trainer_state.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "pytorch_model.bin", "encoder.json",
    "vocab.bpe", "special_tokens.json",
    "model.npz", "optim.npz", "state.json",  # gptcore train's first format, replaced on save
}


@contextlib.contextmanager
def _atomic_directory(path: PathLike) -> Iterator[str]:
    """Yield an empty temporary directory next to ``path``; on success fsync everything in it and
    swap it in for ``path``. An existing checkpoint at ``path`` is replaced only once the new one
    is complete; on any error it is left as it was and the temporary directory is removed.

    ``path`` may be missing, an empty directory or a checkpoint directory (one holding a
    config.json); anything else is refused rather than deleted.
    """
    path = os.path.abspath(_p(path))
    parent = os.path.dirname(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{path!r} exists and is not a directory; refusing to replace it")
        entries = os.listdir(path)
        if entries and "config.json" not in entries:
            raise FileExistsError(f"{path!r} is a non-empty directory without a config.json (not a "
                                  "checkpoint); refusing to replace it")
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(path)  # what a save of this path killed mid-way left behind
    tmp = _temp_name(path, "tmp")
    os.mkdir(tmp, 0o777)
    old = None
    try:
        yield tmp
        written = set(os.listdir(tmp))
        for name in written:
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                _fsync_path(full)
        _fsync_path(tmp, directory=True)
        if os.path.lexists(path):
            old = _temp_name(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(old, path)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(parent, directory=True)
    # A crash from here on leaves the previous checkpoint as .NAME.old-XXXX; nothing is lost.
    if old is not None:
        for name in os.listdir(old):
            if name not in written and name not in _CHECKPOINT_FILES:
                os.rename(os.path.join(old, name), os.path.join(path, name))
    for stale in _old_copies(path):  # this one, and any an earlier crash left behind
        shutil.rmtree(stale, ignore_errors=True)


def _old_copies(path: str) -> List[str]:
    """Previous checkpoints moved aside (.NAME.old-XXXX) next to ``path``, newest last."""
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    olds = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f".{base}.old-")]
    return sorted(olds, key=os.path.getmtime)


def _resolve_checkpoint_dir(path: str) -> str:
    """``path``, or the previous checkpoint left as .NAME.old-XXXX by a crash mid-swap."""
    if os.path.exists(path):
        return path
    olds = _old_copies(path)
    if olds:
        return olds[-1]
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")


# ================================================================================================
# The neutral form every format converts through: a GPTConfig and gptcore-named arrays
# (wte unpadded (vocab_size, C), linear weights (out, in)); arrays may be views into a mapping.
# ================================================================================================


def _model_state(model) -> Dict[str, np.ndarray]:
    """gptcore-named float arrays of a GPT, wte unpadded; CPU float32 parameters are not copied."""
    V = model.config.vocab_size
    out = {}
    for name, p in model.parameters().items():
        arr = np.asarray(p.numpy())
        if name == "wte":
            arr = arr[:V]
        out[name] = arr
    return out


def _gpt_class():
    from ..models.gpt import GPT
    return GPT


def _host_view(p) -> Optional[np.ndarray]:
    """A writable NumPy view of a CPU float32 parameter's own memory, or None."""
    if p.device != "cpu" or p.dtype != "float32":
        return None
    view = p.numpy()
    if isinstance(view, np.ndarray) and view.flags.writeable and view.ctypes.data == p.data_ptr():
        return view
    return None


def _build_model(cfg: GPTConfig, state: Mapping[str, np.ndarray], device: str, dtype: str):
    """A GPT holding ``state`` (already validated against ``cfg``).

    CPU float32 parameters receive each tensor with one copy, straight from the file's mapping;
    other devices and dtypes go through one float32 host buffer per tensor.
    """
    GPT = _gpt_class()
    kwargs = {}
    try:  # skip the random initialisation when the model offers that (it would be overwritten)
        if "init" in inspect.signature(GPT.__init__).parameters:
            kwargs["init"] = False
    except (TypeError, ValueError):
        pass
    model = GPT(cfg, device=device, dtype=dtype, **kwargs)
    trunk = schema.expected_shapes(cfg)
    for name in sorted({k.split(".", 1)[0] for k in state if k not in trunk}):  # declared heads
        from ..models.heads import LinearHead

        w = state[f"{name}.weight"]
        model.add_head(LinearHead(cfg.n_embd, int(w.shape[0]), name, bias=f"{name}.bias" in state,
                                  device=device, dtype=dtype))
    _copy_weights(model, state)
    return model.eval()  # as transformers' from_pretrained: train() turns dropout on


def _copy_weights(model, state: Mapping[str, np.ndarray]) -> None:
    """Copy validated gptcore-named arrays into ``model``'s parameters (those ``state`` has)."""
    from ..tensor import from_numpy
    V = model.config.vocab_size
    direct, staged = [], []
    for name, p in model.parameters().items():
        if name not in state:  # a head the file does not hold
            continue
        dst = _host_view(p)
        if dst is None:
            staged.append((name, p))
            continue
        if name == "wte":
            dst[V:] = 0.0  # padding rows
            dst = dst[:V]
        direct.append((dst, state[name]))
    _parallel_copy(direct)
    for name, p in staged:
        host = np.zeros(tuple(p.shape), np.float32)
        _parallel_copy([(host[:V] if name == "wte" else host, state[name])])
        p.copy_(from_numpy(host, name).to(device=p.device, dtype=p.dtype))


# ================================================================================================
# Reading and writing model weights in any format
# ================================================================================================


def _peek(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def detect_format(path: PathLike) -> str:
    """What ``path`` holds: 'hf-gpt2', 'hf-openai-gpt', 'llmc-model', 'llmc-tokenizer',
    'llmc-shard', 'gpt2-vocab' (vocab.json/merges.txt or tokenizer.json), 'safetensors', 'npy'.

    Raises FileNotFoundError, or CheckpointError for a file gptcore does not recognise.
    """
    path = _p(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            d = _read_json(cfg)
            mtype = d.get("model_type") if isinstance(d, dict) else None
            if mtype == "gpt2":
                return "hf-gpt2"
            if mtype == "openai-gpt":
                return "hf-openai-gpt"
            raise CheckpointError(f"{cfg!r}: model_type {mtype!r} is not supported (gptcore reads "
                                  "'gpt2' and 'openai-gpt')")
        if any(os.path.isfile(os.path.join(path, n))
               for n in ("vocab.json", "encoder.json", "tokenizer.json")):
            return "gpt2-vocab"
        raise CheckpointError(f"{path!r}: a directory with neither a config.json nor a vocabulary")
    head = _peek(path, 16)
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little", signed=True)
        if magic == LLMC_MODEL_MAGIC:
            return "llmc-model"
        if magic == LLMC_TOKENIZER_MAGIC:
            return "llmc-tokenizer"
        if magic == LLMC_SHARD_MAGIC:
            return "llmc-shard"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= _ST_MAX_HEADER:
        return "safetensors"
    if path.endswith(".json") and head.lstrip()[:1] == b"{":
        return "gpt2-vocab"
    raise CheckpointError(f"{path!r}: unrecognised file (not a checkpoint directory, safetensors, an llm.c "
                          "model/tokenizer/shard or a .npy array)")


def read_weights(path: PathLike) -> Tuple[GPTConfig, Dict[str, np.ndarray], str]:
    """(config, gptcore-named arrays, stored dtype) from any model format, fully validated.

    ``path`` is a transformers/gptcore directory (GPT-2 or GPT-1), its model.safetensors, or an
    llm.c model .bin. Arrays are read-only views into memory-mapped files where possible
    (wte unpadded, linear weights (out, in)); nothing is copied until they are used.
    """
    path = _p(path)
    if not os.path.exists(path):
        path = _resolve_checkpoint_dir(path)
    fmt = detect_format(path)
    if fmt in ("hf-gpt2", "hf-openai-gpt"):
        return _read_hf_dir(path)
    if fmt == "safetensors":
        d = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) == "model.safetensors" and os.path.isfile(os.path.join(d, "config.json")):
            return _read_hf_dir(d)
        raise CheckpointError(f"{path!r}: a bare safetensors file has no model configuration; pass the "
                              "directory holding it and its config.json")
    if fmt == "llmc-model":
        return read_llmc_model(path)
    raise CheckpointError(f"{path!r} holds {fmt}, not model weights")


def write_weights(path: PathLike, cfg: GPTConfig, state: Mapping[str, Any], dtype: str = "float32",
                  tokenizer=None, task_config: Optional[Mapping[str, Any]] = None) -> None:
    """Write gptcore-named arrays in the format ``path`` names: ``*.bin`` -> llm.c model file,
    anything else -> a transformers directory (GPT-2, or GPT-1 for a post-LN config; with a
    ``task_config`` as :func:`save_pretrained` keeps it)."""
    path = _p(path)
    _check_state(cfg, state, "state")
    task_config = _check_task_config(task_config)
    if path.endswith(".bin"):
        if task_config:
            raise ValueError("task_config: an llm.c model file has no place for it")
        write_llmc_model(path, cfg, state, dtype)
        return
    fmt = _float_format(dtype)
    if fmt not in ("F32", "BF16", "F16"):
        raise ValueError(f"dtype: expected 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    eot = _eot_of(tokenizer, cfg)
    _check_tokenizer(tokenizer)
    with _atomic_directory(path) as tmp:
        _write_hf_dir(tmp, cfg, state, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[fmt], eot,
                      task_config)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)


def _eot_of(tokenizer, cfg: GPTConfig) -> Optional[int]:
    eot = getattr(tokenizer, "eot_token", None) if tokenizer is not None else None
    if eot is None and cfg.vocab_size == 50257:
        eot = 50256  # GPT-2's <|endoftext|>
    return None if eot is None else int(eot)


def _check_tokenizer(tokenizer) -> None:
    """Refuse, before anything is written, a tokenizer whose files cannot be produced."""
    if tokenizer is None or isinstance(tokenizer, LlmcTokenizer):
        return
    if any(callable(getattr(tokenizer, m, None)) for m in ("save_pretrained", "save", "token_bytes",
                                                           "decode_bytes")):
        return
    raise TypeError(f"tokenizer: {type(tokenizer).__name__} has none of save(), save_pretrained(), "
                    "token_bytes() or decode_bytes(); gptcore cannot write its files")


def _save_tokenizer(tokenizer, directory: str) -> None:
    """Write a tokenizer's files into ``directory``: gptcore.Tokenizer.save (or a transformers
    tokenizer's save_pretrained) when it has one, else GPT-2's files from its per-id bytes."""
    fn = getattr(tokenizer, "save_pretrained", None) or getattr(tokenizer, "save", None)
    if callable(fn):
        fn(directory)
    else:
        write_gpt2_vocab(directory, tokenizer)
    _mirror_vocab_files(directory)


def load_tokenizer(path: PathLike):
    """The gptcore.Tokenizer saved in a checkpoint directory, or None when it holds none."""
    from ..tokenizer import Tokenizer
    path = _resolve_checkpoint_dir(_p(path))
    if not any(os.path.isfile(os.path.join(path, n))
               for n in ("encoder.json", "vocab.json", "tokenizer.json")):
        return None
    return Tokenizer.load(path)


# ================================================================================================
# The model-level API: save_pretrained / load_pretrained / training state
# ================================================================================================

TRAINER_STATE_FORMAT = "gptcore-trainer-1"


def _json_default(x):
    """NumPy scalars and arrays in trainer state -> plain JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def save_pretrained(model, path: PathLike, optimizer=None, tokenizer=None, step: Optional[int] = None,
                    state: Optional[Mapping[str, Any]] = None, dtype: Optional[str] = None,
                    task_config: Optional[Mapping[str, Any]] = None) -> None:
    """Save ``model`` as a transformers-compatible checkpoint directory, atomically.

    Writes config.json + model.safetensors (GPT2LMHeadModel layout, or OpenAIGPTLMHeadModel for a
    post-LN GPT-1), the tokenizer's files when ``tokenizer`` is given, and when ``optimizer``,
    ``step`` or ``state`` is given, optimizer.safetensors + trainer_state.json for resuming.
    ``state`` is any JSON-serialisable dict (data-loader position, run settings...).
    ``dtype`` ('float32' or 'bfloat16') defaults to the model's own. An existing checkpoint at
    ``path`` is replaced only once the new one is complete.

    Task heads: a ``score`` head without bias makes the directory transformers'
    GPT2ForSequenceClassification (OpenAIGPTForSequenceClassification for GPT-1), a
    ``multiple_choice_head`` with one output and a bias its GPT2DoubleHeadsModel
    (OpenAIGPTDoubleHeadsModel); other heads are kept in gptcore's own layout (see io/hf.py).
    ``task_config`` (a JSON-serialisable dict, read back by :func:`load_task_config`) records
    the fine-tuning task in config.json's gptcore.task; some keys also feed transformers:
    ``labels`` (the `score` head's label names, a list or a dict with "names" -> id2label and
    label2id) and ``pad_token_id`` (the id batches are right-padded with; transformers'
    sequence classifier pools the last token that is not it, so it must never end a real
    sequence), by default ``special_tokens["start"]``, GPT-1's start token, which only ever
    opens a sequence.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig) or not hasattr(model, "parameters"):
        raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if state is not None and not isinstance(state, Mapping):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    dt = dtype or getattr(model, "dtype", "float32")
    fmt = _float_format(dt)
    if fmt not in ("F32", "BF16"):
        raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
    dt = "float32" if fmt == "F32" else "bfloat16"
    trainer = None
    if optimizer is not None or step is not None or state is not None:
        trainer = {"format": TRAINER_STATE_FORMAT, "step": None if step is None else int(step),
                   "optimizer": None, "state": dict(state) if state is not None else {}}
        try:
            json.dumps(trainer["state"], default=_json_default)
        except (TypeError, ValueError) as e:
            raise TypeError(f"state: not JSON-serialisable ({e})") from None
    _check_tokenizer(tokenizer)
    task_config = _check_task_config(task_config)
    params = _model_state(model)
    with _atomic_directory(path) as tmp:
        _write_hf_dir(tmp, cfg, params, dt, _eot_of(tokenizer, cfg), task_config)
        if optimizer is not None:
            sd = dict(optimizer.state_dict())
            arrays = []
            for group in ("m", "v", "master"):
                for name, arr in (sd.pop(group, None) or {}).items():
                    arrays.append((f"{group}/{name}", np.asarray(arr, dtype=np.float32), "F32"))
            with open(os.path.join(tmp, "optimizer.safetensors"), "wb") as f:
                _write_safetensors(f, arrays, {"format": "gptcore-adamw"})
            trainer["optimizer"] = sd  # the hyper-parameters and step count
        if trainer is not None:
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump(trainer, f, indent=2, default=_json_default)
                f.write("\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)


def _check_task_config(task_config: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if task_config is None:
        return None
    if not isinstance(task_config, Mapping):
        raise TypeError(f"task_config: expected a dict, got {type(task_config).__name__}")
    try:
        return json.loads(json.dumps(dict(task_config), default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"task_config: not JSON-serialisable ({e})") from None


def load_task_config(path: PathLike) -> Dict[str, Any]:
    """The task record of a checkpoint directory: what ``save_pretrained(task_config=...)`` kept
    (config.json's gptcore.task), with ``labels`` (from id2label, for a sequence classifier)
    and ``pad_token_id`` filled in from transformers' fields when absent; {} when there is none."""
    path = _resolve_checkpoint_dir(_p(path))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"checkpoint {path!r} has no config.json")
    return _task_in(_read_json(cfg_path), cfg_path)


def load_pretrained(path: PathLike, device: str = "cpu", dtype: str = "float32"):
    """A gptcore.GPT from a checkpoint directory (gptcore's, or transformers' GPT-2 / GPT-1) or an
    llm.c model .bin. Everything is validated before the model is built."""
    cfg, state, _ = read_weights(path)
    return _build_model(cfg, state, device, dtype)


# GPTConfig fields that are training settings, not the shape of the weights
_NOT_ARCHITECTURE = ("embd_pdrop", "attn_pdrop", "resid_pdrop")


def load_weights(model, path: PathLike) -> None:
    """Load a checkpoint's weights (any format :func:`load_pretrained` reads) into an existing
    GPT whose architecture matches it (dropout probabilities may differ). Heads the file holds
    must be attached to the model; heads the model has and the file lacks keep their values
    (a new task head on a pre-trained trunk). Everything is validated before the first
    parameter changes. (An AdamW built on a bfloat16 model keeps fp32 master weights: call its
    sync_master() after.)"""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig) or not hasattr(model, "parameters"):
        raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
    saved, state, _ = read_weights(path)
    diff = [f"{k}: checkpoint {v!r}, model {getattr(cfg, k)!r}"
            for k, v in saved.to_dict().items() if getattr(cfg, k) != v and k not in _NOT_ARCHITECTURE]
    if diff:
        raise CheckpointError(f"{_p(path)!r} does not fit this model ({'; '.join(diff)})")
    params = model.parameters()
    unattached = sorted(k for k in state if k not in params)
    if unattached:
        raise CheckpointError(f"{_p(path)!r} holds head tensors {unattached} that this model has no "
                              "head for (attach the head with model.add_head first)")
    for name in state:
        if tuple(params[name].shape) != tuple(np.shape(state[name])) and name != "wte":
            raise CheckpointError(f"{_p(path)!r}: tensor {name!r} has shape {tuple(np.shape(state[name]))}, "
                                  f"the model's is {tuple(params[name].shape)}")
    _copy_weights(model, state)


def load_training_state(path: PathLike) -> Optional[Dict[str, Any]]:
    """What :func:`save_pretrained` kept for resuming, or None when the checkpoint has none:
    ``{"step": int|None, "state": {...}, "optimizer": dict for AdamW.load_state_dict or None}``."""
    path = _resolve_checkpoint_dir(_p(path))
    ts = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(ts):
        return None
    d = _read_json(ts)
    if not isinstance(d, dict) or d.get("format") != TRAINER_STATE_FORMAT:
        raise CheckpointError(f"{ts!r}: unknown format {d.get('format') if isinstance(d, dict) else d!r}")
    opt = d.get("optimizer")
    if opt is not None:
        op = os.path.join(path, "optimizer.safetensors")
        if not os.path.isfile(op):
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: optimizer.safetensors is missing")
        f = SafetensorsFile(op)
        opt = dict(opt)
        for key in f.keys():
            group, _, name = key.partition("/")
            if group not in ("m", "v", "master") or not name:
                raise CheckpointError(f"{op!r}: unexpected tensor {key!r}")
            opt.setdefault(group, {})[name] = np.array(f.get(key), dtype=np.float32)
    return {"step": d.get("step"), "state": d.get("state") or {}, "optimizer": opt}


# ================================================================================================
# convert: any format -> any format
# ================================================================================================

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "special_tokens.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert(src: PathLike, dst: PathLike, dtype: Optional[str] = None, overwrite: bool = False) -> str:
    """Convert ``src`` to the format ``dst`` names; returns a one-line description.

    models      a transformers/gptcore directory (GPT-2 or GPT-1) or an llm.c model ``.bin`` ->
                ``DST.bin`` (llm.c model; ``dtype`` float32 or bfloat16) or a directory
                (transformers layout). The dtype defaults to the source's.
    vocabulary  llm.c tokenizer ``.bin`` -> a directory with vocab.json + merges.txt;
                vocab.json / encoder.json / tokenizer.json (or their directory) -> ``DST.bin``.
    tokens      llm.c shard -> ``DST.npy`` (uint16) or another shard; ``.npy`` -> shard ``.bin``.

    An existing ``dst`` is replaced only with ``overwrite=True`` (atomically).
    """
    src, dst = _p(src), _p(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"dst: {dst!r} exists (pass overwrite=True / --force to replace it)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("dst: must differ from src")
    fmt = detect_format(src)
    if fmt in ("hf-gpt2", "hf-openai-gpt", "llmc-model", "safetensors"):
        cfg, state, src_dtype = read_weights(src)
        dt = dtype or src_dtype
        if dst.endswith(".bin"):
            write_llmc_model(dst, cfg, state, dt)
            kind = f"llm.c model ({dt})"
        else:
            _float_format(dt)
            srcdir = src if os.path.isdir(src) else None
            task = load_task_config(srcdir) if srcdir else None
            with _atomic_directory(dst) as tmp:
                _write_hf_dir(tmp, cfg, state, dt, _eot_of(None, cfg), task or None)
                for name in _TOKENIZER_FILES if srcdir else ():
                    full = os.path.join(srcdir, name)
                    if os.path.isfile(full):
                        shutil.copyfile(full, os.path.join(tmp, name))
            kind = f"{'GPT-2' if cfg.prenorm else 'GPT-1'} transformers directory ({dt})"
        return f"{src} ({fmt}) -> {dst}: {kind}, {cfg.n_layer} layers, {cfg.n_embd} wide"
    if dtype is not None:
        raise ValueError(f"dtype: only model conversions take a dtype ({src!r} holds {fmt})")
    if fmt == "llmc-tokenizer":
        vocab = read_llmc_tokenizer(src)
        if dst.endswith(".bin"):
            write_llmc_tokenizer(dst, vocab)
        else:
            with _atomic_directory(dst) as tmp:
                write_gpt2_vocab(tmp, vocab)
        return f"{src} (llm.c tokenizer) -> {dst}: {vocab.vocab_size} tokens"
    if fmt == "gpt2-vocab":
        if not dst.endswith(".bin"):
            raise ValueError(f"dst: a vocabulary converts to an llm.c tokenizer file ending in .bin, "
                             f"got {dst!r}")
        vocab = read_gpt2_vocab(src)
        write_llmc_tokenizer(dst, vocab)
        return f"{src} (vocabulary) -> {dst}: llm.c tokenizer, {vocab.vocab_size} tokens"
    if fmt in ("llmc-shard", "npy"):
        from ..data import read_shard, write_shard
        if fmt == "llmc-shard":
            tokens = read_shard(src)
        else:
            try:
                tokens = np.load(src, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise CheckpointError(f"{src!r}: unreadable .npy ({e})") from None
            if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
                raise CheckpointError(f"{src!r}: expected a 1-D integer array of token ids, got "
                                      f"{tokens.dtype} {tokens.shape}")
        if dst.endswith(".npy"):
            arr = np.asarray(tokens, dtype=np.uint16)
            with _atomic_file(dst) as f:
                np.save(f, arr, allow_pickle=False)
            kind = ".npy (uint16)"
        elif dst.endswith(".bin"):
            write_shard(dst, tokens)
            kind = "llm.c shard"
        else:
            raise ValueError(f"dst: tokens convert to a .bin shard or a .npy array, got {dst!r}")
        return f"{src} ({fmt}) -> {dst}: {kind}, {int(np.size(tokens))} tokens"
    raise CheckpointError(f"{src!r}: nothing to convert ({fmt})")

