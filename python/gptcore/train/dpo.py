"""Direct Preference Optimization (Rafailov et al. 2023): the policy learns from preference pairs
directly, with no reward model and no sampling.

    from gptcore.train.dpo import dpo
    result = dpo(data="pairs.jsonl", policy="runs/sft", out="runs/dpo", beta=0.1)

For a prompt x with a chosen answer y_w and a rejected one y_l:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with log-probabilities summed over the completion's tokens (:mod:`gptcore.train._logprobs`; a
completion ends with the end-of-text token, as SFT trained it) and ``ref`` a frozen copy of the
starting policy (or another checkpoint of the same vocabulary). ``beta * (log pi - log ref)`` is
the *implicit reward* of an answer; a step logs the mean implicit rewards of the chosen and
rejected answers, their margin, and the accuracy (how often the chosen one's is higher).

* Data: JSONL of pairs ``{"prompt", "chosen", "rejected"}`` and/or rankings ``{"prompt",
  "ranked": [best, ..., worst]}`` (each expanded to its C(K, 2) pairs) through
  :mod:`gptcore.data.preference`, or those pairs in memory.
* Each step runs the chosen and rejected answers of ``batch_size`` pairs through the policy as one
  batch (2 x batch_size rows), and through the reference, unless ``precompute_ref`` scored every
  pair once up front (then the reference is released before training).
* Dropout is off (the policy and the reference score alike); AdamW (beta2 0.999, no weight
  decay), linear warmup then a constant rate as the paper's recipe, gradient clipping 1.0.

A run writes into ``out``: ``log.jsonl`` (one record per step, one per validation) and
``model/`` at the end (or when stopped with Ctrl-C): the tuned policy with its tokenizer. There is
no resume: a DPO run is short; start again from ``model/`` if needed.
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
from ..data.preference import PreferencePair, parse_ranking, ranking_pairs, read_rankings
from ..optim import AdamW
from ._logprobs import Policy, SequenceBatch, TextEncoder, load_policy, load_reference, pack
from ._run import StopFlag, TrainingDiverged, check_memory, diverged, emit, open_run_log, refuse_existing_run
from .checkpoint import _saveable_tokenizer

__all__ = ["DPOConfig", "dpo", "dpo_loss", "load_pairs", "MODEL_NAME"]

MODEL_NAME = "model"


@dataclass
class DPOConfig:
    """A DPO run. ``data``/``val``: JSONL paths of pairs and/or rankings, or lists of pairs
    (PreferencePair or dicts); ``policy``: the SFT checkpoint; ``ref``: the reference checkpoint
    (default: the policy's)."""

    data: Any = None
    val: Any = None
    policy: Optional[str] = None
    ref: Optional[str] = None
    out: Optional[str] = "gptcore-dpo"  # None: write nothing
    beta: float = 0.1
    lr: float = 5e-5
    warmup: int = 10  # steps of linear warmup, then constant
    batch_size: int = 8  # pairs per step
    epochs: int = 1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    precompute_ref: bool = False
    val_every: int = 0  # validate every this many steps (0: at the end of each epoch only)
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    stop_after: Optional[int] = None
    threads: Optional[int] = None
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("data", "val"):
            if d[k] is not None and not isinstance(d[k], (str, os.PathLike)):
                d[k] = f"<{len(d[k])} pairs in memory>"
            elif d[k] is not None:
                d[k] = os.fspath(d[k])
        return d


def _check_config(cfg: DPOConfig) -> None:
    for name in ("batch_size", "epochs"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    for name in ("warmup", "val_every"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    for name in ("beta", "lr", "weight_decay", "grad_clip"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if cfg.beta == 0:
        raise ValueError("beta: expected > 0 (the strength of the KL leash)")
    for name in ("beta1", "beta2"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
    if cfg.stop_after is not None and (isinstance(cfg.stop_after, bool)
                                       or not isinstance(cfg.stop_after, int) or cfg.stop_after < 1):
        raise ValueError(f"stop_after: expected an int >= 1, got {cfg.stop_after!r}")


# ---- the loss ----------------------------------------------------------------------------------


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta: float = 0.1) -> Tuple[float, np.ndarray, np.ndarray]:
    """Mean DPO loss over N pairs of sequence log-probs (each (N,)) and its gradients with
    respect to ``pi_w`` and ``pi_l``: ``(loss, d_pi_w, d_pi_l)``.

    z = beta * ((pi_w - ref_w) - (pi_l - ref_l)); loss = mean(-log sigmoid(z)) = mean(softplus(-z));
    d loss / d z = -sigmoid(-z) / N, so d_pi_w = beta * that and d_pi_l = -d_pi_w."""
    arrs = [np.asarray(a, np.float64) for a in (pi_w, pi_l, ref_w, ref_l)]
    if any(a.shape != arrs[0].shape or a.ndim != 1 for a in arrs) or arrs[0].size == 0:
        raise ValueError(f"pi_w, pi_l, ref_w, ref_l: expected four (N,) arrays of one shape, got "
                         f"{[a.shape for a in arrs]}")
    pw, pl, rw, rl = arrs
    z = beta * ((pw - rw) - (pl - rl))
    n = z.size
    loss = float(np.logaddexp(0.0, -z).mean())  # softplus(-z), stable for any z
    dz = -0.5 * (1.0 - np.tanh(z / 2.0)) / n  # -sigmoid(-z) / n, stable
    return loss, beta * dz, -beta * dz


# ---- data --------------------------------------------------------------------------------------


def load_pairs(source, what: str = "data") -> List[PreferencePair]:
    """Preference pairs from a JSONL file of pairs and/or rankings (rankings expanded to their
    C(K, 2) pairs), or from a list of PreferencePair / dicts in either format."""
    if source is None:
        raise ValueError(f"{what}: expected a JSONL file of preference pairs or rankings")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{what}: {os.fspath(source)!r} does not exist")
        return ranking_pairs(read_rankings(os.fspath(source)))
    if not isinstance(source, (list, tuple)) or not source:
        raise ValueError(f"{what}: expected a file or a non-empty list of pairs")
    out: List[PreferencePair] = []
    for i, rec in enumerate(source):
        if isinstance(rec, PreferencePair):
            rec = {"prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected}
        out += ranking_pairs(parse_ranking(rec, f"{what}[{i}]"))
    return out


class _Encoded:
    """Pairs as token ids: prompt, chosen and rejected completion per pair."""

    def __init__(self, pairs: Sequence[PreferencePair], enc: TextEncoder, block_size: int):
        self.pairs = list(pairs)
        self.prompts = [enc.prompt(p.prompt, p.where) for p in self.pairs]
        self.chosen = [enc.completion(p.chosen, p.where) for p in self.pairs]
        self.rejected = [enc.completion(p.rejected, p.where) for p in self.pairs]
        self.block_size, self.pad = block_size, enc.eot or 0
        for i, p in enumerate(self.pairs):  # too long for the context: an error naming the line
            for c in (self.chosen[i], self.rejected[i]):
                if len(self.prompts[i]) + len(c) - 1 > block_size:
                    raise ValueError(f"{p.where}: the prompt ({len(self.prompts[i])} tokens) and an "
                                     f"answer ({len(c)} tokens, with end-of-text) need "
                                     f"{len(self.prompts[i]) + len(c) - 1} positions, more than the "
                                     f"model's context of {block_size}")

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, idx) -> SequenceBatch:
        """Chosen answers of pairs ``idx`` in the first half of the rows, rejected in the second."""
        ps = [self.prompts[i] for i in idx]
        return pack(ps + ps, [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx],
                    self.block_size, self.pad, where="pairs")


def _metrics(pi_w, pi_l, ref_w, ref_l, beta) -> Dict[str, float]:
    """The loss and the implicit rewards beta * (log pi - log ref) of chosen and rejected."""
    loss, _, _ = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
    rw, rl = beta * (np.asarray(pi_w) - ref_w), beta * (np.asarray(pi_l) - ref_l)
    return {"loss": loss, "reward_chosen": float(rw.mean()), "reward_rejected": float(rl.mean()),
            "margin": float((rw - rl).mean()), "accuracy": float((rw > rl).mean())}


def _sequence_logprobs(pol: Policy, data: _Encoded, idx, chunk: int) -> Tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed log-probs of pairs ``idx`` under ``pol``, no grad."""
    w, l_ = np.empty(len(idx)), np.empty(len(idx))
    for s in range(0, len(idx), chunk):
        part = idx[s: s + chunk]
        seq = pol.sequence_logprobs(data.batch(part), batch_size=2 * len(part))
        w[s: s + len(part)], l_[s: s + len(part)] = seq[: len(part)], seq[len(part):]
    return w, l_


def evaluate_pairs(policy, ref, data: _Encoded, beta: float, batch_size: int = 8,
                   ref_logps: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Dict[str, float]:
    """DPO loss, implicit-reward margin and accuracy of ``policy`` against ``ref`` on pairs."""
    idx = np.arange(len(data))
    pw, pl = _sequence_logprobs(Policy(policy), data, idx, batch_size)
    rw, rl = ref_logps if ref_logps is not None else _sequence_logprobs(Policy(ref), data, idx,
                                                                         batch_size)
    return _metrics(pw, pl, rw, rl, beta)


# ---- the loop ----------------------------------------------------------------------------------


def dpo(cfg: Optional[DPOConfig] = None, *, policy_model=None, ref_model=None,
        **kwargs) -> Dict[str, Any]:
    """Run DPO; returns a summary: the tuned ``model`` (a GPT) and its ``tokenizer``, ``steps``,
    per-step ``history`` (loss, implicit rewards, margin, accuracy), ``val`` records,
    ``tokens_per_s`` (tokens through policy and reference per second), ``out``.

    ``cfg`` or keyword arguments (DPOConfig's fields). ``policy_model`` (a (GPT, tokenizer) pair)
    replaces ``cfg.policy`` for a model in memory (it is trained in place); ``ref_model`` (a
    GPT) replaces ``cfg.ref`` (default: a copy of the starting policy)."""
    if cfg is None:
        cfg = DPOConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if not isinstance(cfg, DPOConfig):
        raise TypeError(f"cfg: expected a DPOConfig, got {type(cfg).__name__}")
    _check_config(cfg)
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *a, **k: None)

    # everything is read and checked before anything is written
    if cfg.out and not cfg.overwrite:
        refuse_existing_run(cfg.out, ("log.jsonl", MODEL_NAME))
    train_pairs = load_pairs(cfg.data, "data")
    val_pairs = load_pairs(cfg.val, "val") if cfg.val is not None else None
    if policy_model is not None:
        model, tok = policy_model
        model.eval()
        policy_path = None
    else:
        model, tok, policy_path = load_policy(cfg.policy, cfg.device)
    if ref_model is not None:
        from ._logprobs import check_same_vocabulary

        check_same_vocabulary(model, ref_model, "ref")
        ref = ref_model.eval()
    elif cfg.ref is None and policy_path is None:  # a copy of the policy in memory
        from ..models.gpt import GPT

        ref = GPT(model.config, device=model.device, dtype=model.dtype, init=False)
        ref.load_state_dict(model.state_dict())
        ref.eval()
    else:
        ref = load_reference(cfg.ref, model, policy_path, cfg.device)
    block = model.config.block_size
    enc = TextEncoder(tok, block)
    train = _Encoded(train_pairs, enc, block)
    val = _Encoded(val_pairs, enc, block) if val_pairs is not None else None
    longest = max(len(p) + max(len(c), len(r)) - 1
                  for p, c, r in zip(train.prompts, train.chosen, train.rejected))
    check_memory(model.config, 2 * cfg.batch_size, longest, model.dtype, model.device,
                 what="this DPO run")

    ref_train = ref_val = None
    if cfg.precompute_ref:
        say(f"scoring {len(train)} pairs with the reference once")
        ref_train = _sequence_logprobs(Policy(ref), train, np.arange(len(train)), cfg.batch_size)
        if val is not None:
            ref_val = _sequence_logprobs(Policy(ref), val, np.arange(len(val)), cfg.batch_size)
        ref = None  # released: training needs only the numbers
    ref_pol = Policy(ref) if ref is not None else None

    opt = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                seed=cfg.seed)
    pol = Policy(model)
    n = len(train)
    per_epoch = -(-n // cfg.batch_size)
    total = per_epoch * cfg.epochs
    log_file = open_run_log(cfg.out, None) if cfg.out else None
    emit(log_file, {"step": 0, "pairs": n, "val_pairs": len(val) if val is not None else 0,
                    "dpo_config": cfg.to_dict()})
    say(f"{model!r}\nDPO: {n} pairs{'' if val is None else f', {len(val)} val'}; "
        f"{cfg.epochs} epochs x {per_epoch} steps of {cfg.batch_size}; beta {cfg.beta:g}, lr {cfg.lr:g}")
    history: List[Dict[str, Any]] = []
    val_history: List[Dict[str, Any]] = []
    step, tokens, busy = 0, 0, 0.0
    t_start = time.perf_counter()

    def validate() -> None:
        if val is None:
            return
        m = evaluate_pairs(model, ref, val, cfg.beta, cfg.batch_size, ref_val)
        rec = {"step": step, **{f"val_{k}": v for k, v in m.items()}}
        val_history.append(rec)
        emit(log_file, rec)
        bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step"))

    bar = Progress(total=total, desc="dpo", unit="step", enabled=cfg.progress)
    stopped = interrupted = False
    failure = None
    try:
        with StopFlag() as stop:
            while step < total:
                epoch, pos = divmod(step, per_epoch)
                order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
                idx = order[pos * cfg.batch_size: (pos + 1) * cfg.batch_size]
                t0 = time.perf_counter()
                batch = train.batch(idx)
                k = len(idx)
                if ref_train is not None:
                    rw, rl = ref_train[0][idx], ref_train[1][idx]
                else:
                    rseq = batch.sum(ref_pol.logprobs(batch))
                    rw, rl = rseq[:k], rseq[k:]
                    tokens += batch.n_tokens
                model.zero_grad()
                logp = pol.logprobs(batch, grad=True)
                seq = batch.sum(logp)
                m = _metrics(seq[:k], seq[k:], rw, rl, cfg.beta)
                _, dw, dl = dpo_loss(seq[:k], seq[k:], rw, rl, cfg.beta)
                # d loss / d logp[b, t] = d loss / d seq[b] on every completion token of row b
                pol.backward(np.concatenate([dw, dl])[:, None] * batch.mask, batch)
                lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
                norm = opt.step(lr=lr, grad_clip=cfg.grad_clip or None) if math.isfinite(m["loss"]) else float("nan")
                if not math.isfinite(m["loss"]) or not math.isfinite(norm):
                    failure = diverged(model, step + 1, m["loss"], norm, lr, None)
                    emit(log_file, {"step": step + 1, **m, "grad_norm": norm, "error": failure})
                    break
                tokens += batch.n_tokens
                step += 1
                dt = time.perf_counter() - t0
                busy += dt
                rec = {"step": step, "epoch": epoch, **m, "lr": lr, "grad_norm": norm,
                       "tokens_per_s": batch.n_tokens * (1 if ref_train is not None else 2) / dt}
                history.append(rec)
                emit(log_file, rec)
                bar.update(1, postfix=f"loss {m['loss']:.4f} | margin {m['margin']:+.3f} | "
                                      f"acc {m['accuracy']:.2f}")
                if (cfg.val_every and step % cfg.val_every == 0) or step % per_epoch == 0:
                    validate()
                if stop.requested or (cfg.stop_after is not None and step >= cfg.stop_after
                                      and step < total):
                    stopped, interrupted = True, stop.requested
                    bar.write(f"stopped at step {step}")
                    break
            if failure is None and cfg.out:
                gio.save_pretrained(model, os.path.join(cfg.out, MODEL_NAME),
                                    tokenizer=_saveable_tokenizer(tok),
                                    state={"step": step, "dpo_config": cfg.to_dict(),
                                           "stopped_early": stopped})
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if failure is not None:
        raise TrainingDiverged(failure)
    elapsed = time.perf_counter() - t_start
    if cfg.progress:
        where = f"; model in {os.path.join(cfg.out, MODEL_NAME)}" if cfg.out else ""
        say(f"done: {step} steps in {format_duration(elapsed)}{where}")
    return {"model": model, "tokenizer": tok, "steps": step, "history": history,
            "val": val_history, "tokens_per_s": tokens / busy if busy else float("nan"),
            "stopped_early": stopped, "interrupted": interrupted, "elapsed": elapsed,
            "out": cfg.out}
