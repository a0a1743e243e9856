"""Supervised instruction tuning (InstructGPT step 1): a language model fine-tuned on
demonstrations, the loss on the completion tokens only.

    from gptcore.train.sft import sft
    result = sft(data="demos.jsonl", base="gptcore-run", out="runs/sft")
    model, tok = result["model"], result["tokenizer"]        # a GPT and its tokenizer

Data, template, tokenisation and batching: :mod:`gptcore.data.sft` (prompt/completion or
multi-turn messages; each row of a batch holds one example right-padded with ignored targets,
batches drawn from pools of similar length; no packing, because the attention kernel has no
block-diagonal mask). The loss is the mean cross-entropy over the trained (completion) tokens of
the batch: the model's fused LM loss with every other target set to -1.

The recipe (:class:`SFTConfig`, all overridable): AdamW (0.9, 0.95), lr 5e-5 with a linear
warmup over 3% of the steps and cosine decay to 0 (InstructGPT used cosine decay), batch 16
examples, 2 epochs, dropout 0.1, gradient clipping at 1.0. Validation: the held-out examples'
loss (``val``, or ``val_fraction`` of ``data`` held out by a seeded draw) after every epoch and
every ``eval_every`` steps.

A run writes into ``out``: ``log.jsonl``, ``checkpoint/`` (model, optimizer, position; replaced
atomically after every epoch, at the end, and when stopped with Ctrl-C or ``stop_after``) for
``resume=True``, which continues exactly, and ``model/``: the tuned model with its tokenizer,
which ``GPT.from_pretrained``, `gptcore sample --checkpoint` and `gptcore reward-train --base`
read. config.json's gptcore.task records ``{"task": "sft", "template": ..., "eot": ...}``.
Everything is read and checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import io as gio
from .._progress import Progress, format_duration
from ..data.prepare import ByteTokenizer
from ..data.sft import (
    EncodedExample,
    SFTEncoder,
    SFTExample,
    collate_sft,
    length_batches,
    read_sft,
)
from ..models.gpt import GPT
from ..optim import AdamW, cosine_lr
from .checkpoint import CHECKPOINT_NAME, _saveable_tokenizer
from ._run import (
    Checkpointer,
    after_update,
    StopFlag,
    TrainingDiverged,
    check_memory,
    diverged,
    emit,
    open_run_log,
    refuse_existing_run,
    resumed_config,
)
from .finetune import MODEL_NAME, _base_model, _model_dir

__all__ = ["SFTConfig", "sft", "TEMPLATE", "MODEL_NAME"]

TEMPLATE = "gptcore-chat-1"  # gptcore.data.sft's template, as the model directory records it


@dataclass
class SFTConfig:
    """An SFT run. ``data``/``val``: JSONL files (gptcore.data.sft) or lists of SFTExample;
    ``base``: the pre-trained model (a `gptcore train` run directory, a gptcore/transformers
    GPT-2 directory, an llm.c .bin) or a (GPT, tokenizer) pair in memory (not modified)."""

    data: Any = None
    val: Any = None
    val_fraction: float = 0.05  # held out of ``data`` when ``val`` is None (0: no validation)
    base: Any = None
    out: Optional[str] = "gptcore-sft"  # None: write nothing
    lr: float = 5e-5
    min_lr: float = 0.0
    batch_size: int = 16
    epochs: int = 2
    warmup: float = 0.03  # fraction of all steps
    dropout: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    n_ctx: Optional[int] = None  # default: the model's block_size
    eval_every: Optional[int] = None  # steps between validations (besides every epoch's end)
    seed: int = 42
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False
    stop_after: Optional[int] = None
    threads: Optional[int] = None
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        """The settings as JSON values (data in memory recorded as "<memory>")."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("data", "val", "base"):
            if d[k] is not None and not isinstance(d[k], (str, os.PathLike)):
                d[k] = "<memory>"
            elif d[k] is not None:
                d[k] = os.fspath(d[k])
        return d




def _check_int(name: str, v, low: int, optional: bool = False) -> None:
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")


def _check_number(name: str, v, lo: float, hi: Optional[float] = None) -> None:
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo
            or (hi is not None and v >= hi)):
        want = f"a number in [{lo:g}, {hi:g})" if hi is not None else f"a finite number >= {lo:g}"
        raise ValueError(f"{name}: expected {want}, got {v!r}")


def check_common(cfg) -> None:
    """The settings SFT and reward-model runs share."""
    _check_int("batch_size", cfg.batch_size, 1)
    _check_int("epochs", cfg.epochs, 1)
    _check_int("n_ctx", cfg.n_ctx, 2, optional=True)
    _check_int("stop_after", cfg.stop_after, 1, optional=True)
    _check_int("eval_every", cfg.eval_every, 1, optional=True)
    _check_int("threads", cfg.threads, 1, optional=True)
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps"):
        _check_number(name, getattr(cfg, name), 0.0)
    for name in ("warmup", "dropout", "beta1", "beta2", "val_fraction"):
        _check_number(name, getattr(cfg, name), 0.0, 1.0)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)):
        raise ValueError(f"seed: expected an int, got {cfg.seed!r}")
    if cfg.resume and not cfg.out:
        raise ValueError("resume: needs out (the run directory to continue)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite: a run is either continued or replaced, not both")


# ---- models and tokenizers (shared with gptcore.train.reward) -------------------------------


def with_dropout(model: GPT, p: float, seed: int) -> GPT:
    """A copy of ``model`` (its trunk, no heads) whose config has dropout ``p`` everywhere."""
    cfg = dataclasses.replace(model.config, embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    out = GPT(cfg, device=model.device, dtype=model.dtype, seed=seed, init=False)
    state = {k: v for k, v in model.state_dict().items()
             if k.split(".", 1)[0] not in model.heads}
    out.load_state_dict(state)
    return out


def load_base(source, device: str) -> Tuple[GPT, Any]:
    """(model, tokenizer) of a language model: a (GPT, tokenizer) pair, a checkpoint path (a
    `gptcore train`/`sft` run directory, a model directory, an llm.c .bin). A model with task
    heads (a reward model, a classifier) is refused."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], GPT):
        if source[0].heads:
            raise ValueError(f"base: the model has head(s) {sorted(source[0].heads)}; expected a "
                             "language model")
        model, tok, _ = _base_model(source, device)
        return model, tok
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError("base: expected the pre-trained model's directory (or file), or a "
                         f"(GPT, tokenizer) pair, got {type(source).__name__}")
    path = _model_dir(os.fspath(source))  # a run directory: its model/ or checkpoint/
    model, tok, _ = _base_model(path, device)
    return model, tok


def tokenizer_state(tok) -> Tuple[Any, Dict[str, Any]]:
    """(files to save, trainer-state entry) that make a saved model's tokenizer findable by
    :func:`gptcore.train.checkpoint.checkpoint_tokenizer`, as `gptcore train` records it: a
    BPE's files, and the name of the byte-level tokenizer."""
    meta = {"tokenizer": "byte"} if isinstance(tok, ByteTokenizer) else {}
    return _saveable_tokenizer(tok), {"data_meta": meta} if meta else {}


def check_vocab(seqs, vocab_size: int, where) -> None:
    """Refuse, before training, token ids the model's vocabulary lacks (a tokenizer that does
    not belong to the model); ``where(i)`` names sequence i."""
    for i, s in enumerate(seqs):
        if len(s) and int(np.max(s)) >= vocab_size:
            raise ValueError(f"{where(i)}: token id {int(np.max(s))} is outside the model's "
                             f"vocabulary of {vocab_size}: the tokenizer does not belong to the "
                             "model")


def _examples(source, what: str) -> List[SFTExample]:
    if isinstance(source, (str, os.PathLike)):
        return read_sft(source)
    if source is None:
        raise ValueError(f"{what}: expected a JSONL file of demonstrations")
    out = list(source)
    if not out or not all(isinstance(e, SFTExample) for e in out):
        raise TypeError(f"{what}: expected a JSONL path or a non-empty list of SFTExample")
    return out


def held_out(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: ``fraction`` of n (at least 1 when fraction > 0 and n >= 2)
    drawn with ``seed``."""
    k = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng([int(seed), 7919]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


# ---- the loop ---------------------------------------------------------------------------------


def _val_loss(model: GPT, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int,
              n_ctx: int) -> float:
    """Mean cross-entropy over the trained tokens of all ``encoded`` examples (eval mode)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        order = np.argsort([len(e.ids) for e in encoded], kind="stable")
        for i in range(0, len(order), batch_size):
            b = collate_sft([encoded[j] for j in order[i: i + batch_size]], pad_id, max_len=n_ctx)
            if b.n_trained:
                total += model.loss(b.ids, b.targets) * b.n_trained
                count += b.n_trained
    finally:
        model.train(was)
    return total / count if count else float("nan")


def sft(cfg: Optional[SFTConfig] = None, **kwargs) -> Dict[str, Any]:
    """Fine-tune a language model on demonstrations (loss on completion tokens only); returns a
    summary: "model" (the tuned GPT, in eval mode), "tokenizer", "steps", "losses" (per step),
    "val" (validation records), "val_loss" (the last one, or None), "truncated" (examples cut
    to the context), "fill" (real tokens / padded positions over the run), "tokens_per_s"
    (trained tokens a second), "elapsed", "stopped_early", "interrupted", "out".

    ``cfg`` or keyword arguments (:class:`SFTConfig`'s fields); keywords override ``cfg``.
    """
    if cfg is None:
        cfg = SFTConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if not isinstance(cfg, SFTConfig):
        raise TypeError(f"cfg: expected an SFTConfig, got {type(cfg).__name__}")
    check_common(cfg)
    ckpt = None
    if cfg.resume:
        # (data given in memory must be given again)
        cfg, ckpt = resumed_config(cfg, "sft_config", "gptcore sft", given_again=("data", "val"))
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *a, **k: None)

    # everything is read and checked before anything is written
    if cfg.out and not cfg.resume and not cfg.overwrite:
        refuse_existing_run(cfg.out, ("log.jsonl", CHECKPOINT_NAME, MODEL_NAME))
    examples = _examples(cfg.data, "data")
    if cfg.val is not None:
        train_ex, val_ex = examples, _examples(cfg.val, "val")
    else:
        tr, va = held_out(len(examples), cfg.val_fraction, cfg.seed)
        train_ex, val_ex = [examples[i] for i in tr], [examples[i] for i in va]
    if ckpt is not None:
        base_path = os.path.join(cfg.out, CHECKPOINT_NAME)
        model, tok = load_base(base_path, cfg.device)
    else:
        if cfg.base is None:
            raise ValueError("base: expected the pre-trained model to tune (--base)")
        model, tok = load_base(cfg.base, cfg.device)
    model = with_dropout(model, cfg.dropout, cfg.seed).train()
    n_ctx = min(cfg.n_ctx or model.config.block_size, model.config.block_size)
    enc = SFTEncoder(tok, n_ctx)
    train_enc = [enc.encode(e) for e in train_ex]
    val_enc = [enc.encode(e) for e in val_ex]
    cut = {"train": sum(e.truncated for e in train_enc), "val": sum(e.truncated for e in val_enc)}
    V = model.config.vocab_size
    check_vocab([e.ids for e in train_enc], V, lambda i: train_enc[i].where)
    check_vocab([e.ids for e in val_enc], V, lambda i: val_enc[i].where)
    lengths = [len(e.ids) - 1 for e in train_enc]

    opt = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, seed=cfg.seed)
    n = len(train_enc)
    per_epoch = -(-n // cfg.batch_size)
    total = per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup * total))
    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        st = ckpt["state"]
        step, elapsed_before = int(st["step"]), float(st.get("elapsed", 0.0))
        model.dropout_step = int(st["dropout_step"])
        say(f"Resumed from {os.path.join(cfg.out, CHECKPOINT_NAME)} at step {step} of {total}")
    check_memory(model.config, cfg.batch_size, max(lengths), model.dtype, model.device,
                 what="this SFT run")
    files, tok_state = tokenizer_state(tok)
    info = {"task": "sft", "template": TEMPLATE, "eot": enc.eot, "n_ctx": n_ctx}
    log_file = open_run_log(cfg.out, step if ckpt is not None else None) if cfg.out else None
    emit(log_file, {"step": step, "train_examples": n, "val_examples": len(val_enc),
                     **{f"truncated_{k}": v for k, v in cut.items()}, "n_ctx": n_ctx})
    say(f"{model!r}\nsft: {n} train examples, {len(val_enc)} held out; {cfg.epochs} epochs x "
        f"{per_epoch} steps of {cfg.batch_size}; lr {cfg.lr:g}")
    losses: List[float] = []
    history: List[Dict[str, Any]] = []
    real = padded = trained_tokens = 0
    t_start = time.perf_counter()

    def state_now() -> Dict[str, Any]:
        return {"step": step, "dropout_step": model.dropout_step, "sft_config": cfg.to_dict(),
                "truncated": cut, "elapsed": elapsed_before + time.perf_counter() - t_start,
                **tok_state}

    def save(path, optimizer=None) -> None:
        gio.save_pretrained(model, path, optimizer=optimizer, tokenizer=files, step=step,
                            state=state_now(), task_config=info)

    saver = Checkpointer(os.path.join(cfg.out, CHECKPOINT_NAME) if cfg.out else None,
                         lambda _: save(saver.path, opt), lambda msg: bar.write(msg),
                         last_saved=step if ckpt is not None else None)

    def validate(epoch: int) -> None:
        if not val_enc:
            return
        v = _val_loss(model, val_enc, enc.pad_id, cfg.batch_size, n_ctx)
        rec = {"step": step, "epoch": epoch, "val_loss": v}
        history.append(rec)
        emit(log_file, rec)
        if cfg.progress:
            bar.write(f"step {step} (epoch {epoch}): val loss {v:.4f}")

    bar = Progress(total=total, desc="sft", unit="step", enabled=cfg.progress, initial=step)
    stopped = interrupted = False
    failure = None
    batches: Tuple[int, List[np.ndarray]] = (-1, [])  # (epoch, that epoch's batches)
    try:
        with StopFlag() as stop:
            while step < total:
                epoch, pos = divmod(step, per_epoch)
                if batches[0] != epoch:
                    batches = (epoch, length_batches(lengths, cfg.batch_size, cfg.seed, epoch))
                idx = batches[1][pos]
                batch = collate_sft([train_enc[i] for i in idx], enc.pad_id, max_len=n_ctx)
                t0 = time.perf_counter()
                lr = cosine_lr(step, cfg.lr, warmup, total, cfg.min_lr)
                model.zero_grad()
                loss = model.forward(batch.ids, batch.targets)
                norm = float("nan")
                if math.isfinite(loss):
                    model.backward()
                    norm = opt.step(lr=lr, grad_clip=cfg.grad_clip or None)
                if not math.isfinite(loss) or not math.isfinite(norm):
                    failure = diverged(model, step + 1, loss, norm, cfg.lr, saver)
                    emit(log_file, {"step": step + 1, "loss": loss, "grad_norm": norm,
                                    "error": failure})
                    stopped = True
                    break
                step += 1
                dt = time.perf_counter() - t0
                losses.append(loss)
                real += int(batch.lengths.sum())
                padded += batch.ids.size
                trained_tokens += batch.n_trained
                emit(log_file, {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                                "grad_norm": norm, "trained_tokens": batch.n_trained,
                                "fill": batch.fill, "tokens_per_s": batch.n_trained / dt})
                bar.update(1, postfix=f"loss {loss:.4f} | {batch.n_trained / dt:,.0f} tok/s")
                if after_update(step, epoch, per_epoch, total, validate, saver, stop, bar,
                                cfg.eval_every, cfg.stop_after):
                    stopped, interrupted = True, stop.requested
                    break
            if not stopped:
                saver.save(step, final=True)
                if cfg.out:
                    save(os.path.join(cfg.out, MODEL_NAME))
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if failure is not None:
        raise TrainingDiverged(failure)
    model.eval()
    elapsed = elapsed_before + time.perf_counter() - t_start
    run_time = time.perf_counter() - t_start
    if any(cut.values()):
        say(f"note: examples longer than n_ctx {n_ctx} + 1 tokens were cut: "
            + ", ".join(f"{v} of {k}" for k, v in cut.items()))
    if cfg.progress and not stopped:
        where = f"; model in {os.path.join(cfg.out, MODEL_NAME)}" if cfg.out else ""
        last = f", val loss {history[-1]['val_loss']:.4f}" if history else ""
        say(f"done: {step} steps in {format_duration(elapsed)}{last}{where}")
    return {"model": model, "tokenizer": tok, "steps": step, "losses": losses, "val": history,
            "val_loss": history[-1]["val_loss"] if history else None, "truncated": cut,
            "fill": real / padded if padded else None,
            "tokens_per_s": trained_tokens / run_time if run_time > 0 else None,
            "elapsed": elapsed, "stopped_early": stopped, "interrupted": interrupted,
            "out": cfg.out}
