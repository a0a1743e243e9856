"""Training-run checkpoints: save, resume and the data tokenizer a run recorded."""

import os
from typing import Any, Dict, Optional

import numpy as np

from .. import io as gckpt
from .._fileio import parse_json
from ..models.config import GPTConfig
from ..models.gpt import GPT
from ..optim import AdamW
from ..tokenizer import Tokenizer

# ---- checkpoints ----------------------------------------------------------------------------

CHECKPOINT_NAME = "checkpoint"
# The native format `gptcore train` wrote before it used gptcore.io's directories. It is
# only read (so that run directories made by earlier versions still resume and sample), never
# written.
_NATIVE_V1_FILES = ("config.json", "model.npz", "optim.npz", "state.json")


def _saveable_tokenizer(tok):
    """The run's tokenizer as a gptcore.Tokenizer whose files a checkpoint holds (GPT-2's BPE,
    or the byte-level vocabulary as a BPE with no merges), or None for one gptcore cannot save."""
    if getattr(tok, "name", None) == "byte" and getattr(tok, "vocab_size", None) == 257:
        return Tokenizer.byte_level()
    for candidate in (tok, getattr(tok, "_tok", None)):  # data._GPT2Adapter wraps a Tokenizer
        if isinstance(candidate, Tokenizer):
            return candidate
    return None


def save_checkpoint(path: str, model: GPT, optimizer: Optional[AdamW], state: Dict[str, Any],
                    tokenizer=None) -> None:
    """Write a training checkpoint with :func:`gptcore.io.save_pretrained`: the weights in
    transformers' GPT-2/GPT-1 layout, optimizer.safetensors, trainer_state.json holding ``state``,
    and ``tokenizer``'s files when one is given (a gptcore.Tokenizer).

    ``state`` is any JSON-serialisable dict (step, data-loader state, training config...). The
    directory is written under a temporary name, then renamed: an existing checkpoint at ``path``
    is replaced only once the new one is complete.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    gckpt.save_pretrained(model, path, optimizer=optimizer, tokenizer=tokenizer,
                          step=state.get("step"), state=state)
    # (gptcore.io drops an old native checkpoint's model.npz/optim.npz/state.json when it
    # replaces that directory, so a rewritten run holds only the new layout.)


def is_native_v1_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint directory in the old native format (model.npz...)."""
    path = os.fspath(path)
    return (os.path.isfile(os.path.join(path, "model.npz"))
            and not os.path.isfile(os.path.join(path, "model.safetensors")))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a training checkpoint: ``{"config": GPTConfig, "model": {name: array}, "optim": dict
    for AdamW.load_state_dict (None if none was saved), "state": {...}, "path": str}``.

    Reads gptcore.io's directories (those :func:`save_checkpoint` writes) and the old
    native format. A directory with weights only (no trainer_state.json), missing or damaged
    files raise FileNotFoundError / ValueError naming the file.
    """
    path = os.fspath(path)
    if is_native_v1_checkpoint(path):
        return _load_native_v1(path)
    training = gckpt.load_training_state(path)  # also finds a copy a crash mid-save left aside
    if training is None:
        raise FileNotFoundError(f"checkpoint {path!r} has no trainer_state.json: it holds weights "
                                "only, not a training run to resume")
    config, model, _ = gckpt.read_weights(path)
    state = dict(training["state"])
    if training["step"] is not None:
        state.setdefault("step", training["step"])
    return {"config": config, "model": model, "optim": training["optimizer"], "state": state,
            "path": path}


def _load_native_v1(path: str) -> Dict[str, Any]:
    """The old native format: config.json (GPTConfig), model.npz, optim.npz (m/NAME, v/NAME,
    master/NAME) and state.json (with the optimizer's hyper-parameters under "optimizer")."""
    for name in _NATIVE_V1_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: {name} is missing")
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            config = GPTConfig.from_dict(parse_json(f.read(), "config.json"))
        with open(os.path.join(path, "state.json"), "rb") as f:
            state = parse_json(f.read(), "state.json")
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path!r}: damaged config.json or state.json ({e})") from None
    if not isinstance(state, dict) or state.get("format") != "gptcore-native-1":
        raise ValueError(f"checkpoint {path!r}: state.json has an unknown format")
    try:
        with np.load(os.path.join(path, "model.npz")) as z:
            model = {k: z[k] for k in z.files}
        optim: Dict[str, Any] = dict(state.get("optimizer", {}))
        with np.load(os.path.join(path, "optim.npz")) as z:
            for key in z.files:
                group, name = key.split("/", 1)
                optim.setdefault(group, {})[name] = z[key]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path!r}: damaged array file ({e})") from None
    return {"config": config, "model": model, "optim": optim, "state": state, "path": path}


def recorded_tokenizer(path: str) -> Optional[str]:
    """The data tokenizer's name (e.g. "byte") a `gptcore train` checkpoint recorded, or None.

    Reads only the small JSON file (not the optimizer's arrays); anything unreadable gives None.
    """
    path = os.fspath(path)
    name = "state.json" if is_native_v1_checkpoint(path) else "trainer_state.json"
    try:
        with open(os.path.join(path, name), "rb") as f:
            d = parse_json(f.read(), name)
        state = d if name == "state.json" else d.get("state")
        tok = (state.get("data_meta") or {}).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    return tok if isinstance(tok, str) else None


def checkpoint_tokenizer(path: str, vocab_size: int, recorded: Optional[str] = None):
    """The tokenizer of a checkpoint (directory or file): the one ``recorded`` names (a task
    record's "byte"/"gpt2"; "files" means the directory's own vocabulary files) or, without it,
    the data tokenizer a `gptcore train` run recorded; else the directory's vocabulary files;
    else GPT-2's or the byte-level one by vocabulary size."""
    from .. import data as gdata

    path = os.fspath(path)
    is_dir = os.path.isdir(path)
    name = recorded if recorded != "files" else None
    if recorded is None and is_dir:
        name = recorded_tokenizer(path)  # the exact tokenizer the run's data was made with
    if name:
        return gdata.get_tokenizer(name)
    tok = gckpt.load_tokenizer(path) if is_dir else None
    if tok is not None:
        return tok
    if recorded == "files":
        raise ValueError(f"checkpoint {path!r}: its task record says its tokenizer's files were "
                         "saved with it, but there are none (vocab.json/merges.txt)")
    name = {257: "byte", 50257: "gpt2", 50304: "gpt2"}.get(vocab_size)
    if name is None:
        raise ValueError(f"checkpoint {path!r}: cannot tell which tokenizer its {vocab_size}-token "
                         "vocabulary is (it holds no vocabulary files); name one (gpt2, byte or a "
                         "directory)")
    return gdata.get_tokenizer(name)
