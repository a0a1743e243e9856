"""The training loop behind ``gptcore train``: data, schedule, evaluation, logs, checkpoints.

    from gptcore.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny", steps=50))

A run writes into ``out``: ``log.jsonl`` (one JSON object per step and per evaluation) and
``checkpoint/`` (replaced atomically at every evaluation and at the end). ``resume=True``
continues from that checkpoint exactly: the same batches, the same updates, the same losses
as a run that was never interrupted. Ctrl-C stops at the next step boundary and checkpoints.

The checkpoint is gptcore's checkpoint directory (:mod:`gptcore.io`): a transformers
GPT-2 (or GPT-1) directory, config.json + model.safetensors, that ``transformers``,
``gptcore sample`` and ``gptcore convert`` open as it is, plus optimizer.safetensors and
trainer_state.json (step, data-loader position, the run's settings) for ``resume``, and the
tokenizer's files when the data used GPT-2's BPE (a byte-level run records its tokenizer's name
in the trainer state instead). :func:`save_checkpoint` and :func:`load_checkpoint` are the
training loop's view of it; :func:`load_checkpoint` still reads the native format of earlier
gptcore versions (model.npz, optim.npz, state.json), which is no longer written.
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .. import data as gdata
from .._progress import Progress, format_duration
from ..models.config import DEMO_PRESETS, GPTConfig
from .. import get_num_threads
from ..models.gpt import GPT
from ..optim import AdamW, lr_at
from .checkpoint import (
    CHECKPOINT_NAME,
    _saveable_tokenizer,
    load_checkpoint,
    save_checkpoint,
)
from ._run import (
    Checkpointer,
    StopFlag,
    TrainingDiverged,
    check_memory,
    diverged,
    emit,
    open_run_log,
    refuse_existing_run,
)
from .corpus import default_corpus_dir

__all__ = ["TrainConfig", "train", "evaluate", "generate", "RUN_CONTROL_FIELDS"]


@dataclass
class TrainConfig:
    """Everything a training run needs. ``data=None`` uses the built-in demo corpus."""

    preset: str = "mini"
    data: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    steps: Optional[int] = None  # default 1500; on resume: the checkpoint's
    batch_size: int = 16
    seq_len: Optional[int] = None  # default: min(block_size, 256)
    lr: Optional[float] = None  # default: 3e-3 for the demo presets, 6e-4 otherwise
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup: Optional[int] = None  # default: min(50, steps)
    grad_accum: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    seed: int = 1337
    eval_every: Optional[int] = None  # default 250; on resume: the checkpoint's
    eval_batches: Optional[int] = None  # default 8; on resume: the checkpoint's
    out: str = "gptcore-run"
    resume: Union[bool, str] = False
    overwrite: bool = False  # replace an existing run in ``out`` (otherwise refused)
    init_from: Optional[str] = None  # start from this checkpoint's weights (any format gptcore reads)
    checkpoint: bool = True
    stop_after: Optional[int] = None  # stop (and checkpoint) after this many steps, as if interrupted
    sample_tokens: int = 300
    temperature: float = 0.8
    top_k: Optional[int] = 40
    prompt: Optional[str] = None
    threads: Optional[int] = None
    progress: bool = True
    model_overrides: Dict[str, Any] = field(default_factory=dict)  # e.g. {"n_layer": 2}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run takes from its new TrainConfig; everything else comes from the checkpoint
# (it decides the math). Of these, the ones that are None in the new config keep the
# checkpoint's value. Changing steps changes the LR schedule: no longer an exact continuation.
RUN_CONTROL_FIELDS = ("steps", "eval_every", "eval_batches", "out", "resume", "checkpoint",
                      "stop_after", "sample_tokens", "temperature", "top_k", "prompt", "threads",
                      "progress", "device")
_DEFAULTS_IF_UNSET = {"steps": 1500, "eval_every": 250, "eval_batches": 8}


def _check_train_config(cfg: TrainConfig) -> None:
    def pos_int(name, allow_zero=False):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            raise ValueError(f"{name}: expected an int >= {0 if allow_zero else 1}, got {v!r}")

    for n in ("steps", "batch_size", "grad_accum", "eval_batches"):
        pos_int(n)
    for n in ("warmup", "eval_every", "sample_tokens"):
        pos_int(n, allow_zero=True)
    if cfg.seq_len is not None:
        pos_int("seq_len")
    for n in ("lr", "grad_clip", "weight_decay", "min_lr_ratio", "temperature"):
        v = getattr(cfg, n)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{n}: expected a finite number >= 0, got {v!r}")
    if cfg.min_lr_ratio > 1:
        raise ValueError(f"min_lr_ratio: the final lr is a fraction of the peak lr, expected a "
                         f"number in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.warmup > cfg.steps:
        raise ValueError(f"warmup: {cfg.warmup} warmup steps are more than the run's {cfg.steps} "
                         "steps (the lr would never reach its peak); lower --warmup")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule: expected cosine, linear or constant, got {cfg.schedule!r}")
    if cfg.top_k is not None and (not isinstance(cfg.top_k, int) or cfg.top_k < 1):
        raise ValueError(f"top_k: expected a positive int or None, got {cfg.top_k!r}")
    GPTConfig.preset(cfg.preset)  # an unknown preset fails here, before any data work


# ---- sampling ----------------------------------------------------------------------------


def generate(model: GPT, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: int = 0, stop_token: Optional[int] = None) -> List[int]:
    """Sample tokens after ``prompt_ids`` (temperature, top-k), recomputing the whole context.

    Simple and exact but O(T^2) per token: the KV-cache sampler lives in gptcore.generate.
    """
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids: expected at least one token")
    block = model.config.block_size
    out: List[int] = []
    for _ in range(int(max_new_tokens)):
        ctx = np.array(ids[-block:], dtype=np.int32)[None, :]
        logits = model.logits(ctx, last_only=True)[0].astype(np.float64)
        if temperature <= 0:
            nxt = int(np.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size:
                kth = np.partition(logits, -top_k)[-top_k]
                logits = np.where(logits < kth, -np.inf, logits)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            nxt = int(rng.choice(p.size, p=p))
        ids.append(nxt)
        out.append(nxt)
        if stop_token is not None and nxt == stop_token:
            break
    return out


def _sample(model: GPT, prompt_ids: Sequence[int], n: int, temperature: float,
            top_k: Optional[int], seed: int) -> List[int]:
    """The KV-cache sampler (gptcore.generate) when prompt + sample fit the context, else
    :func:`generate`'s sliding window. Runs in evaluation mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        if len(prompt_ids) + n <= model.config.block_size:
            from ..generate import generate as kv_generate

            out = kv_generate(model, np.asarray(prompt_ids, dtype=np.int64), n,
                              temperature=temperature, top_k=top_k, seed=seed)
            return [int(t) for t in np.asarray(out).reshape(-1)[len(prompt_ids):] if t >= 0]
        return generate(model, prompt_ids, n, temperature, top_k, seed=seed)
    finally:
        model.train(was_training)


# ---- the loop ----------------------------------------------------------------------------


def _model_config(cfg: TrainConfig, meta: Dict[str, Any]) -> GPTConfig:
    overrides = dict(cfg.model_overrides or {})
    if cfg.preset.lower() in DEMO_PRESETS and "vocab_size" not in overrides:
        overrides["vocab_size"] = int(meta["vocab_size"])
    mc = GPTConfig.preset(cfg.preset, **overrides)
    if meta["vocab_size"] > mc.vocab_size:
        raise ValueError(f"data: its tokenizer ({meta.get('tokenizer')}) has {meta['vocab_size']} "
                         f"tokens but preset {cfg.preset!r} only {mc.vocab_size}")
    return mc


def _init_from(cfg: TrainConfig, meta: Dict[str, Any]):
    """The architecture and weights of ``cfg.init_from`` (any checkpoint gptcore reads), with
    the run's dropout; task heads in the file are left out (pre-training uses the LM head)."""
    from ..io.pretrained import read_weights
    from ..models import schema

    arch = sorted(k for k in (cfg.model_overrides or {}) if not k.endswith("_pdrop"))
    if arch:
        raise ValueError(f"init_from: the architecture comes from {cfg.init_from!r}; drop the "
                         f"overrides {', '.join(arch)}")
    ck_cfg, state, _ = read_weights(cfg.init_from)
    drops = {k: v for k, v in (cfg.model_overrides or {}).items() if k.endswith("_pdrop")}
    model_cfg = ck_cfg.replace(**drops) if drops else ck_cfg
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"data: its tokenizer ({meta.get('tokenizer')}) has {meta['vocab_size']} "
                         f"tokens but the model in {cfg.init_from!r} only {model_cfg.vocab_size}")
    trunk = schema.expected_shapes(model_cfg)
    return model_cfg, {k: v for k, v in state.items() if k in trunk}


def _tokenizer_for(meta: Dict[str, Any]):
    name = meta.get("tokenizer", "byte")
    try:
        return gdata.get_tokenizer(name)
    except ValueError:
        return None


def evaluate(model: GPT, val: gdata.TokenData, batch_size: int, seq_len: int, max_batches: int) -> float:
    """Mean validation loss over up to ``max_batches`` deterministic batches."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()  # no dropout while measuring
    try:
        for x, y in gdata.eval_batches(val, batch_size, seq_len, max_batches):
            n = x.size
            total += model.loss(x, y) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def train(cfg: TrainConfig, on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run (or resume) training; returns a summary with per-step losses and the final sample."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    ckpt = None
    planned_steps = None  # the resumed run's own plan, when --steps changes it
    if cfg.resume:
        if cfg.overwrite:
            raise ValueError("resume and overwrite: a run is either continued or replaced, not both")
        if cfg.init_from:
            raise ValueError("resume and init_from: a resumed run continues from its own checkpoint")
        ckpt_path = cfg.resume if isinstance(cfg.resume, str) else os.path.join(cfg.out, CHECKPOINT_NAME)
        ckpt = load_checkpoint(ckpt_path)
        if not ckpt["optim"] or "loader" not in ckpt["state"] or "step" not in ckpt["state"]:
            raise ValueError(f"resume: checkpoint {ckpt_path!r} was not written by `gptcore train` "
                             "(it has no optimizer or data-loader state to continue from)")
        saved = ckpt["state"].get("train_config", {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        merged = {k: v for k, v in saved.items() if k in known}
        for k in RUN_CONTROL_FIELDS:
            if getattr(cfg, k) is not None or k not in _DEFAULTS_IF_UNSET:
                merged[k] = getattr(cfg, k)
        if cfg.steps is not None and saved.get("steps") not in (None, cfg.steps):
            planned_steps = int(saved["steps"])
        cfg = TrainConfig(**merged)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in _DEFAULTS_IF_UNSET.items()
                                      if getattr(cfg, k) is None})
    if cfg.warmup is None:
        cfg = dataclasses.replace(cfg, warmup=min(50, cfg.steps))
    if cfg.lr is None:
        demo = str(cfg.preset).lower() in DEMO_PRESETS and not cfg.init_from
        cfg = dataclasses.replace(cfg, lr=3e-3 if demo else (1e-4 if cfg.init_from else 6e-4))
    _check_train_config(cfg)
    if not cfg.resume and not cfg.overwrite:
        refuse_existing_run(cfg.out, ("log.jsonl", CHECKPOINT_NAME))
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)

    say = print if cfg.progress else (lambda *a, **k: None)
    # data
    data_dir = cfg.data if cfg.data is not None else default_corpus_dir(progress=cfg.progress)
    meta = gdata.load_meta(data_dir)
    train_paths, val_paths = gdata.shard_paths(data_dir, "train"), gdata.shard_paths(data_dir, "val")
    if not train_paths:
        raise FileNotFoundError(f"data directory {data_dir!r} has no train_*.bin shards")
    init_state = None
    if ckpt:
        model_cfg = ckpt["config"]
    elif cfg.init_from:
        model_cfg, init_state = _init_from(cfg, meta)
    else:
        model_cfg = _model_config(cfg, meta)
    train_data = gdata.TokenData(train_paths, model_cfg.vocab_size)
    val_data = gdata.TokenData(val_paths, model_cfg.vocab_size) if val_paths else None
    seq_len = cfg.seq_len or min(model_cfg.block_size, 256)
    if seq_len > model_cfg.block_size:
        raise ValueError(f"seq_len: {seq_len} exceeds the model's block_size {model_cfg.block_size}")
    if val_data is not None and not any(len(sh) > seq_len for sh in val_data.shards):
        raise ValueError(f"data: the validation split ({val_data.total:,} tokens) holds no window of "
                         f"seq_len + 1 = {seq_len + 1} tokens to evaluate on; use a longer "
                         "validation split or a smaller --seq-len")
    loader = gdata.BatchLoader(train_data, cfg.batch_size, seq_len, seed=cfg.seed)
    check_memory(model_cfg, cfg.batch_size, seq_len, cfg.dtype, cfg.device)

    # model and optimiser (a loaded model skips the random initialisation the load overwrites)
    model = GPT(model_cfg, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                init=ckpt is None and init_state is None)
    if ckpt:
        model.load_state_dict(ckpt.pop("model"))  # pop: drop the file's mapping once copied
    elif init_state is not None:
        model.load_state_dict(init_state)
        init_state = None
    opt = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                seed=cfg.seed)
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if ckpt:
        opt.load_state_dict(ckpt["optim"])
        st = ckpt["state"]
        start_step, tokens_seen = int(st["step"]), int(st.get("tokens", 0))
        elapsed_before = float(st.get("elapsed", 0.0))
        loader.load_state_dict(st["loader"])
        model.dropout_step = int(st.get("dropout_step", 0))  # the next masks, as if never stopped
        say(f"Resumed from {ckpt['path']} at step {start_step}")
        saved_threads = st.get("threads")
        if cfg.device == "cpu" and saved_threads not in (None, get_num_threads()):
            print(f"note: the run was trained with {saved_threads} CPU threads and resumes with "
                  f"{get_num_threads()}: the linear layers split their GEMMs by thread, so the "
                  f"losses will differ in the last bits from an uninterrupted run (resume with "
                  f"--threads {saved_threads} to continue it exactly)", file=sys.stderr)
        if planned_steps is not None:
            min_lr_ = cfg.lr * cfg.min_lr_ratio
            was = lr_at(cfg.schedule, start_step, cfg.lr, cfg.warmup, planned_steps, min_lr_)
            now = lr_at(cfg.schedule, start_step, cfg.lr, cfg.warmup, cfg.steps, min_lr_)
            print(f"note: the run was planned for {planned_steps} steps; its {cfg.schedule} "
                  f"learning-rate schedule (peak {cfg.lr:.2e}, warmup {cfg.warmup}) is now laid over "
                  f"{cfg.steps} steps, so at step {start_step} the lr is {now:.2e} instead of "
                  f"{was:.2e}: not the same run as one planned for {cfg.steps} steps from the start",
                  file=sys.stderr)

    tok = _tokenizer_for(meta)
    tok_files = _saveable_tokenizer(tok)  # GPT-2's vocabulary goes into every checkpoint
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
    say(f"{model!r}\ndata: {data_dir} ({meta.get('tokenizer')} tokens, {train_data.total:,} train"
        f"{'' if val_data is None else f', {val_data.total:,} val'}); {cfg.steps} steps x "
        f"{tokens_per_step:,} tokens (batch {cfg.batch_size} x seq {seq_len} x accum {cfg.grad_accum})")

    log_file = open_run_log(cfg.out, start_step if ckpt else None)
    min_lr = cfg.lr * cfg.min_lr_ratio
    losses: List[float] = []
    val_history: List[Dict[str, float]] = []
    last_val = None

    def state_now(step: int) -> Dict[str, Any]:
        return {"step": step, "tokens": tokens_seen, "loader": loader.state_dict(),
                "threads": get_num_threads(),
                "dropout_step": model.dropout_step,
                "train_config": cfg.to_dict(), "data_meta": meta, "data_dir": os.path.abspath(data_dir),
                "elapsed": elapsed_before + (time.perf_counter() - t_start), "val_loss": last_val}

    ck_path = os.path.join(cfg.out, CHECKPOINT_NAME) if cfg.checkpoint else None
    saver = Checkpointer(ck_path, lambda step: save_checkpoint(
        ck_path, model, opt, state_now(step), tokenizer=tok_files),
        lambda msg: bar.write(msg), last_saved=start_step if ckpt else None)
    checkpoint = saver.save

    def run_eval(step: int) -> None:
        nonlocal last_val
        if val_data is None:
            return
        vl = evaluate(model, val_data, cfg.batch_size, seq_len, cfg.eval_batches)
        last_val = vl
        ppl = math.exp(vl) if vl < 50 else float("inf")
        val_history.append({"step": step, "val_loss": vl, "val_ppl": ppl})
        emit(log_file, {"step": step, "val_loss": vl, "val_ppl": ppl})
        bar.write(f"step {step:>6}: val loss {vl:.4f}  perplexity {ppl:.2f}")

    bar = Progress(total=cfg.steps, desc="train", unit="step", enabled=cfg.progress, initial=start_step)
    t_start = time.perf_counter()
    step = start_step
    stopped_early = interrupted = False
    failure = None
    try:
        with StopFlag() as stop:
            if start_step == 0 and cfg.eval_every:
                run_eval(0)
            while step < cfg.steps:
                t0 = time.perf_counter()
                lr = lr_at(cfg.schedule, step, cfg.lr, cfg.warmup, cfg.steps, min_lr)
                model.zero_grad()
                loss = 0.0
                for _ in range(cfg.grad_accum):
                    x, y = loader.next()
                    micro = model.forward(x, y, loss_scale=1.0 / cfg.grad_accum)
                    loss += micro
                    if not math.isfinite(micro):
                        break
                    model.backward()
                loss /= cfg.grad_accum
                # a non-finite gradient norm makes AdamW skip the update: the weights stay good
                norm = opt.step(lr=lr, grad_clip=cfg.grad_clip or None) if math.isfinite(loss) else float("nan")
                if not math.isfinite(loss) or not math.isfinite(norm):
                    failure = diverged(model, step + 1, loss, norm, cfg.lr, saver)
                    emit(log_file, {"step": step + 1, "loss": loss, "grad_norm": norm, "lr": lr,
                                    "error": failure})
                    stopped_early = True
                    break
                step += 1
                tokens_seen += tokens_per_step
                dt = time.perf_counter() - t0
                losses.append(loss)
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                          "tokens": tokens_seen, "dt": dt, "tok_per_s": tokens_per_step / dt}
                emit(log_file, record)
                if on_step is not None:
                    on_step(record)
                bar.update(1, postfix=f"loss {loss:.4f} | {tokens_per_step / dt:,.0f} tok/s | lr {lr:.2e}")
                at_eval = cfg.eval_every and step % cfg.eval_every == 0
                if at_eval and step < cfg.steps:
                    run_eval(step)
                    checkpoint(step)
                if stop.requested or (cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps):
                    stopped_early, interrupted = True, stop.requested
                    checkpoint(step, final=True)
                    bar.write(f"stopped at step {step}; continue with --resume")
                    break
            if not stopped_early:
                if cfg.eval_every or val_data is not None:
                    run_eval(step)
                checkpoint(step, final=True)
    finally:
        bar.close()
        log_file.close()
    if failure is not None:
        raise TrainingDiverged(failure)

    summary: Dict[str, Any] = {"steps": step, "losses": losses, "val": val_history,
                               "val_loss": last_val, "out": cfg.out, "model": model,
                               "stopped_early": stopped_early, "interrupted": interrupted,
                               "elapsed": elapsed_before + time.perf_counter() - t_start}
    if not stopped_early and cfg.sample_tokens:
        prompt = cfg.prompt if cfg.prompt is not None else ("def " if meta.get("tokenizer") == "byte" else "\n")
        if tok is not None:
            prompt_ids = tok.encode(prompt) or [meta.get("eot_token", 0)]
        else:
            prompt_ids = [meta.get("eot_token", 0)]
        ids = _sample(model, prompt_ids, cfg.sample_tokens, cfg.temperature, cfg.top_k, cfg.seed)
        text = tok.decode(list(prompt_ids) + ids) if tok is not None else " ".join(map(str, ids))
        summary["sample"] = text
        say(f"\n---- sample (temperature {cfg.temperature}, top-k {cfg.top_k}) ----\n{text}\n"
            f"---- end of sample ----")
    if cfg.progress:
        msg = f"done: {step} steps in {format_duration(summary['elapsed'])}"
        if losses:
            tail = losses[-20:]
            msg += f", train loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (mean of the last {len(tail)})"
        if last_val is not None:
            msg += f", val loss {last_val:.3f}"
        if cfg.checkpoint:
            msg += f"; checkpoint in {os.path.join(cfg.out, CHECKPOINT_NAME)}"
        print(msg)
    return summary

