"""The reward model (InstructGPT step 2): a scalar head on the last token of prompt + answer,
trained on people's rankings.

    from gptcore.train.reward import train_reward, load_reward_model
    result = train_reward(data="rankings.jsonl", base="runs/sft", out="runs/rm")
    print(result["val_accuracy"])                  # held-out pair accuracy
    rm = load_reward_model("runs/rm")
    rm.score(["Q: 2+2?\\nA:"], [" 4"])             # float32 rewards, demonstrations average 0

What happens (Ouyang et al. 2022, section 3.5):

* the model is the base language model's trunk (usually the SFT model) with a
  :class:`gptcore.models.heads.LinearHead` named "reward" (one output, with bias) reading the
  final hidden state of the last token of prompt + answer + end-of-text (the sequence
  :meth:`gptcore.data.sft.SFTEncoder.sequence` makes);
* data: rankings of K answers per prompt (:mod:`gptcore.data.preference`), each the C(K, 2)
  (better, worse) pairs; a batch holds ``batch_size`` whole rankings, every answer through the
  model once, and the loss is ``-log sigmoid(r_better - r_worse)`` averaged over all pairs of
  the batch (:func:`pairwise_loss`);
* held out: ``val`` or ``val_fraction`` of the distinct prompts (all rankings of one prompt on
  one side); their pair accuracy (ties count half) and loss after every epoch;
* after training the reward is shifted so that the demonstrations (``demos``, an SFT file; by
  default the best answer of every ranking) average 0: the shift is subtracted from the head's
  bias, so the saved model outputs normalised rewards, and config.json's gptcore.task records it
  (``normalization``);
* a NaN or inf reward stops training (:class:`gptcore.train.TrainingDiverged`) and makes
  :meth:`RewardModel.score` raise; the recipe defaults (:class:`RewardConfig`) follow the paper
  at small scale: 1 epoch, AdamW, lr 3e-5 with cosine decay, no dropout.

A run writes ``log.jsonl``, ``checkpoint/`` (for ``resume=True``) and ``model/`` into ``out``;
:func:`load_reward_model` (`gptcore reward-score`) reads ``model/`` back.
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
from ..data.preference import Ranking, pair_indices, read_rankings
from ..data.sft import SFTEncoder, read_sft
from ..models.gpt import GPT
from ..models.heads import LinearHead, gather_rows, scatter_rows
from ..optim import AdamW, cosine_lr
from ..tensor import upload
from .checkpoint import CHECKPOINT_NAME, checkpoint_tokenizer
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
from .finetune import MODEL_NAME, _model_dir
from .sft import (
    TEMPLATE,
    check_common,
    check_vocab,
    held_out,
    load_base,
    tokenizer_state,
    with_dropout,
)

__all__ = ["RewardConfig", "RewardModel", "train_reward", "load_reward_model", "pairwise_loss",
           "pair_accuracy", "HEAD"]

HEAD = "reward"  # the head's name in the model and its checkpoints


def pairwise_loss(r_better, r_worse) -> Tuple[float, np.ndarray, np.ndarray]:
    """InstructGPT's reward-model loss, mean over pairs of ``-log sigmoid(r_better - r_worse)``,
    and its gradients with respect to both reward vectors (float64, the shapes of the inputs).

    Computed stably: the loss is softplus(-(d)) with d = r_better - r_worse, its derivative
    -sigmoid(-d) / n. Non-finite rewards raise ValueError."""
    rb = np.asarray(r_better, dtype=np.float64)
    rw = np.asarray(r_worse, dtype=np.float64)
    if rb.shape != rw.shape or rb.ndim != 1 or rb.size == 0:
        raise ValueError(f"r_better, r_worse: expected two non-empty 1-D arrays of one shape, got "
                         f"{rb.shape} and {rw.shape}")
    for name, r in (("r_better", rb), ("r_worse", rw)):
        if not np.isfinite(r).all():
            i = int(np.flatnonzero(~np.isfinite(r))[0])
            raise ValueError(f"{name}: reward {r[i]} at index {i} is not finite (NaN/inf rewards "
                             "mean a diverged or damaged reward model)")
    with np.errstate(over="ignore"):  # two huge finite rewards: d = +-inf, loss 0 or inf
        d = rb - rw
    n = d.size
    loss = float(np.logaddexp(0.0, -d).sum() / n)
    # sigmoid(-d) without overflow: exp(-logaddexp(0, d))
    g = -np.exp(-np.logaddexp(0.0, d)) / n
    return loss, g, -g


def pair_accuracy(r_better, r_worse) -> float:
    """The fraction of pairs the rewards order as people did (a tie counts half)."""
    rb, rw = np.asarray(r_better, np.float64), np.asarray(r_worse, np.float64)
    return float(((rb > rw) + 0.5 * (rb == rw)).mean()) if rb.size else float("nan")


# ---- the model --------------------------------------------------------------------------------


class RewardModel:
    """A GPT trunk (``.model``) with the "reward" head, its ``.tokenizer`` and its record
    (``.info``: n_ctx, eot, normalization). :meth:`score` gives one float32 reward per (prompt,
    completion); :func:`load_reward_model` reads a saved one."""

    def __init__(self, model: GPT, tokenizer, info: Dict[str, Any]):
        if HEAD not in model.heads:
            raise ValueError(f"model: has no {HEAD!r} head (expected a reward model)")
        self.model, self.tokenizer, self.info = model, tokenizer, dict(info)
        self.head = model.heads[HEAD]
        self._pending = None  # what backward needs from the last forward
        n_ctx = int(self.info.get("n_ctx") or model.config.block_size)
        self.encoder = SFTEncoder(tokenizer, min(n_ctx, model.config.block_size),
                                  eot=self.info.get("eot", -1))

    @property
    def n_ctx(self) -> int:
        return self.encoder.n_ctx

    def _batch(self, seqs: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
        """Right-padded (N, T) ids and each row's last position."""
        lengths = np.array([len(s) for s in seqs], np.int64)
        T = int(-(-lengths.max() // 16) * 16)
        T = max(min(T, self.n_ctx), int(lengths.max()))
        ids = np.full((len(seqs), T), self.encoder.pad_id, np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        return ids, lengths - 1

    def forward(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards (N,) float32 of token sequences (each read at its last token), keeping what
        :meth:`backward` needs. The model's train()/eval() mode applies."""
        ids, last = self._batch(seqs)
        h = self.model.hidden_states(ids)
        self._pending = (last, tuple(h.shape))
        return self.head.forward(gather_rows(h, last))[:, 0]

    def backward(self, dr) -> None:
        """Gradient (N,) of a loss on the last :meth:`forward`'s rewards -> parameter gradients."""
        last, shape = self._pending
        self._pending = None
        drows = self.head.backward(np.asarray(dr, np.float32).reshape(-1, 1))
        self.model.backward(dh=scatter_rows(drows, last, shape))

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 16, *,
                  progress: bool = False) -> np.ndarray:
        """Rewards (N,) float32 of token sequences (prompt + completion + end-of-text ids, at
        most ``n_ctx``), in evaluation mode (``progress``: a progress bar on stderr). A
        non-finite reward raises RuntimeError."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        seqs = [list(s) for s in seqs]
        for i, s in enumerate(seqs):
            if not 1 <= len(s) <= self.n_ctx:
                raise ValueError(f"seqs[{i}]: expected 1 to {self.n_ctx} tokens, got {len(s)}")
        out = np.zeros(len(seqs), np.float32)
        was = self.model.training
        self.model.eval()
        bar = Progress(total=len(seqs), desc="scoring", unit="answer", enabled=progress)
        try:
            order = np.argsort([len(s) for s in seqs], kind="stable")  # little padding
            for i in range(0, len(order), batch_size):
                idx = order[i: i + batch_size]
                out[idx] = self.forward([seqs[j] for j in idx])
                self._pending = None
                bar.update(len(idx))
        finally:
            bar.close()
            self.model.train(was)
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            raise RuntimeError(f"reward model: the reward of item {int(bad[0])} is {out[bad[0]]} "
                               f"({bad.size} of {len(out)} non-finite); the model's weights are "
                               "damaged or it diverged")
        return out

    def encode(self, prompt: str, completion: str, where: str = "input") -> List[int]:
        """The ids the model reads for (prompt, completion): prompt + completion + end-of-text,
        the completion cut at the end if it overflows the context (a prompt that fills the
        context is an error naming ``where``)."""
        return self.encoder.sequence(prompt, completion, where)[0]

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              batch_size: int = 16, *, progress: bool = False) -> np.ndarray:
        """Rewards of ``completions[i]`` as answers to ``prompts[i]``: float32 (N,), normalised
        (the demonstrations the model was normalised on average 0). A prompt too long for the
        context is an error naming its index; a completion that overflows is cut at the end."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise TypeError("prompts, completions: expected sequences of strings, not one string")
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"prompts, completions: expected the same length, got "
                             f"{len(prompts)} and {len(completions)}")
        for name, xs in (("prompts", prompts), ("completions", completions)):
            for i, x in enumerate(xs):
                if not isinstance(x, str):
                    raise TypeError(f"{name}[{i}]: expected str, got {type(x).__name__}")
        if not prompts:
            return np.zeros(0, np.float32)
        seqs = [self.encode(p, c, f"prompts[{i}]") for i, (p, c) in enumerate(zip(prompts, completions))]
        return self.score_ids(seqs, batch_size, progress=progress)

    def shift(self, amount: float) -> None:
        """Subtract ``amount`` from every reward (from the head's bias) and record it."""
        b = self.head.parameters()["bias"]
        new = np.asarray(b.numpy(), np.float64) - float(amount)
        b.copy_(upload(new.astype(np.float32), b.device, b.dtype))
        norm = dict(self.info.get("normalization") or {})
        norm["shift"] = float(norm.get("shift", 0.0)) + float(amount)
        self.info["normalization"] = norm

    def save(self, path, optimizer=None, state: Optional[Dict[str, Any]] = None) -> None:
        """Write the model (weights, the head in gptcore's layout), its tokenizer and its record
        (config.json's gptcore.task), atomically; ``optimizer``/``state`` for resuming."""
        files, tok_state = tokenizer_state(self.tokenizer)
        st = {**tok_state, **(state or {})}
        gio.save_pretrained(self.model, path, optimizer=optimizer, tokenizer=files,
                            step=st.get("step"), state=st, task_config=self.info)

    def __repr__(self) -> str:
        return f"RewardModel(n_ctx={self.n_ctx}, {self.model!r})"


def load_reward_model(path, device: str = "cpu") -> RewardModel:
    """A reward model from a `gptcore reward-train` output directory (or its model/ or
    checkpoint/ directory). A checkpoint without the reward head and record raises ValueError."""
    path = _model_dir(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"reward model {path!r}: no such directory")
    model = gio.load_pretrained(path, device=device)
    info = gio.load_task_config(path)
    if HEAD not in model.heads or info.get("task") != "reward":
        raise ValueError(f"{path!r} is not a reward model (no {HEAD!r} head and reward record in "
                         "config.json's gptcore.task); train one with `gptcore reward-train`")
    tok = checkpoint_tokenizer(path, model.config.vocab_size)
    return RewardModel(model, tok, info)


# ---- training ---------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """A reward-model run. ``data``/``val``: rankings JSONL (gptcore.data.preference) or lists
    of Ranking; ``base``: the language model to start from (an SFT run or model directory, or a
    (GPT, tokenizer) pair in memory, not modified); ``demos``: an SFT JSONL whose demonstrations
    the reward is normalised on (default: the best answer of every ranking)."""

    data: Any = None
    val: Any = None
    val_fraction: float = 0.1  # of the distinct prompts, when ``val`` is None (0: none)
    base: Any = None
    demos: Any = None
    out: Optional[str] = "gptcore-reward"
    lr: float = 3e-5
    min_lr: float = 0.0
    batch_size: int = 8  # rankings (prompts) per step; all their answers in the one batch
    epochs: int = 1
    warmup: float = 0.03
    dropout: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    n_ctx: Optional[int] = None
    eval_every: Optional[int] = None
    seed: int = 42
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False
    stop_after: Optional[int] = None
    threads: Optional[int] = None
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("data", "val", "base", "demos"):
            if d[k] is not None:
                d[k] = os.fspath(d[k]) if isinstance(d[k], (str, os.PathLike)) else "<memory>"
        return d




def _rankings(source, what: str) -> List[Ranking]:
    if isinstance(source, (str, os.PathLike)):
        return read_rankings(source)
    if source is None:
        raise ValueError(f"{what}: expected a JSONL file of rankings")
    out = list(source)
    if not out or not all(isinstance(r, Ranking) for r in out):
        raise TypeError(f"{what}: expected a JSONL path or a non-empty list of Ranking")
    return out


def _split_by_prompt(rankings: List[Ranking], fraction: float, seed: int):
    """(train, held-out): ``fraction`` of the distinct prompts, all their rankings together."""
    prompts = sorted({r.prompt for r in rankings})
    held = {prompts[i] for i in held_out(len(prompts), fraction, seed)[1]}
    return ([r for r in rankings if r.prompt not in held], [r for r in rankings if r.prompt in held])


def _encode_all(rm: RewardModel, rankings: List[Ranking]) -> Tuple[List[List[List[int]]], int]:
    """Each ranking's answers as token sequences, and how many were cut to the context."""
    out, cut = [], 0
    for r in rankings:
        seqs = []
        for i, a in enumerate(r.answers):
            ids, c = rm.encoder.sequence(r.prompt, a, r.where)
            seqs.append(ids)
            cut += c
        out.append(seqs)
    return out, cut


def _where_of(rankings: List[Ranking], encoded: List[List[List[int]]], i: int) -> str:
    """The line of the i-th answer of the flattened rankings."""
    for r, answers in zip(rankings, encoded):
        if i < len(answers):
            return r.where
        i -= len(answers)
    return "?"


def _pairs_of(encoded: List[List[List[int]]]) -> Tuple[List[List[int]], np.ndarray, np.ndarray]:
    """Flatten rankings: all sequences, and the global (better, worse) indices of their pairs."""
    seqs, ib, iw = [], [], []
    for answers in encoded:
        base = len(seqs)
        seqs += answers
        for i, j in pair_indices(len(answers)):
            ib.append(base + i)
            iw.append(base + j)
    return seqs, np.asarray(ib, np.int64), np.asarray(iw, np.int64)


def evaluate_rankings(rm: RewardModel, encoded: List[List[List[int]]],
                      batch_size: int = 16) -> Dict[str, float]:
    """Pair accuracy and mean pairwise loss of ``rm`` on encoded rankings (evaluation mode)."""
    seqs, ib, iw = _pairs_of(encoded)
    r = rm.score_ids(seqs, batch_size)
    return {"accuracy": pair_accuracy(r[ib], r[iw]), "loss": pairwise_loss(r[ib], r[iw])[0],
            "pairs": int(ib.size)}


def loss_and_backward(rm: RewardModel, seqs: Sequence[Sequence[int]], ib: np.ndarray,
                      iw: np.ndarray) -> Tuple[float, np.ndarray]:
    """One training step's forward and backward: every sequence through the model once, the
    pairwise loss over the (better, worse) index pairs ``ib``/``iw``, gradients accumulated.
    Returns (loss, rewards); the loss is NaN (and nothing is sent back) when a reward is not
    finite."""
    r = rm.forward(seqs).astype(np.float64)
    if not np.isfinite(r).all():
        rm._pending = None
        return float("nan"), r
    loss, db, dw = pairwise_loss(r[ib], r[iw])
    dr = np.zeros(len(seqs))
    np.add.at(dr, ib, db)  # an answer in several pairs sums their gradients
    np.add.at(dr, iw, dw)
    rm.backward(dr)
    return loss, r


def _new_reward_model(trunk: GPT, tok, cfg: RewardConfig, info: Dict[str, Any],
                      state: Optional[Dict[str, np.ndarray]] = None) -> RewardModel:
    model = with_dropout(trunk, cfg.dropout, cfg.seed)
    model.add_head(LinearHead(model.config.n_embd, 1, HEAD, bias=True, seed=cfg.seed,
                              device=model.device, dtype=model.dtype))
    if state is not None:  # resuming: the trunk and head of the checkpoint
        model.load_state_dict(state)
    return RewardModel(model.train(), tok, info)


def train_reward(cfg: Optional[RewardConfig] = None, **kwargs) -> Dict[str, Any]:
    """Train a reward model on rankings; returns a summary: "model" (the normalised
    :class:`RewardModel`), "steps", "losses" and "accuracies" (per step, on the training
    batch), "val" (records), "val_accuracy" and "val_loss" (held-out pairs, the last
    evaluation; None without held-out data), "normalization", "truncated", "pairs_per_s",
    "elapsed", "stopped_early", "interrupted", "out".

    ``cfg`` or keyword arguments (:class:`RewardConfig`'s fields); keywords override ``cfg``.
    """
    if cfg is None:
        cfg = RewardConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if not isinstance(cfg, RewardConfig):
        raise TypeError(f"cfg: expected a RewardConfig, got {type(cfg).__name__}")
    check_common(cfg)
    ckpt = None
    if cfg.resume:
        cfg, ckpt = resumed_config(cfg, "reward_config", "gptcore reward-train",
                                   given_again=("data", "val", "demos"))
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *a, **k: None)

    # everything is read and checked before anything is written
    if cfg.out and not cfg.resume and not cfg.overwrite:
        refuse_existing_run(cfg.out, ("log.jsonl", CHECKPOINT_NAME, MODEL_NAME))
    rankings = _rankings(cfg.data, "data")
    if cfg.val is not None:
        train_r, val_r = rankings, _rankings(cfg.val, "val")
    else:
        train_r, val_r = _split_by_prompt(rankings, cfg.val_fraction, cfg.seed)
    if cfg.demos is not None:
        demos = read_sft(cfg.demos) if isinstance(cfg.demos, (str, os.PathLike)) else list(cfg.demos)
        norm_on = ([d.prompt for d in demos], [d.completion for d in demos])
        norm_source = "demos"
    else:
        every = train_r + val_r
        norm_on = ([r.prompt for r in every], [r.answers[0] for r in every])
        norm_source = "chosen"
    if ckpt is not None:
        loaded = load_reward_model(os.path.join(cfg.out, CHECKPOINT_NAME), cfg.device)
        rm = _new_reward_model(loaded.model, loaded.tokenizer, cfg, loaded.info,
                               state=loaded.model.state_dict())
    else:
        if cfg.base is None:
            raise ValueError("base: expected the language model to start from (--base)")
        trunk, tok = load_base(cfg.base, cfg.device)
        n_ctx = min(cfg.n_ctx or trunk.config.block_size, trunk.config.block_size)
        eot = SFTEncoder(tok, n_ctx).eot
        info = {"task": "reward", "head": HEAD, "template": TEMPLATE, "n_ctx": n_ctx, "eot": eot}
        rm = _new_reward_model(trunk, tok, cfg, info)
    model = rm.model
    train_enc, cut_train = _encode_all(rm, train_r)
    val_enc, cut_val = _encode_all(rm, val_r)
    cut = {"train": cut_train, "val": cut_val}
    for rs, enc in ((train_r, train_enc), (val_r, val_enc)):
        check_vocab([s for a in enc for s in a], model.config.vocab_size,
                    lambda i, rs=rs, enc=enc: _where_of(rs, enc, i))
    for i, (p, c) in enumerate(zip(*norm_on)):  # the demonstrations must fit too
        rm.encode(p, c, f"demos[{i}]")
    n = len(train_enc)
    longest = max(len(s) for enc in train_enc for s in enc)

    opt = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, seed=cfg.seed)
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
    check_memory(model.config, cfg.batch_size * max(len(a) for a in train_enc), longest,
                 model.dtype, model.device, what="this reward-model run")
    log_file = open_run_log(cfg.out, step if ckpt is not None else None) if cfg.out else None
    n_pairs = sum(len(pair_indices(len(a))) for a in train_enc)
    emit(log_file, {"step": step, "train_rankings": n, "train_pairs": n_pairs,
                     "val_rankings": len(val_enc), **{f"truncated_{k}": v for k, v in cut.items()},
                     "n_ctx": rm.n_ctx})
    say(f"{model!r}\nreward model: {n} rankings ({n_pairs} pairs) to train on, {len(val_enc)} "
        f"held out; {cfg.epochs} epoch(s) x {per_epoch} steps of {cfg.batch_size} rankings; "
        f"lr {cfg.lr:g}")
    losses: List[float] = []
    accs: List[float] = []
    history: List[Dict[str, Any]] = []
    pairs_done = 0
    t_start = time.perf_counter()

    def state_now() -> Dict[str, Any]:
        return {"step": step, "dropout_step": model.dropout_step, "reward_config": cfg.to_dict(),
                "truncated": cut, "elapsed": elapsed_before + time.perf_counter() - t_start}

    saver = Checkpointer(os.path.join(cfg.out, CHECKPOINT_NAME) if cfg.out else None,
                         lambda _: rm.save(saver.path, optimizer=opt, state=state_now()),
                         lambda msg: bar.write(msg), last_saved=step if ckpt is not None else None)

    def validate(epoch: int) -> None:
        if not val_enc:
            return
        m = evaluate_rankings(rm, val_enc, 16)
        rec = {"step": step, "epoch": epoch, "val_accuracy": m["accuracy"], "val_loss": m["loss"],
               "val_pairs": m["pairs"]}
        history.append(rec)
        emit(log_file, rec)
        if cfg.progress:
            bar.write(f"step {step} (epoch {epoch}): held-out pair accuracy {m['accuracy']:.4f}, "
                      f"loss {m['loss']:.4f} ({m['pairs']} pairs)")

    bar = Progress(total=total, desc="reward model", unit="step", enabled=cfg.progress,
                   initial=step)
    stopped = interrupted = False
    failure = None
    try:
        with StopFlag() as stop:
            while step < total:
                epoch, pos = divmod(step, per_epoch)
                order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
                idx = order[pos * cfg.batch_size: (pos + 1) * cfg.batch_size]
                seqs, ib, iw = _pairs_of([train_enc[i] for i in idx])
                t0 = time.perf_counter()
                lr = cosine_lr(step, cfg.lr, warmup, total, cfg.min_lr)
                model.zero_grad()
                loss, r = loss_and_backward(rm, seqs, ib, iw)
                norm = float("nan")
                if math.isfinite(loss):
                    norm = opt.step(lr=lr, grad_clip=cfg.grad_clip or None)
                if not math.isfinite(loss) or not math.isfinite(norm):
                    failure = diverged(model, step + 1, loss, norm, cfg.lr, saver)
                    if not np.isfinite(r).all():
                        failure = f"a reward is NaN/inf, so {failure}"
                    emit(log_file, {"step": step + 1, "loss": loss, "grad_norm": norm,
                                    "error": failure})
                    stopped = True
                    break
                step += 1
                dt = time.perf_counter() - t0
                acc = pair_accuracy(r[ib], r[iw])
                losses.append(loss)
                accs.append(acc)
                pairs_done += ib.size
                emit(log_file, {"step": step, "epoch": epoch, "loss": loss, "accuracy": acc,
                                "lr": lr, "grad_norm": norm, "pairs": int(ib.size),
                                "pairs_per_s": ib.size / dt})
                bar.update(1, postfix=f"loss {loss:.4f} acc {acc:.2f} | {ib.size / dt:,.0f} pairs/s")
                if after_update(step, epoch, per_epoch, total, validate, saver, stop, bar,
                                cfg.eval_every, cfg.stop_after):
                    stopped, interrupted = True, stop.requested
                    break
            if not stopped:
                # normalise: the demonstrations' mean reward becomes 0 (a shift of the bias)
                mean = float(rm.score(*norm_on, progress=cfg.progress).astype(np.float64).mean())
                rm.shift(mean)
                rm.info["normalization"].update(source=norm_source, n=len(norm_on[0]))
                emit(log_file, {"step": step, "normalization_shift": rm.info["normalization"]["shift"],
                                "normalized_on": norm_source, "normalized_n": len(norm_on[0])})
                saver.save(step, final=True)
                if cfg.out:
                    rm.save(os.path.join(cfg.out, MODEL_NAME), state=state_now())
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
        say(f"note: answers cut to the context of {rm.n_ctx} tokens: "
            + ", ".join(f"{v} of {k}" for k, v in cut.items()))
    last = history[-1] if history else {}
    if cfg.progress and not stopped:
        where = f"; model in {os.path.join(cfg.out, MODEL_NAME)}" if cfg.out else ""
        acc = f", held-out pair accuracy {last['val_accuracy']:.4f}" if last else ""
        say(f"done: {step} steps in {format_duration(elapsed)}{acc}{where}")
    return {"model": rm, "steps": step, "losses": losses, "accuracies": accs, "val": history,
            "val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss"),
            "normalization": rm.info.get("normalization"), "truncated": cut,
            "pairs_per_s": pairs_done / run_time if run_time > 0 else None,
            "elapsed": elapsed, "stopped_early": stopped, "interrupted": interrupted,
            "out": cfg.out}
