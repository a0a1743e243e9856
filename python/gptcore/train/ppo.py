"""InstructGPT step 3: PPO against a reward, with a KL leash to the SFT model (RLHF).

    from gptcore.train.ppo import ppo
    result = ppo(policy="runs/sft", reward_model="runs/rm", prompts="prompts.jsonl",
                 out="runs/ppo", steps=50)
    result = ppo(policy="runs/sft", reward_fn=lambda prompts, completions: scores, ...)

One step (Ouyang et al. 2022, section 3.5; Stiennon et al. 2020; Schulman et al. 2017):

1. **Rollouts.** ``batch_size`` prompts, each continued by the policy with the KV-cache sampler
   (:func:`gptcore.generate.generate`, temperature 1 by default, so the sampled tokens are draws
   from pi itself) for up to ``max_new_tokens`` tokens. A completion ends at the tokenizer's
   end-of-text token (kept as its last token, so the policy is credited for stopping) or after the
   first ``stop`` string (kept too: the demo's completions end with their newline).
2. **Scores.** ``reward_fn(prompts, completions) -> (B,)`` (any callable; completions are text
   without the end-of-text token) or a reward model directory (``RewardModel.score``, normalised).
   A non-finite score is an error naming the rollout.
3. **Per-token rewards.** ``r_t = -kl_coef * (log pi_old(y_t) - log ref(y_t))`` on every
   completion token (the sampled token's log-ratio, an unbiased estimate of KL(pi || ref)), plus
   the score on the last token.
4. **Advantages.** GAE (``gamma`` = 1, ``lam`` = 0.95) over each completion with the value
   model's values, terminal value 0; returns = advantages + values. Advantages are then
   *whitened* over all the completion tokens of the batch (mean 0, std 1; an all-zero batch stays
   zero): the policy's step size then does not depend on the reward's scale.
5. **Updates.** ``ppo_epochs`` passes over the rollouts in shuffled minibatches of
   ``minibatch_size``: the clipped policy objective (:func:`ppo_policy_loss`, ``clip`` 0.2), and
   the clipped value objective (:func:`ppo_value_loss`, ``value_clip`` 0.2); each a token-level
   mean over the minibatch's completion tokens, an AdamW step each (clipped at ``grad_clip``).
   With ``ptx_coef`` > 0 (PPO-ptx) each policy update also adds ``ptx_coef`` x the LM loss of a
   batch of pre-training text (a prepared data directory, a .bin shard or a text file).

The value function is **a separate model**: a GPT trunk with a scalar head (zero at the start),
its trunk initialised from the reward model's when it reads the same vocabulary, else from the
policy's. Its own AdamW (``value_lr``). So the policy's gradient comes only from the policy
objective (and PPO-ptx), never from value regression, and the reward model's knowledge of
what is good seeds the values.

Defaults chosen on purpose: dropout off everywhere (the ratio pi/pi_old is exactly 1 before the
first update); **no weight decay** for the policy, so a step whose advantages are all zero (zero
score, zero KL) leaves the policy's weights bit-for-bit unchanged; ``kl_coef`` 0.02
(InstructGPT's beta).

Logs (``log.jsonl``, one record per step): ``reward`` (mean score), ``kl`` (mean over rollouts of
the summed log-ratio log pi_old - log ref, nats per completion), ``entropy`` (mean of -log pi over
the sampled tokens, the Monte Carlo estimate of the per-token entropy), ``clipfrac``,
``policy_loss``, ``value_loss``, ``length`` (mean completion tokens), ``tokens_per_s`` (tokens
through policy and reference: sampling, scoring and the updates; the value model's not counted),
and whatever ``metric_fn(prompts, completions)`` returns (a number becomes ``true_rate``; a
dict is merged). ``samples.jsonl`` keeps a few rollouts per step; ``model/`` the final policy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import io as gio
from .._fileio import jsonl_records
from .._progress import Progress, format_duration
from ..data import BatchLoader, TokenData, read_text, shard_paths, write_shard
from ..generate import generate
from ..models.gpt import GPT
from ..optim import AdamW
from ._logprobs import (
    Policy,
    SequenceBatch,
    TextEncoder,
    ValueModel,
    load_policy,
    load_reference,
    pack,
)
from ._run import StopFlag, TrainingDiverged, check_memory, diverged, emit, open_run_log, refuse_existing_run
from .checkpoint import _saveable_tokenizer

__all__ = ["PPOConfig", "ppo", "ppo_policy_loss", "ppo_value_loss", "gae", "whiten",
           "read_prompts", "MODEL_NAME"]

MODEL_NAME = "model"


@dataclass
class PPOConfig:
    """A PPO run. ``policy``: the SFT checkpoint; ``prompts``: a JSONL file of ``{"prompt"}``
    records, a text file (one prompt a line) or a list of str; ``reward_model``: a reward model
    directory (or pass ``reward_fn`` to :func:`ppo`); ``ref``: the reference (default: the
    policy's checkpoint)."""

    policy: Optional[str] = None
    prompts: Any = None
    reward_model: Optional[str] = None
    ref: Optional[str] = None
    out: Optional[str] = "gptcore-ppo"  # None: write nothing
    steps: int = 20  # rollout batches
    batch_size: int = 16  # rollouts per step
    minibatch_size: int = 8
    ppo_epochs: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: Optional[float] = None
    stop: Optional[List[str]] = None  # a completion ends after the first of these
    kl_coef: float = 0.02
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    whiten: bool = True
    lr: float = 3e-5
    value_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ptx_coef: float = 0.0
    ptx_data: Optional[str] = None
    ptx_batch_size: int = 4
    ptx_seq_len: Optional[int] = None  # default: the model's context
    samples_per_step: int = 4  # rollouts kept in samples.jsonl per step
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    threads: Optional[int] = None
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["prompts"] is not None and not isinstance(d["prompts"], (str, os.PathLike)):
            d["prompts"] = f"<{len(d['prompts'])} prompts in memory>"
        elif d["prompts"] is not None:
            d["prompts"] = os.fspath(d["prompts"])
        return d


def _check_config(cfg: PPOConfig) -> None:
    for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                 "ptx_batch_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    for name in ("samples_per_step",):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    for name in ("temperature", "kl_coef", "gamma", "lam", "clip", "value_clip", "lr", "value_lr",
                 "weight_decay", "grad_clip", "ptx_coef"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if cfg.gamma > 1 or cfg.lam > 1:
        raise ValueError(f"gamma, lam: expected values in [0, 1], got {cfg.gamma}, {cfg.lam}")
    if cfg.top_p is not None and not (isinstance(cfg.top_p, (int, float)) and 0 < cfg.top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1], got {cfg.top_p!r}")
    if cfg.stop is not None and (not isinstance(cfg.stop, (list, tuple))
                                 or not all(isinstance(s, str) and s for s in cfg.stop)):
        raise ValueError(f"stop: expected a list of non-empty strings, got {cfg.stop!r}")
    if cfg.ptx_coef > 0 and cfg.ptx_data is None:
        raise ValueError("ptx_data: PPO-ptx (ptx_coef > 0) needs pre-training data (a prepared "
                         "data directory, a .bin shard or a text file)")
    if cfg.ptx_seq_len is not None and (isinstance(cfg.ptx_seq_len, bool)
                                        or not isinstance(cfg.ptx_seq_len, int) or cfg.ptx_seq_len < 1):
        raise ValueError(f"ptx_seq_len: expected an int >= 1, got {cfg.ptx_seq_len!r}")


# ---- the losses (pure NumPy, float64) -------------------------------------------------------------


def _masked(*arrays, mask) -> Tuple[List[np.ndarray], np.ndarray, float]:
    m = np.asarray(mask, np.float64)
    out = []
    for a in arrays:
        a = np.asarray(a, np.float64)
        if a.shape != m.shape:
            raise ValueError(f"expected arrays shaped like mask {m.shape}, got {a.shape}")
        out.append(a)
    n = float(m.sum())
    if n <= 0:
        raise ValueError("mask: selects no token")
    return out, m, n


def ppo_policy_loss(logp, old_logp, adv, mask, clip: float = 0.2) -> Tuple[float, np.ndarray, float]:
    """PPO's clipped surrogate, as a loss to minimise, and its gradient with respect to ``logp``.

    ratio = exp(logp - old_logp); loss = sum(mask * max(-adv * ratio, -adv * clip(ratio, 1 - clip,
    1 + clip))) / sum(mask). Returns ``(loss, dlogp, clipfrac)``: dlogp (like logp, zero outside
    the mask) and the share of tokens whose ratio left [1 - clip, 1 + clip]."""
    (lp, old, a), m, n = _masked(logp, old_logp, adv, mask=mask)
    ratio = np.exp((lp - old) * m)
    inside = (ratio >= 1.0 - clip) & (ratio <= 1.0 + clip)
    pg1 = -a * ratio
    pg2 = -a * np.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = float((np.maximum(pg1, pg2) * m).sum() / n)
    # d pg1 / d logp = -a * ratio; d pg2 / d logp = the same where the clip is inactive, else 0
    d = np.where((pg1 >= pg2) | inside, -a * ratio, 0.0) * m / n
    return loss, d, float(((~inside) * m).sum() / n)


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2) -> Tuple[float, np.ndarray, float]:
    """The clipped value loss and its gradient with respect to ``values``.

    v_clip = old_values + clip(values - old_values, -clip, clip); loss = 0.5 * sum(mask *
    max((values - returns)^2, (v_clip - returns)^2)) / sum(mask). Returns ``(loss, dvalues,
    clipfrac)``."""
    (v, old, ret), m, n = _masked(values, old_values, returns, mask=mask)
    vclip = old + np.clip(v - old, -clip, clip)
    inside = np.abs(v - old) <= clip
    l1, l2 = (v - ret) ** 2, (vclip - ret) ** 2
    loss = float(0.5 * (np.maximum(l1, l2) * m).sum() / n)
    d = np.where(l1 >= l2, v - ret, (vclip - ret) * inside) * m / n
    return loss, d, float(((~inside) * m).sum() / n)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95) -> Tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over (B, T) per-token rewards and values, ``mask``
    marking each row's completion (one contiguous span; the value after its last token is 0).
    Returns ``(advantages, returns)``, both zero outside the mask; returns = advantages + values.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}."""
    (r, v), m, _ = _masked(rewards, values, mask=mask)
    B, T = m.shape
    adv = np.zeros((B, T))
    last = np.zeros(B)
    for t in range(T - 1, -1, -1):
        m_next = m[:, t + 1] if t + 1 < T else np.zeros(B)
        v_next = v[:, t + 1] * m_next if t + 1 < T else np.zeros(B)
        delta = r[:, t] + gamma * v_next - v[:, t]
        last = delta + gamma * lam * m_next * last
        adv[:, t] = last * m[:, t]
    return adv, (adv + v) * m


def whiten(x, mask, eps: float = 1e-8) -> np.ndarray:
    """``x`` shifted and scaled to mean 0 and variance 1 over the masked entries (zero outside)."""
    (a,), m, n = _masked(x, mask=mask)
    mean = (a * m).sum() / n
    var = (((a - mean) * m) ** 2).sum() / n
    return (a - mean) / math.sqrt(var + eps) * m


# ---- prompts, rewards, pre-training data -----------------------------------------------------------


def read_prompts(source) -> Tuple[List[str], List[str]]:
    """(prompts, where each came from): a list of str, a JSONL file of ``{"prompt": ...}``
    records (``.jsonl``), or a text file with one prompt a line (blank lines skipped)."""
    if source is None:
        raise ValueError("prompts: expected a JSONL/text file of prompts or a list of str")
    if isinstance(source, (list, tuple)):
        for i, p in enumerate(source):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}]: expected str, got {type(p).__name__}")
        if not source:
            raise ValueError("prompts: empty list")
        return list(source), [f"prompts[{i}]" for i in range(len(source))]
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts: {path!r} does not exist")
    prompts, where = [], []
    if path.endswith(".jsonl"):
        for lineno, rec in jsonl_records(path):
            at = f"{path}:{lineno}"
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{at}: expected an object with a string 'prompt'")
            prompts.append(rec["prompt"])
            where.append(at)
    else:
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                prompts.append(line)
                where.append(f"{path}:{lineno}")
    if not prompts:
        raise ValueError(f"prompts: {path!r} holds no prompts")
    return prompts, where


def _scores(reward_fn, prompts: List[str], completions: List[str]) -> np.ndarray:
    """reward_fn's scores, checked: one finite number per rollout."""
    out = reward_fn(prompts, completions)
    try:
        s = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward_fn: expected one number per completion, got "
                         f"{type(out).__name__} ({e})") from None
    if s.shape != (len(prompts),):
        raise ValueError(f"reward_fn: expected {len(prompts)} scores (one per completion), got "
                         f"shape {s.shape}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"reward_fn: returned {s[i]} for rollout {i} (prompt {prompts[i][:40]!r}, "
                         f"completion {completions[i][:40]!r}); scores must be finite")
    return s


def _reward_model(path: str, device: str):
    """(reward_fn, the reward model's trunk or None) of a reward model directory."""
    from .reward import load_reward_model

    rm = load_reward_model(path, device=device)
    return (lambda p, c: rm.score(p, c)), getattr(rm, "model", None)


def _ptx_loader(cfg: PPOConfig, tok, model: GPT, tmp: str) -> BatchLoader:
    """Pre-training batches for PPO-ptx: a `gptcore prepare` directory's train shards, one .bin
    shard, or a text file (tokenised once into a shard under ``tmp``)."""
    path = os.fspath(cfg.ptx_data)
    V = model.config.vocab_size
    if os.path.isdir(path):
        data = TokenData(shard_paths(path, "train"), vocab_size=V)
    elif path.endswith(".bin"):
        data = TokenData([path], vocab_size=V)
    elif os.path.isfile(path):
        ids = TextEncoder(tok, model.config.block_size).enc.prompt_ids(read_text(path))
        shard = os.path.join(tmp, "ptx.bin")
        write_shard(shard, np.asarray(ids, np.int64))
        data = TokenData([shard], vocab_size=V)
    else:
        raise FileNotFoundError(f"ptx_data: {path!r} does not exist")
    T = min(cfg.ptx_seq_len or model.config.block_size, model.config.block_size)
    return BatchLoader(data, cfg.ptx_batch_size, T, seed=cfg.seed)


# ---- rollouts ----------------------------------------------------------------------------------


def _cut(gen: Sequence[int], enc: TextEncoder, stop: Optional[Sequence[str]]) -> Tuple[List[int], str]:
    """A sampled continuation cut after its end-of-text token or the first stop string (both
    kept in the tokens; the text keeps the stop string, not end-of-text)."""
    gen = [int(t) for t in gen]
    if enc.eot is not None and enc.eot in gen:
        gen = gen[: gen.index(enc.eot) + 1]
    if stop:
        for k in range(1, len(gen) + 1):
            text = enc.decode(gen[:k])
            if any(s in text for s in stop):
                return gen[:k], text
    return gen, enc.decode(gen)


@dataclass
class Rollouts:
    """One step's rollouts: texts, the packed batch and everything PPO computes on it."""

    prompts: List[str]
    completions: List[str]
    batch: SequenceBatch
    scores: np.ndarray
    old_logp: np.ndarray
    ref_logp: np.ndarray
    values: np.ndarray
    advantages: np.ndarray = None
    returns: np.ndarray = None


def _per_token(fn, batch: SequenceBatch, chunk: int) -> np.ndarray:
    """(B, T) per-token values of ``fn(sub_batch)`` computed ``chunk`` rows at a time."""
    out = np.zeros(batch.mask.shape, np.float64)
    for s in range(0, len(batch), chunk):
        rows = np.arange(s, min(s + chunk, len(batch)))
        sub = batch.rows(rows)
        out[rows, : sub.mask.shape[1]] = fn(sub)
    return out


def ppo_advantages(r: Rollouts, cfg: PPOConfig) -> None:
    """Per-token rewards (KL penalty + score on the last token), GAE and whitening, into ``r``."""
    m = r.batch.mask
    rewards = -cfg.kl_coef * (r.old_logp - r.ref_logp) * m
    rewards[np.arange(len(r.batch)), r.batch.last] += r.scores
    adv, ret = gae(rewards, r.values, m, cfg.gamma, cfg.lam)
    r.advantages = whiten(adv, m) if cfg.whiten else adv
    r.returns = ret


# ---- the loop ----------------------------------------------------------------------------------


def ppo(cfg: Optional[PPOConfig] = None, reward_fn: Optional[Callable] = None, *,
        metric_fn: Optional[Callable] = None, policy_model=None, **kwargs) -> Dict[str, Any]:
    """Run PPO; returns a summary: the tuned ``model`` (a GPT) and its ``tokenizer``, ``steps``,
    per-step ``history`` (reward, kl, entropy, clipfrac, policy_loss, value_loss, ...), ``out``.

    ``reward_fn(prompts, completions) -> (B,) scores`` replaces ``cfg.reward_model``.
    ``metric_fn(prompts, completions)`` -> a number (logged as ``true_rate``) or a dict of
    numbers, per step. ``policy_model`` (a (GPT, tokenizer) pair) replaces ``cfg.policy`` for a
    model in memory (trained in place; the reference is then a copy of it unless ``cfg.ref``)."""
    if cfg is None:
        cfg = PPOConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if not isinstance(cfg, PPOConfig):
        raise TypeError(f"cfg: expected a PPOConfig, got {type(cfg).__name__}")
    _check_config(cfg)
    if reward_fn is not None and cfg.reward_model is not None:
        raise ValueError("reward_fn and reward_model: give one reward, not both")
    if reward_fn is None and cfg.reward_model is None:
        raise ValueError("reward_model: expected a reward model directory (or pass reward_fn)")
    if reward_fn is not None and not callable(reward_fn):
        raise TypeError(f"reward_fn: expected a callable (prompts, completions) -> scores, got "
                        f"{type(reward_fn).__name__}")
    if cfg.threads:
        from .. import set_num_threads

        set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *a, **k: None)

    # everything is read and checked before anything is written
    if cfg.out and not cfg.overwrite:
        refuse_existing_run(cfg.out, ("log.jsonl", MODEL_NAME))
    prompts, where = read_prompts(cfg.prompts)
    if policy_model is not None:
        model, tok = policy_model
        model.eval()
        policy_path = None
    else:
        model, tok, policy_path = load_policy(cfg.policy, cfg.device)
    if policy_path is None and cfg.ref is None:
        ref = _copy(model)
    else:
        ref = load_reference(cfg.ref, model, policy_path, cfg.device)
    block = model.config.block_size
    enc = TextEncoder(tok, block)
    prompt_ids = [enc.prompt(p, w) for p, w in zip(prompts, where)]
    for ids, w in zip(prompt_ids, where):
        if len(ids) + cfg.max_new_tokens > block:
            raise ValueError(f"{w}: the prompt is {len(ids)} tokens; with max_new_tokens "
                             f"{cfg.max_new_tokens} it needs {len(ids) + cfg.max_new_tokens} "
                             f"positions, more than the model's context of {block}")
    trunk = None
    if reward_fn is None:
        reward_fn, trunk = _reward_model(cfg.reward_model, cfg.device)
    value_src = "policy"
    if trunk is not None and trunk.config.vocab_size == model.config.vocab_size \
            and trunk.config.block_size >= block:
        value_src = "reward model"
    else:
        trunk = model
    value = ValueModel(_copy(trunk).eval())
    longest = max(len(p) for p in prompt_ids) + cfg.max_new_tokens
    check_memory(model.config, cfg.minibatch_size, longest, model.dtype, model.device,
                 what="this PPO run")

    tmp = tempfile.TemporaryDirectory(prefix="gptcore-ppo-")
    try:
        ptx = _ptx_loader(cfg, tok, model, tmp.name) if cfg.ptx_coef > 0 else None
        return _loop(cfg, model, tok, ref, value, enc, prompts, prompt_ids, reward_fn, metric_fn,
                     ptx, value_src, say)
    finally:
        tmp.cleanup()


def _copy(model: GPT) -> GPT:
    """A copy of a GPT's trunk (its heads left out), in eval mode."""
    out = GPT(model.config, device=model.device, dtype=model.dtype, init=False)
    state = {k: v for k, v in model.state_dict().items() if k in out.parameters()}
    out.load_state_dict(state)
    return out.eval()


def _loop(cfg, model, tok, ref, value, enc, prompts, prompt_ids, reward_fn, metric_fn, ptx,
          value_src, say) -> Dict[str, Any]:
    pol, ref_pol = Policy(model), Policy(ref)
    opt = AdamW(model, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, seed=cfg.seed)
    vopt = AdamW(value.model, lr=cfg.value_lr, betas=(0.9, 0.95), weight_decay=0.0, seed=cfg.seed)
    n = len(prompts)
    block = model.config.block_size
    log_file = open_run_log(cfg.out, None) if cfg.out else None
    samples = open(os.path.join(cfg.out, "samples.jsonl"), "w", encoding="utf-8") if cfg.out else None
    emit(log_file, {"step": 0, "prompts": n, "value_init": value_src, "ppo_config": cfg.to_dict()})
    say(f"{model!r}\nPPO: {n} prompts, {cfg.steps} steps x {cfg.batch_size} rollouts "
        f"(up to {cfg.max_new_tokens} tokens), {cfg.ppo_epochs} epochs of minibatches of "
        f"{cfg.minibatch_size}; kl_coef {cfg.kl_coef:g}, lr {cfg.lr:g}; values from the "
        f"{value_src}'s trunk" + (f"; PPO-ptx {cfg.ptx_coef:g}" if ptx is not None else ""))
    history: List[Dict[str, Any]] = []
    step, failure = 0, None
    stopped = interrupted = False
    busy = tokens_total = 0.0
    t_start = time.perf_counter()
    bar = Progress(total=cfg.steps, desc="ppo", unit="step", enabled=cfg.progress)
    try:
        with StopFlag() as stop:
            while step < cfg.steps:
                t0 = time.perf_counter()
                picks = [int(np.random.default_rng([cfg.seed, i // n]).permutation(n)[i % n])
                         for i in range(step * cfg.batch_size, (step + 1) * cfg.batch_size)]
                # 1. rollouts
                p_ids = [prompt_ids[i] for i in picks]
                toks = generate(model, p_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step)
                comps, texts = [], []
                for b, ids in enumerate(p_ids):
                    c, t = _cut(toks[b, len(ids): len(ids) + cfg.max_new_tokens], enc, cfg.stop)
                    comps.append(c)
                    texts.append(t)
                ptexts = [prompts[i] for i in picks]
                batch = pack(p_ids, comps, block, enc.eot or 0, where="rollouts")
                # 2.-4. scores, log-probs, values, advantages
                scores = _scores(reward_fn, ptexts, texts)
                mb = cfg.minibatch_size
                r = Rollouts(ptexts, texts, batch, scores,
                             _per_token(pol.logprobs, batch, mb), _per_token(ref_pol.logprobs, batch, mb),
                             _per_token(value.values, batch, mb))
                ppo_advantages(r, cfg)
                # 5. updates
                stats = _update(cfg, r, pol, value, opt, vopt, ptx, step)
                if stats.get("error"):
                    failure = diverged(model, step + 1, stats["policy_loss"], float("nan"), cfg.lr, None)
                    emit(log_file, {"step": step + 1, "error": failure})
                    break
                step += 1
                dt = time.perf_counter() - t0
                busy += dt
                m = batch.mask
                processed = (batch.n_tokens + len(batch)  # sampling (prompt + completion)
                             + (2 + cfg.ppo_epochs) * batch.n_tokens)  # old, ref, updates
                tokens_total += processed
                rec = {"step": step, "reward": float(scores.mean()),
                       "kl": float(((r.old_logp - r.ref_logp) * m).sum(1).mean()),
                       "entropy": float(-(r.old_logp * m).sum() / m.sum()),
                       **stats, "length": float(batch.completion_lens.mean()),
                       "tokens_per_s": processed / dt}
                if metric_fn is not None:
                    extra = metric_fn(ptexts, texts)
                    rec.update(extra if isinstance(extra, dict) else {"true_rate": float(extra)})
                history.append(rec)
                emit(log_file, rec)
                if samples is not None:
                    for b in range(min(cfg.samples_per_step, len(picks))):
                        emit(samples, {"step": step, "prompt": ptexts[b], "completion": texts[b],
                                       "score": float(scores[b])})
                bar.update(1, postfix=f"reward {rec['reward']:+.3f} | kl {rec['kl']:.3f}"
                           + (f" | true {rec['true_rate']:.2f}" if "true_rate" in rec else ""))
                if stop.requested:
                    stopped = interrupted = True
                    bar.write(f"stopped at step {step}")
                    break
            if failure is None and cfg.out:
                gio.save_pretrained(model, os.path.join(cfg.out, MODEL_NAME),
                                    tokenizer=_saveable_tokenizer(tok),
                                    state={"step": step, "ppo_config": cfg.to_dict(),
                                           "stopped_early": stopped})
    finally:
        bar.close()
        for f in (log_file, samples):
            if f is not None:
                f.close()
    if failure is not None:
        raise TrainingDiverged(failure)
    elapsed = time.perf_counter() - t_start
    if cfg.progress:
        at = f"; model in {os.path.join(cfg.out, MODEL_NAME)}" if cfg.out else ""
        say(f"done: {step} steps in {format_duration(elapsed)}{at}")
    return {"model": model, "tokenizer": tok, "value_model": value.model, "steps": step,
            "history": history, "tokens_per_s": tokens_total / busy if busy else float("nan"),
            "stopped_early": stopped, "interrupted": interrupted, "elapsed": elapsed,
            "out": cfg.out}


def _update(cfg: PPOConfig, r: Rollouts, pol: Policy, value: ValueModel, opt: AdamW,
            vopt: AdamW, ptx, step: int) -> Dict[str, Any]:
    """``ppo_epochs`` passes of minibatch updates of the policy and the value model; returns the
    mean losses and clip fractions (``error`` True on a non-finite loss or gradient)."""
    B = len(r.batch)
    rng = np.random.default_rng([cfg.seed, step])  # the minibatch order
    acc: Dict[str, List[float]] = {k: [] for k in ("policy_loss", "clipfrac", "value_loss",
                                                  "value_clipfrac", "ptx_loss")}
    model = pol.model
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(B)
        for s in range(0, B, cfg.minibatch_size):
            rows = order[s: s + cfg.minibatch_size]
            sub = r.batch.rows(rows)
            T = sub.mask.shape[1]
            take = lambda a: a[rows, :T]  # noqa: E731
            model.zero_grad()
            if ptx is not None:  # PPO-ptx: ptx_coef x the LM loss, its gradient accumulated first
                x, y = ptx.next()
                acc["ptx_loss"].append(model.forward(x, y, loss_scale=cfg.ptx_coef))
                model.backward()
            logp = pol.logprobs(sub, grad=True)
            loss, dlogp, clipfrac = ppo_policy_loss(logp, take(r.old_logp), take(r.advantages),
                                                    sub.mask, cfg.clip)
            pol.backward(dlogp, sub)
            norm = opt.step(grad_clip=cfg.grad_clip or None)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                return {"policy_loss": loss, "error": True}
            acc["policy_loss"].append(loss)
            acc["clipfrac"].append(clipfrac)
            value.model.zero_grad()
            v = value.values(sub, grad=True)
            vloss, dv, vclip = ppo_value_loss(v, take(r.values), take(r.returns), sub.mask,
                                              cfg.value_clip)
            value.backward(dv, sub)
            vnorm = vopt.step(grad_clip=cfg.grad_clip or None)
            if not (math.isfinite(vloss) and math.isfinite(vnorm)):
                return {"policy_loss": vloss, "error": True}
            acc["value_loss"].append(vloss)
            acc["value_clipfrac"].append(vclip)
    return {k: float(np.mean(v)) for k, v in acc.items() if v}
