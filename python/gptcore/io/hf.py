"""Hugging Face GPT-2 (GPT2LMHeadModel) and GPT-1 (OpenAIGPTLMHeadModel) directories."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._fileio import parse_json
from ..models import schema
from ..models.config import GPTConfig
from .safetensors import (
    CheckpointError,
    SafetensorsFile,
    _float_format,
    _write_safetensors,
)

# ================================================================================================
# Hugging Face GPT-2 (GPT2LMHeadModel) and GPT-1 (OpenAIGPTLMHeadModel) directories
# ================================================================================================

# transformers' names for the activations gptcore computes (the tanh approximation of GELU)
_TANH_GELU_GPT2 = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# OpenAIGPT's `afn` table maps "gelu" to the tanh approximation (gelu_new), as the original GPT-1
_TANH_GELU_GPT1 = ("gelu", "gelu_new")
# 2: the *_pdrop fields are the model's own (version 1 wrote 0.1 for models trained without)
GPTCORE_FORMAT_VERSION = 2

# ---- task heads in transformers' own task-model layouts ----------------------------------------
#
# Two gptcore head names have a transformers model of their own; a model carrying one is saved
# as that model, so transformers opens a fine-tuned gptcore classifier as it is (and gptcore
# opens those models, whoever saved them):
#
#   score                 GPT2ForSequenceClassification / OpenAIGPTForSequenceClassification:
#                         `score.weight` (num_labels, C), no bias, applied to the hidden state of
#                         the last token that is not config.pad_token_id (GPT-1's extract token
#                         when batches are right-padded with pad_token_id); id2label/label2id
#                         give the label names (num_labels = len(id2label)).
#   multiple_choice_head  GPT2DoubleHeadsModel / OpenAIGPTDoubleHeadsModel:
#                         `multiple_choice_head.summary.weight` (1, C) and `.bias` (1,), a plain
#                         linear map of the hidden state at mc_token_ids (summary_type
#                         "cls_index", summary_use_proj, summary_proj_to_labels, no activation),
#                         one score per choice; the tied lm_head is kept.
#
# A head of either name that does not fit (a `score` with a bias, a `multiple_choice_head` with
# more than one output or no bias) and heads of any other name keep gptcore's generic layout:
# `<name>.weight` / `<name>.bias` next to a GPT2LMHeadModel's tensors, declared in config.json's
# gptcore.heads (transformers ignores them). gptcore's files always declare their heads there;
# transformers' files declare theirs through `architectures`.
_TASK_ARCHS = {  # gptcore head name -> (GPT-2 architecture, GPT-1 architecture)
    "score": ("GPT2ForSequenceClassification", "OpenAIGPTForSequenceClassification"),
    "multiple_choice_head": ("GPT2DoubleHeadsModel", "OpenAIGPTDoubleHeadsModel"),
}
_HEAD_OF_ARCH = {arch: name for name, archs in _TASK_ARCHS.items() for arch in archs}
_MC_PREFIX = "multiple_choice_head.summary."  # transformers' SequenceSummary wraps the Linear
# the summary settings that make transformers' SequenceSummary one linear map on the given token
# (dropout before it, as GPT-1's classifier; it is off in evaluation)
_MC_SUMMARY = {"summary_type": "cls_index", "summary_use_proj": True, "summary_proj_to_labels": True,
               "summary_activation": None, "summary_first_dropout": 0.1}


def _fits_transformers(name: str, spec: Mapping[str, Any]) -> bool:
    """Whether head ``name`` (spec as in gptcore.heads) has the shape transformers' model has."""
    if name == "score":
        return not spec.get("bias", True)
    if name == "multiple_choice_head":
        return spec["n_out"] == 1 and bool(spec.get("bias", True))
    return False


def _task_head(heads: Mapping[str, Mapping[str, Any]]) -> Optional[str]:
    """The head that names the saved architecture: `score` before `multiple_choice_head`."""
    for name in _TASK_ARCHS:
        if name in heads and _fits_transformers(name, heads[name]):
            return name
    return None


def _file_key(name: str, key: str, spec: Mapping[str, Any]) -> str:
    """The tensor name a head's gptcore key (`<name>.weight`) has in the file."""
    if name == "multiple_choice_head" and _fits_transformers(name, spec):
        return _MC_PREFIX + key[len(name) + 1:]
    return key


def _labels_of(task: Mapping[str, Any], n_out: int) -> List[str]:
    """The `score` head's label names for id2label: task["labels"] as a list of names, or as
    gptcore.data.tasks.LabelSpace.to_dict() (its "names"); transformers' LABEL_i without."""
    labels = task.get("labels")
    if isinstance(labels, dict):
        labels = labels.get("names")
    if labels is None:
        return [f"LABEL_{i}" for i in range(n_out)]  # transformers' default names
    if (not isinstance(labels, (list, tuple)) or len(labels) != n_out
            or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in labels)):
        raise ValueError(f"task_config['labels']: expected {n_out} label names (the `score` head "
                         f"has {n_out} outputs), got {labels!r}")
    names = [str(x) for x in labels]
    if len(set(names)) != n_out:  # label2id would lose one
        raise ValueError(f"task_config['labels']: names must differ as text, got {labels!r}")
    return names


def _pad_of(task: Mapping[str, Any], vocab_size: int) -> Optional[int]:
    """The id task batches are right-padded with: task["pad_token_id"], else the start token of
    task["special_tokens"] (it only ever opens a sequence, so it never hides an extract token)."""
    pad = task.get("pad_token_id")
    where = "task_config['pad_token_id']"
    if pad is None and isinstance(task.get("special_tokens"), dict):
        pad, where = task["special_tokens"].get("start"), "task_config['special_tokens']['start']"
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab_size):
        raise ValueError(f"{where}: expected a token id in [0, {vocab_size}), got {pad!r}")
    return pad


def _task_fields(heads: Mapping[str, Mapping[str, Any]], prenorm: bool,
                 task: Mapping[str, Any], vocab_size: int) -> Dict[str, Any]:
    """config.json fields transformers' task model reads: architectures, labels, padding, summary."""
    name = _task_head(heads)
    if name is None:
        return {}
    out: Dict[str, Any] = {"architectures": [_TASK_ARCHS[name][0 if prenorm else 1]]}
    if name == "score":
        n = heads[name]["n_out"]
        labels = _labels_of(task, n)
        out["id2label"] = {str(i): lab for i, lab in enumerate(labels)}
        out["label2id"] = {lab: i for i, lab in enumerate(labels)}
        out["problem_type"] = "regression" if n == 1 else "single_label_classification"
    else:
        out["id2label"], out["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        out.update(_MC_SUMMARY)
    pad = _pad_of(task, vocab_size)
    if pad is not None:
        out["pad_token_id"] = pad
    return out


def _hf_config(cfg: GPTConfig, dtype: str, eot: Optional[int],
               heads: Optional[Mapping[str, Mapping[str, Any]]] = None,
               task: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    common = {
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.ln_eps,
        "initializer_range": 0.02, "resid_pdrop": cfg.resid_pdrop, "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "tie_word_embeddings": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if cfg.prenorm:
        d = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": cfg.block_size,
             "n_inner": None, "activation_function": "gelu_new", "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
             "use_cache": True, **common}
    else:
        d = {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", "afn": "gelu",
             "n_ctx": cfg.block_size, **common}
    if eot is not None and 0 <= eot < cfg.vocab_size:
        d["bos_token_id"] = d["eos_token_id"] = int(eot)
    d["gptcore"] = {"format_version": GPTCORE_FORMAT_VERSION, "attn_window": list(cfg.attn_window),
                    "bias": cfg.bias, "prenorm": cfg.prenorm}
    if heads:  # task heads (gptcore.models.heads): their tensors sit beside the trunk's
        d["gptcore"]["heads"] = {k: dict(v) for k, v in heads.items()}
        d.update(_task_fields(heads, cfg.prenorm, task or {}, cfg.vocab_size))
    if task:  # the fine-tuning task's own record (special tokens, label names...), kept verbatim
        d["gptcore"]["task"] = dict(task)
    return d


def _int_field(d: Mapping, key: str, where: str, *fallbacks: str) -> int:
    for k in (key,) + fallbacks:
        v = d.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CheckpointError(f"{where}: {k} must be a positive integer, got {v!r}")
            return v
    raise CheckpointError(f"{where}: missing field {key!r}")


def _config_from_hf(d: Any, where: str) -> GPTConfig:
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    mtype = d.get("model_type")
    if mtype not in ("gpt2", "openai-gpt"):
        raise CheckpointError(f"{where}: model_type {mtype!r} is not supported (gptcore reads 'gpt2' "
                              "and 'openai-gpt' checkpoints)")
    prenorm = mtype == "gpt2"
    n_embd = _int_field(d, "n_embd", where)
    if prenorm:
        act = d.get("activation_function", "gelu_new")
        if act not in _TANH_GELU_GPT2:
            raise CheckpointError(f"{where}: activation_function {act!r} is not supported (gptcore "
                                  f"computes the tanh GELU: {', '.join(_TANH_GELU_GPT2)})")
        if d.get("n_inner") not in (None, 4 * n_embd):
            raise CheckpointError(f"{where}: n_inner {d.get('n_inner')!r} is not supported (gptcore's "
                                  f"MLP is 4 * n_embd = {4 * n_embd} wide)")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if key in d and bool(d[key]) != ok:
                raise CheckpointError(f"{where}: {key}={d[key]!r} is not supported (gptcore needs {ok})")
    else:
        act = d.get("afn", "gelu")
        if act not in _TANH_GELU_GPT1:
            raise CheckpointError(f"{where}: afn {act!r} is not supported (gptcore computes the tanh "
                                  "GELU, which OpenAIGPT calls 'gelu')")
    if d.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{where}: tie_word_embeddings is false; gptcore's LM head is always tied")
    extra = d.get("gptcore") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: the 'gptcore' section must be an object")
    if extra.get("format_version", GPTCORE_FORMAT_VERSION) > GPTCORE_FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by a newer gptcore (format_version "
                              f"{extra.get('format_version')}); upgrade gptcore to read it")
    if "prenorm" in extra and bool(extra["prenorm"]) != prenorm:
        raise CheckpointError(f"{where}: gptcore.prenorm={extra['prenorm']!r} contradicts "
                              f"model_type {mtype!r}")
    eps = d.get("layer_norm_epsilon", 1e-5)
    # dropout: transformers' defaults are 0.1; gptcore's first format wrote 0.1 whatever the model
    # trained with (it had no dropout), so its files mean 0
    old_gptcore = bool(extra) and extra.get("format_version", 1) < 2
    pdrop = {k: 0.0 if old_gptcore else d.get(k, 0.1) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
    try:
        return GPTConfig(n_layer=_int_field(d, "n_layer", where), n_head=_int_field(d, "n_head", where),
                         n_embd=n_embd, block_size=_int_field(d, "n_positions", where, "n_ctx"),
                         vocab_size=_int_field(d, "vocab_size", where), prenorm=prenorm,
                         attn_window=extra.get("attn_window"), bias=bool(extra.get("bias", True)),
                         ln_eps=eps, **pdrop)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    return parse_json(data, repr(path), CheckpointError)


def _open_hf_tensors(directory: str) -> Dict[str, Tuple[SafetensorsFile, str]]:
    """key -> (file, key) over model.safetensors or a sharded model.safetensors.index.json."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        f = SafetensorsFile(single, prefetch=True)
        return {k: (f, k) for k in f.keys()}
    if os.path.isfile(index):
        idx = _read_json(index)
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict):
            raise CheckpointError(f"{index!r}: missing weight_map")
        files: Dict[str, SafetensorsFile] = {}
        out = {}
        for key, fname in wmap.items():
            if not isinstance(fname, str) or os.path.basename(fname) != fname:
                raise CheckpointError(f"{index!r}: bad shard name {fname!r} for {key!r}")
            if fname not in files:
                files[fname] = SafetensorsFile(os.path.join(directory, fname), prefetch=True)
            if key not in files[fname]:
                raise CheckpointError(f"{index!r} places {key!r} in {fname!r}, which does not hold it")
            out[key] = (files[fname], key)
        return out
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        raise CheckpointError(f"{directory!r} holds only pytorch_model.bin (a pickle); gptcore reads "
                              "safetensors. Re-save it with transformers: "
                              "model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"checkpoint {directory!r} has no model.safetensors")


def _read_hf_dir(directory: str) -> Tuple[GPTConfig, Dict[str, np.ndarray], str]:
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"checkpoint {directory!r} has no config.json")
    raw = _read_json(cfg_path)
    cfg = _config_from_hf(raw, cfg_path)
    heads = _heads_of_architecture(raw, _declared_heads(raw, cfg_path), cfg_path)
    tensors = _open_hf_tensors(directory)
    where = os.path.join(directory, "model.safetensors")
    # accept keys with or without the 'transformer.' prefix
    by_name: Dict[str, str] = {}
    head_keys: List[str] = []
    lm_head = None
    for key in tensors:
        short = key[len("transformer."):] if key.startswith("transformer.") else key
        if key == "lm_head.weight":
            lm_head = key
            continue
        if short.endswith((".attn.bias", ".attn.masked_bias")) or short == "position_ids":
            continue  # causal-mask buffers of older transformers
        if short.split(".", 1)[0] in heads:
            head_keys.append(key)
            continue
        if short in by_name:
            raise CheckpointError(f"{where}: tensor {short!r} appears twice (with and without the "
                                  "'transformer.' prefix)")
        by_name[short] = key
    params = {p.hf_key[len("transformer."):]: p for p in schema.parameters(cfg)}
    wte_key = next(hf for hf, p in params.items() if p.name == "wte")
    if wte_key not in by_name and lm_head is not None:
        # transformers' OpenAIGPTDoubleHeadsModel ties the embedding to its lm_head and saves
        # only lm_head.weight
        by_name[wte_key], lm_head = lm_head, None
    if not cfg.bias:  # written by gptcore as zeros (transformers' models always have biases)
        for k in [k for k in by_name if k.endswith(".bias") and k[:-5] + ".weight" in params]:
            f, key = tensors[by_name.pop(k)]
            if np.any(f.get(key)):
                raise CheckpointError(f"{where}: config.json says the model has no biases, but "
                                      f"{key!r} is not zero")
    unknown = sorted(k for k in by_name if k not in params)
    if unknown:
        names = ", ".join(repr(by_name[k]) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        arch = "GPT2LMHeadModel" if cfg.prenorm else "OpenAIGPTLMHeadModel"
        raise CheckpointError(f"{where}: unexpected tensor(s) {names} (not a {arch} checkpoint "
                              "matching config.json?)")
    missing = [hf for hf in params if hf not in by_name]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {'transformer.' + missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    state: Dict[str, np.ndarray] = {}
    stored = set()
    for hf, p in params.items():
        f, key = tensors[by_name[hf]]
        shape = f.shape(key)
        want = p.shape[::-1] if p.hf_transposed else p.shape
        if shape != want:
            layout = " (Conv1D layout (in, out))" if p.hf_transposed else ""
            raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, expected {want}{layout}")
        dt = f.dtype(key)
        if dt not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {dt}; expected a floating type")
        stored.add(dt)
        arr = f.get(key)
        state[p.name] = arr.T if p.hf_transposed else arr
    if lm_head is not None:
        f, key = tensors[lm_head]
        if f.shape(key) != state["wte"].shape or not np.array_equal(f.get(key), state["wte"]):
            raise CheckpointError(f"{where}: lm_head.weight differs from the token embedding; gptcore's "
                                  "LM head is tied to it (untied heads are not supported)")
    for key in head_keys:
        f, k = tensors[key]
        name = "multiple_choice_head." + key[len(_MC_PREFIX):] if key.startswith(_MC_PREFIX) else key
        if name in state:
            raise CheckpointError(f"{where}: head tensor {name!r} appears twice (as {key!r} too)")
        state[name] = f.get(k)
    _check_heads(heads, state, where, cfg.n_embd)
    dtype = "bfloat16" if stored == {"BF16"} else "float32"
    return cfg, state, dtype


def _declared_heads(raw: Any, where: str) -> Dict[str, Dict[str, Any]]:
    """The task heads config.json's gptcore section declares: name -> {"kind", "n_out", "bias"}."""
    heads = ((raw.get("gptcore") or {}) if isinstance(raw, dict) else {}).get("heads") or {}
    if not isinstance(heads, dict):
        raise CheckpointError(f"{where}: gptcore.heads must be an object")
    for name, spec in heads.items():
        if (not isinstance(spec, dict) or spec.get("kind") != "linear" or "." in name
                or not isinstance(spec.get("n_out"), int) or spec["n_out"] < 1):
            raise CheckpointError(f"{where}: gptcore.heads[{name!r}] is not a linear head "
                                  "({'kind': 'linear', 'n_out': N, 'bias': bool})")
    return heads


def _heads_of_architecture(raw: Mapping[str, Any], heads: Dict[str, Dict[str, Any]],
                           where: str) -> Dict[str, Dict[str, Any]]:
    """``heads`` (declared in gptcore.heads) plus the head a transformers task architecture
    (GPT2ForSequenceClassification, GPT2DoubleHeadsModel and GPT-1's) implies, checked to agree."""
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise CheckpointError(f"{where}: architectures must be a list, got {archs!r}")
    out = dict(heads)
    for arch in archs:
        name = _HEAD_OF_ARCH.get(arch)
        if name is None:
            continue
        if name == "score":  # num_labels is len(id2label) in transformers' config.json
            id2label = raw.get("id2label")
            n = len(id2label) if isinstance(id2label, dict) and id2label else raw.get("num_labels", 2)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise CheckpointError(f"{where}: num_labels must be a positive integer, got {n!r}")
            spec = {"kind": "linear", "n_out": n, "bias": False}
        else:
            _check_summary(raw, where, arch)
            spec = {"kind": "linear", "n_out": 1, "bias": True}
        declared = out.get(name)
        if declared is not None and (declared["n_out"], bool(declared.get("bias", True))) != (
                spec["n_out"], spec["bias"]):
            raise CheckpointError(f"{where}: gptcore.heads[{name!r}] (n_out {declared['n_out']}, bias "
                                  f"{bool(declared.get('bias', True))}) contradicts {arch}, whose head has "
                                  f"{spec['n_out']} output(s) and {'a' if spec['bias'] else 'no'} bias")
        out[name] = spec
    return out


def _check_summary(raw: Mapping[str, Any], where: str, arch: str) -> None:
    """Refuse a DoubleHeads config whose SequenceSummary is not one linear map of the token at
    mc_token_ids (gptcore's multiple_choice_head)."""
    kind = raw.get("summary_type", "cls_index")
    act = raw.get("summary_activation")
    if kind not in ("cls_index", "last"):
        raise CheckpointError(f"{where}: {arch} with summary_type {kind!r} is not supported (gptcore's "
                              "multiple_choice_head reads one token: 'cls_index' or 'last')")
    if act not in (None, "", "linear"):
        raise CheckpointError(f"{where}: {arch} with summary_activation {act!r} is not supported "
                              "(gptcore's multiple_choice_head is linear)")
    if not raw.get("summary_use_proj", True) or not raw.get("summary_proj_to_labels", True):
        raise CheckpointError(f"{where}: {arch} needs summary_use_proj and summary_proj_to_labels "
                              "(one score per choice) for gptcore's multiple_choice_head")


def _check_heads(heads: Mapping[str, Mapping[str, Any]], state: Mapping[str, Any], where: str,
                 C: int) -> None:
    for name, spec in heads.items():
        want = {f"{name}.weight": (spec["n_out"], C)}
        if spec.get("bias", True):
            want[f"{name}.bias"] = (spec["n_out"],)
        got = {k for k in state if k.startswith(name + ".")}
        if got != set(want):
            hint = (" (transformers' sequence classifiers' score has no bias)"
                    if name == "score" and f"{name}.bias" in got - set(want) else "")
            raise CheckpointError(f"{where}: head {name!r} needs tensors {sorted(want)}, found "
                                  f"{sorted(got)}{hint}")
        for k, shape in want.items():
            if tuple(np.shape(state[k])) != shape:
                raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(np.shape(state[k]))}, "
                                      f"expected {shape}")


def _check_state(cfg: GPTConfig, state: Mapping[str, Any], where: str) -> None:
    expected = schema.expected_shapes(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    for k, want in expected.items():
        got = tuple(np.shape(state[k]))
        if got != want:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {got}, expected {want}")


def _heads_in(cfg: GPTConfig, state: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The linear task heads whose ``name.weight`` (and ``name.bias``) ``state`` holds beside
    the trunk's tensors, as config.json declares them."""
    trunk = schema.expected_shapes(cfg)
    names = sorted({k.split(".", 1)[0] for k in state if k not in trunk})
    strays = [n for n in names if f"{n}.weight" not in state]
    if strays:
        raise CheckpointError(f"state: tensors {sorted(k for k in state if k.split('.', 1)[0] in strays)} "
                              "are neither the model's nor a head's (name.weight [, name.bias])")
    return {n: {"kind": "linear", "n_out": int(np.shape(state[f"{n}.weight"])[0]),
                "bias": f"{n}.bias" in state} for n in names}


def _write_hf_dir(directory: str, cfg: GPTConfig, state: Mapping[str, np.ndarray], dtype: str,
                  eot: Optional[int], task: Optional[Mapping[str, Any]] = None) -> None:
    """Write config.json + model.safetensors into ``directory`` (which must exist); tensors of
    task heads in ``state`` go beside the trunk's, declared in config.json, a `score` or
    `multiple_choice_head` in transformers' task-model layout (see _TASK_ARCHS). ``task`` is
    kept as config.json's gptcore.task; its "labels" and "pad_token_id" also become
    transformers' id2label and pad_token_id."""
    heads = _heads_in(cfg, state)
    config = _hf_config(cfg, dtype, eot, heads, task)  # checks ``task`` before anything is written
    _check_heads(heads, state, "state", cfg.n_embd)
    fmt = _float_format(dtype)
    items = []
    # transformers' GPT-2/GPT-1 always have biases: a bias-free model writes zeros (the same model)
    for p in schema.parameters(cfg, with_absent_biases=True):
        arr = state[p.name] if p.name in state else np.zeros(p.shape, np.float32)
        if p.hf_transposed:
            arr = np.asarray(arr).T  # (out, in) -> Conv1D (in, out); made contiguous while writing
        items.append((p.hf_key, arr, fmt))
    for name, spec in heads.items():
        items.extend((_file_key(name, k, spec), state[k], fmt) for k in state if k.startswith(name + "."))
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        _write_safetensors(f, items, {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _task_in(raw: Any, where: str) -> Dict[str, Any]:
    """The task record of a parsed config.json: gptcore.task, with transformers' label names
    (id2label) and pad_token_id filled in where it lacks them (a directory transformers wrote)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    task = (raw.get("gptcore") or {}).get("task") or {}
    if not isinstance(task, dict):
        raise CheckpointError(f"{where}: gptcore.task must be an object")
    task = dict(task)
    heads = _heads_of_architecture(raw, _declared_heads(raw, where), where)
    id2label = raw.get("id2label")
    if "score" in heads and "labels" not in task and isinstance(id2label, dict) and id2label:
        try:
            task["labels"] = [id2label[k] for k in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            pass  # keys that are not integers: no usable names
    if raw.get("pad_token_id") is not None and "pad_token_id" not in task:
        task["pad_token_id"] = raw["pad_token_id"]
    return task


# ================================================================================================
