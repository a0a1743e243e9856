"""Fine-tuning throughput on the CPU: gptcore's trunk + multiple-choice head beside transformers'
GPT2DoubleHeadsModel with PyTorch CPU, same sizes, same data, same threads, in one run.

One training step is GPT-1's multiple-choice fine-tuning step (issue 14): a batch of ``B``
examples of ``K`` choices, each choice one right-padded sequence of ``T`` tokens ending in its
extract token, run through the trunk; the choice scores (a linear head on each extract token's
final hidden state, dropout 0.1 before it) go through a softmax cross-entropy over the choices;
loss = that + 0.5 x the LM loss on the same sequences (padding ignored); backward; global-norm
clipping at 1.0; AdamW (lr 6.25e-5, betas (0.9, 0.999), weight decay 0.01 on >= 2-D weights).
Dropout 0.1 everywhere (embeddings, attention, residual, head), training mode on both sides.
Throughput is examples per second (B / step time), the median over interleaved rounds, warm-up
steps excluded.

* ``gptcore``: :class:`gptcore.GPT` with a ``multiple_choice_head``
  (:class:`gptcore.models.heads.LinearHead`, 1 output, bias), driven through the trunk/head API:
  ``model.forward(ids, targets, loss_scale=0.5)`` (LM loss, fused cross-entropy), the head on
  ``gather_rows(model.last_hidden_states, extract)``, ``softmax_cross_entropy``,
  ``model.backward(dh=...)``, :class:`gptcore.optim.AdamW`.
* ``finetune``: the same through ``gptcore.train.finetune``'s loop body (``MultipleChoice``,
  ``_loss_and_backward``), what ``gptcore finetune`` runs per step (left out if absent).
* ``torch``: ``transformers.GPT2DoubleHeadsModel`` (input (B, K, T), ``mc_token_ids`` the extract
  positions, ``labels`` with -100 on padding, ``mc_labels``), ``mc_loss + 0.5 * loss``,
  ``clip_grad_norm_``, ``torch.optim.AdamW`` with the same two parameter groups. Eager mode,
  float32, its default attention implementation.

    python benchmarks/bench_finetune.py [--shape small|gpt2] [-B 8] [-K 4] [-T 64] [--rounds 5]
                                        [--threads N] [--profile]
    pytest benchmarks/bench_finetune.py          # small shape, both sides (pytest-benchmark)

Shapes: ``small`` is 6 layers x 384 wide (6 heads), ``gpt2`` the 124M shape (12 x 768); both with
GPT-2's vocabulary plus the three task tokens (50,260) and 1024 positions. Target (issue 14):
gptcore at least 2x transformers' examples/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pytest

import gptcore
from gptcore.models import GPT, GPTConfig
from gptcore.models.heads import LinearHead, gather_rows, scatter_rows, softmax_cross_entropy
from gptcore.optim import AdamW
from op_profile import print_op_table, profile_ops

try:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    HAVE_TORCH = True
except Exception:  # torch or transformers absent: gptcore figures only
    torch = transformers = None
    HAVE_TORCH = False

SHAPES = {"small": dict(n_layer=6, n_head=6, n_embd=384), "gpt2": dict(n_layer=12, n_head=12, n_embd=768)}
VOCAB = 50257 + 3  # GPT-2's vocabulary and the start, delimiter and extract tokens
START, DELIM, EXTRACT = 50257, 50258, 50259
LR, BETAS, WD, CLIP, LM_COEF, PDROP = 6.25e-5, (0.9, 0.999), 0.01, 1.0, 0.5, 0.1


def make_batch(B: int, K: int, T: int, seed: int = 0):
    """B examples x K choices as (B*K, T) right-padded ids: [start] context [delim] choice
    [extract] of varying length (padding with the start token); the LM targets (next token, -1
    on and after the extract token); the extract positions; the right choices."""
    rng = np.random.default_rng(seed)
    N = B * K
    ids = np.full((N, T), START, np.int64)
    last = rng.integers(T * 3 // 4, T, N)  # the extract positions: 75-100% of T filled
    for n, e in enumerate(last):
        ids[n, 1:e] = rng.integers(0, 50257, e - 1)
        ids[n, e // 2] = DELIM
        ids[n, e] = EXTRACT
    targets = np.full((N, T), -1, np.int64)
    targets[:, :-1] = ids[:, 1:]
    targets[np.arange(T)[None, :] >= last[:, None]] = -1  # nothing to predict from extract on
    return ids, targets, last, rng.integers(0, K, B)


def config(shape: str) -> GPTConfig:
    return GPTConfig(**SHAPES[shape], block_size=1024, vocab_size=VOCAB, embd_pdrop=PDROP,
                     attn_pdrop=PDROP, resid_pdrop=PDROP)


def gptcore_step(cfg: GPTConfig, batch, K: int, seed: int = 0):
    """One fine-tuning step on gptcore's trunk/head API (returns the total loss)."""
    model = GPT(cfg, seed=seed)
    head = LinearHead(cfg.n_embd, 1, "multiple_choice_head", bias=True, dropout=PDROP, seed=seed)
    model.add_head(head)
    model.train()
    opt = AdamW(model, lr=LR, betas=BETAS, weight_decay=WD)
    ids, targets, last, labels = batch
    ids32, tgt32 = ids.astype(np.int32), targets.astype(np.int32)

    def step():
        model.zero_grad()
        lm = model.forward(ids32, tgt32, loss_scale=LM_COEF)
        h = model.last_hidden_states
        scores = head.forward(gather_rows(h, last)).reshape(-1, K)
        mc, dscores = softmax_cross_entropy(scores, labels)
        dh = scatter_rows(head.backward(dscores.reshape(-1, 1)), last, h.shape)
        model.backward(dh=dh)
        opt.step(grad_clip=CLIP)
        return mc + LM_COEF * lm

    return step


def finetune_step(cfg: GPTConfig, batch, K: int, seed: int = 0):
    """The same step through gptcore.train.finetune's own loop body (its TaskModel, Batch and
    ``_loss_and_backward``, the function ``gptcore finetune`` runs each step), or None where
    that module is not there."""
    try:
        from gptcore.data import get_tokenizer
        from gptcore.data.tasks import Batch, LabelSpace
        from gptcore.train.finetune import MultipleChoice, _loss_and_backward
    except ImportError as e:
        print(f"  (finetune left out: {e})")
        return None
    model = GPT(cfg, seed=seed)
    model.add_head(LinearHead(cfg.n_embd, 1, "multiple_choice_head", bias=True, dropout=PDROP, seed=seed))
    model.train()
    info = {"task": "choice", "labels": LabelSpace("choice", n_choices=K).to_dict(),
            "special_tokens": {"start": START, "delim": DELIM, "extract": EXTRACT}, "n_ctx": cfg.block_size}
    tm = MultipleChoice(model, get_tokenizer("byte"), info)  # the tokenizer is not used here
    opt = AdamW(model, lr=LR, betas=BETAS, weight_decay=WD)
    ids, targets, last, labels = batch
    b = Batch(ids.astype(np.int32), targets.astype(np.int32), last, K, labels)

    def step():
        model.zero_grad()
        mc, lm = _loss_and_backward(tm, b, LM_COEF)
        opt.step(grad_clip=CLIP)
        return mc + LM_COEF * lm

    return step


def torch_step(cfg: GPTConfig, batch, K: int, seed: int = 0):
    """The same step with transformers' GPT2DoubleHeadsModel and torch.optim.AdamW."""
    torch.manual_seed(seed)
    conf = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=PDROP, embd_pdrop=PDROP,
        attn_pdrop=PDROP, summary_first_dropout=PDROP, pad_token_id=START)
    model = transformers.GPT2DoubleHeadsModel(conf).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)
    ids, targets, last, labels = batch
    B = len(labels)
    x = torch.as_tensor(ids).view(B, K, -1)
    # transformers shifts labels itself: label t is the token at t; -100 where nothing is predicted
    lm_labels = torch.as_tensor(np.where(np.arange(ids.shape[1])[None, :] > last[:, None], -100, ids)).view(B, K, -1)
    mc_ids = torch.as_tensor(last).view(B, K)
    mc_labels = torch.as_tensor(labels)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x, mc_token_ids=mc_ids, labels=lm_labels, mc_labels=mc_labels)
        loss = out.mc_loss + LM_COEF * out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss.item()

    return step


def measure(steps, rounds: int = 5, warmup: int = 1):
    """name -> per-round step seconds; the sides take turns each round (a busy moment on a
    shared machine then hits both), after ``warmup`` untimed steps each."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            loss = fn()
            times[name].append(time.perf_counter() - t0)
            if not np.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss}")
    return times


def report(shape: str, B: int, K: int, T: int, times) -> None:
    load = os.getloadavg()
    print(f"{shape} ({SHAPES[shape]}), B={B} x K={K} choices x T={T}, {gptcore.get_num_threads()} "
          f"gptcore threads / {torch.get_num_threads() if HAVE_TORCH else '-'} torch threads, "
          f"load average {load[0]:.2f}")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:8s} step median {med[name]:.3f} s (min {min(t):.3f}, max {max(t):.3f}, "
              f"{len(t)} rounds): {B / med[name]:.2f} examples/s")
    for name in ("gptcore", "finetune"):
        if "torch" in med and name in med:
            # rounds are interleaved: the ratio within each round is the least disturbed by a
            # load that drifts over the run; min over min is the least disturbed by bursts
            per_round = statistics.median(t / g for g, t in zip(times[name], times["torch"]))
            print(f"  {name} / transformers examples/s: {med['torch'] / med[name]:.2f}x medians, "
                  f"{per_round:.2f}x median of per-round ratios, {min(times['torch']) / min(times[name]):.2f}x "
                  "fastest rounds (target >= 2x)")


def profile(step, rounds: int) -> None:
    """Where gptcore's step spends its time, per op."""
    med, per_op, calls = profile_ops(step, rounds)
    inside = sum(per_op.values())
    print(f"  gptcore profile: step {med:.3f} s, inside ops {inside:.3f} s, outside (Python, host "
          f"gather/scatter, copies) {med - inside:+.3f} s")
    print_op_table(med, per_op, calls, top=10, indent="    ")


def run(shape="small", B=8, K=4, T=64, rounds=5, threads=0, do_profile=False, with_finetune=True):
    if threads:
        gptcore.set_num_threads(threads)
    if HAVE_TORCH:
        torch.set_num_threads(gptcore.get_num_threads())
    cfg = config(shape)
    batch = make_batch(B, K, T)
    steps = {"gptcore": gptcore_step(cfg, batch, K)}
    ft = finetune_step(cfg, batch, K) if with_finetune else None
    if ft is not None:
        steps["finetune"] = ft
    if HAVE_TORCH:
        steps["torch"] = torch_step(cfg, batch, K)
    times = measure(steps, rounds)
    report(shape, B, K, T, times)
    if do_profile:
        profile(steps["gptcore"], max(2, rounds // 2))
    return times


# ---- pytest-benchmark ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["gptcore", "torch"])
def test_finetune_step_cpu(benchmark, impl):
    if impl == "torch" and not HAVE_TORCH:
        pytest.skip("torch / transformers not installed")
    B, K, T = 8, 4, 64
    make = gptcore_step if impl == "gptcore" else torch_step
    step = make(config("small"), make_batch(B, K, T), K)
    benchmark.extra_info.update({"shape": "small", "batch": B, "choices": K, "seq": T, "unit": "step",
                                 "threads": gptcore.get_num_threads()})
    loss = benchmark.pedantic(step, rounds=4, iterations=1, warmup_rounds=1)
    assert np.isfinite(loss)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("-B", type=int, default=8)
    ap.add_argument("-K", type=int, default=4)
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-finetune", action="store_true", help="leave out gptcore.train.finetune's step")
    a = ap.parse_args()
    run(a.shape, a.B, a.K, a.T, a.rounds, a.threads, a.profile, not a.no_finetune)
