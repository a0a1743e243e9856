"""DPO and PPO throughput on the CPU: gptcore's loops (gptcore.train.dpo / ppo) beside the same
algorithms in PyTorch, same sizes, same data, same threads, in one run (issue 18, Speed).

Throughput is tokens per second through policy and reference (real, unpadded tokens), the median
over the timed steps (``--steps`` after ``--warmup`` warm-up steps, per round); gptcore and the
baselines take turns ``--rounds`` times, so a shared machine's load drift hits both alike.

* **DPO step**: ``B`` preference pairs (2B rows: prompt + chosen, prompt + rejected); the policy's
  forward and backward, the reference's forward, the loss -log sigmoid(beta * margin), global-norm
  clipping at 1.0, AdamW. Tokens = 2 x the batch's tokens (policy + reference).
  - ``gptcore``: :func:`gptcore.train.dpo.dpo` itself (its per-step record).
  - ``trl``: TRL's ``DPOTrainer`` (when ``trl`` imports) on transformers' GPT2LMHeadModel with
    PyTorch CPU: same model, pairs, batch size, beta, lr; the step time from a trainer callback.
  - ``torch``: a plain loop of the same algorithm: GPT2LMHeadModel policy and reference,
    log_softmax + gather summed over the completion, ``torch.optim.AdamW``.
* **PPO step**: ``B`` prompts sampled with the KV cache for ``N`` new tokens, the policy's and the
  reference's log-probs and the value model's values on them, per-token KL-penalised rewards, GAE,
  whitening, then ``E`` epochs of minibatch updates of the policy (clipped objective) and the value
  model (clipped value loss). Tokens = sampled (prompt + completion) + (2 + E) x the batch's
  tokens (old and reference log-probs, the updates); the value model's are not counted, on
  either side.
  - ``gptcore``: :func:`gptcore.train.ppo.ppo` itself (its per-step record).
  - ``torch``: the same step in PyTorch: ``GPT2LMHeadModel.generate`` (sampling, KV cache),
    a GPT2Model + linear value model, the same NumPy GAE, torch losses, ``torch.optim.AdamW``.
    (TRL 1.x no longer ships a PPO trainer in its stable API, so PPO compares with this loop.)

    python benchmarks/bench_rlhf.py [--layers 4] [--width 256] [-B 8] [--steps 4] [--rounds 2] [--threads N]

Model: GPT-2's vocabulary (50,257) and block 256, ``--layers`` x ``--width`` (heads = width/64).
Target: gptcore >= 2x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import gptcore  # noqa: E402
from gptcore.data import get_tokenizer  # noqa: E402
from gptcore.models.config import GPTConfig  # noqa: E402
from gptcore.models.gpt import GPT  # noqa: E402
from gptcore.train._logprobs import TextEncoder, pack  # noqa: E402
from gptcore.train.dpo import dpo  # noqa: E402
from gptcore.train.ppo import gae, ppo, whiten  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there had been one all we can their has would "
         "when if so no what up out who them some more its than into time only other new two may "
         "first then any these could like over such our our man me even most made after also did "
         "many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see men work long "
         "get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def _text(rng, n: int) -> str:
    """n GPT-2 tokens of text: n common words, each one token with its leading space."""
    return "".join(" " + w for w in rng.choice(WORDS, n))


def _pairs(n: int, P: int, L: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"prompt": _text(rng, P), "chosen": _text(rng, L), "rejected": _text(rng, L)}
            for _ in range(n)]


def _median_after(xs, warm: int) -> list:
    """The timed steps' rates (those after the warm-up), collected over rounds by main()."""
    return list(xs)[warm:]


# ---- DPO ------------------------------------------------------------------------------------------


def _dpo_tokens(pairs, enc: TextEncoder) -> int:
    """Real tokens of one batch's 2B rows (prompt + completion - 1, as the models see them)."""
    ps = [enc.prompt(p["prompt"], "p") for p in pairs]
    b = pack(ps + ps, [enc.completion(p["chosen"], "c") for p in pairs]
             + [enc.completion(p["rejected"], "r") for p in pairs], 10**9, where="pairs")
    return b.n_tokens


def dpo_gptcore(model, tok, pairs, B, steps, warm, beta, lr):
    r = dpo(data=pairs, policy_model=(model, tok), out=None, batch_size=B, epochs=1,
            stop_after=steps + warm if len(pairs) > (steps + warm) * B else None, beta=beta,
            lr=lr, warmup=0, progress=False)
    return _median_after([h["tokens_per_s"] for h in r["history"]], warm)


def dpo_torch(path, pairs, enc, B, steps, warm, beta, lr):
    import torch
    from transformers import GPT2LMHeadModel

    pol = GPT2LMHeadModel.from_pretrained(path).train()
    pol.config.attn_pdrop = pol.config.resid_pdrop = pol.config.embd_pdrop = 0.0
    pol.eval()  # dropout off, as gptcore's DPO runs
    ref = GPT2LMHeadModel.from_pretrained(path).eval()
    opt = torch.optim.AdamW(pol.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    rates = []
    for s in range(steps + warm):
        chunk = pairs[s * B: (s + 1) * B]
        ps = [enc.prompt(p["prompt"], "p") for p in chunk]
        b = pack(ps + ps, [enc.completion(p["chosen"], "c") for p in chunk]
                 + [enc.completion(p["rejected"], "r") for p in chunk], 10**9, enc.eot, where="pairs")
        t0 = time.perf_counter()
        ids = torch.tensor(b.ids, dtype=torch.long)
        tgt = torch.tensor(np.maximum(b.targets, 0))
        mask = torch.tensor(b.mask)

        def seq_logp(model):
            lp = torch.log_softmax(model(ids).logits, dim=-1)
            return (lp.gather(-1, tgt[..., None])[..., 0] * mask).sum(1)

        with torch.no_grad():
            r = seq_logp(ref)
        pi = seq_logp(pol)
        k = len(chunk)
        z = beta * ((pi[:k] - r[:k]) - (pi[k:] - r[k:]))
        loss = -torch.nn.functional.logsigmoid(z).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
        opt.step()
        rates.append(2 * b.n_tokens / (time.perf_counter() - t0))
    return _median_after(rates, warm)


def dpo_trl(path, pairs, enc, B, steps, warm, beta, lr):
    try:
        import trl
        from datasets import Dataset
        from transformers import GPT2LMHeadModel, GPT2TokenizerFast, TrainerCallback
    except ImportError:
        return None
    tok = GPT2TokenizerFast.from_pretrained(path)
    tok.pad_token = tok.eos_token
    pol = GPT2LMHeadModel.from_pretrained(path)
    pol.config.attn_pdrop = pol.config.resid_pdrop = pol.config.embd_pdrop = 0.0
    ref = GPT2LMHeadModel.from_pretrained(path)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    n = (steps + warm) * B
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.DPOConfig(output_dir=tmp, per_device_train_batch_size=B, max_steps=steps + warm,
                             learning_rate=lr, lr_scheduler_type="constant", beta=beta,
                             max_length=1024, report_to="none", use_cpu=True,
                             save_strategy="no", logging_steps=10**6, max_grad_norm=1.0,
                             adam_beta2=0.999, weight_decay=0.0, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
        trainer = trl.DPOTrainer(model=pol, ref_model=ref, args=args,
                                 train_dataset=Dataset.from_list(pairs[:n]), processing_class=tok,
                                 callbacks=[Timer()])
        trainer.train()
    tokens = [_dpo_tokens(pairs[s * B: (s + 1) * B], enc) * 2 for s in range(len(times))]
    return _median_after([t / dt for t, dt in zip(tokens, times)], warm)


# ---- PPO ------------------------------------------------------------------------------------------


def ppo_gptcore(model, tok, prompts, B, N, E, steps, warm):
    r = ppo(policy_model=(model, tok), prompts=prompts, reward_fn=_reward, out=None,
            steps=steps + warm, batch_size=B, minibatch_size=max(1, B // 2), ppo_epochs=E,
            max_new_tokens=N, progress=False, samples_per_step=0)
    return _median_after([h["tokens_per_s"] for h in r["history"]], warm)


def _reward(prompts, completions):
    return np.array([len(set(c.split())) / 10.0 for c in completions])


def ppo_torch(path, tok, prompts, B, N, E, steps, warm, kl_coef=0.02, clip=0.2, lr=3e-5,
              value_lr=1e-4):
    import torch
    from transformers import GPT2LMHeadModel, GPT2Model

    pol = GPT2LMHeadModel.from_pretrained(path).eval()
    ref = GPT2LMHeadModel.from_pretrained(path).eval()
    vtrunk = GPT2Model.from_pretrained(path).eval()
    vhead = torch.nn.Linear(vtrunk.config.n_embd, 1)
    torch.nn.init.zeros_(vhead.weight)
    torch.nn.init.zeros_(vhead.bias)
    vparams = list(vtrunk.parameters()) + list(vhead.parameters())
    opt = torch.optim.AdamW(pol.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    vopt = torch.optim.AdamW(vparams, lr=value_lr, betas=(0.9, 0.95), weight_decay=0.0)
    enc = TextEncoder(tok, 10**9)
    P = len(enc.prompt(prompts[0], "p"))
    eot = enc.eot
    rates = []
    gen = torch.Generator().manual_seed(0)
    for s in range(steps + warm):
        chunk = [prompts[(s * B + i) % len(prompts)] for i in range(B)]
        ids0 = torch.tensor([enc.prompt(p, "p") for p in chunk], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            full = pol.generate(ids0, attention_mask=torch.ones_like(ids0), do_sample=True,
                                top_k=0, temperature=1.0, max_new_tokens=N, min_new_tokens=N,
                                pad_token_id=eot)
        comps = full[:, P:]
        texts = [tok.decode([int(t) for t in c]) for c in comps]
        scores = torch.tensor(_reward(chunk, texts))
        ids = full[:, :-1]
        tgt = full[:, 1:]
        mask = torch.zeros(ids.shape, dtype=torch.float64)
        mask[:, P - 1:] = 1.0

        def logp_of(model, x):
            lp = torch.log_softmax(model(x).logits, dim=-1)
            return lp.gather(-1, tgt[..., None])[..., 0].double() * mask[: len(x)]

        def values_of(x):
            return vhead(vtrunk(x).last_hidden_state)[..., 0].double()

        with torch.no_grad():
            old, rlp, vals = logp_of(pol, ids), logp_of(ref, ids), values_of(ids) * mask
        rewards = (-kl_coef * (old - rlp) * mask).numpy()
        rewards[:, -1] += scores.numpy()
        adv, ret = gae(rewards, vals.numpy(), mask.numpy(), 1.0, 0.95)
        adv = torch.tensor(whiten(adv, mask.numpy()))
        ret = torch.tensor(ret)
        mb = max(1, B // 2)
        order_rng = np.random.default_rng([0, s])
        for _ in range(E):
            order = order_rng.permutation(B)
            for a in range(0, B, mb):
                rows = torch.tensor(order[a: a + mb])
                m = mask[rows]
                n = m.sum()
                x = ids[rows]
                lp = torch.log_softmax(pol(x).logits, dim=-1).gather(-1, tgt[rows][..., None])[..., 0].double() * m
                ratio = torch.exp(lp - old[rows])
                obj = torch.maximum(-adv[rows] * ratio,
                                    -adv[rows] * torch.clamp(ratio, 1 - clip, 1 + clip))
                loss = (obj * m).sum() / n
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
                opt.step()
                v = values_of(x) * m
                vc = vals[rows] + torch.clamp(v - vals[rows], -clip, clip)
                vloss = 0.5 * (torch.maximum((v - ret[rows]) ** 2, (vc - ret[rows]) ** 2) * m).sum() / n
                vopt.zero_grad()
                vloss.backward()
                torch.nn.utils.clip_grad_norm_(vparams, 1.0)
                vopt.step()
        n_tokens = int(B * (P + N - 1))
        processed = n_tokens + B + (2 + E) * n_tokens
        rates.append(processed / (time.perf_counter() - t0))
    return _median_after(rates, warm)


# ---- main -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("-B", type=int, default=8, help="DPO pairs / PPO rollouts per step")
    ap.add_argument("-P", type=int, default=32, help="prompt tokens")
    ap.add_argument("-L", type=int, default=32, help="DPO answer tokens / PPO new tokens")
    ap.add_argument("-E", type=int, default=2, help="PPO epochs per rollout batch")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2,
                    help="gptcore and the baselines take turns this many times (load drift)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=("dpo", "ppo"), default=None)
    ap.add_argument("--no-trl", action="store_true")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        gptcore.set_num_threads(a.threads)
    threads = gptcore.get_num_threads()
    torch.set_num_threads(threads)
    cfg = GPTConfig(n_layer=a.layers, n_head=max(1, a.width // 64), n_embd=a.width, block_size=256,
                    vocab_size=50257)
    tok = get_tokenizer("gpt2")
    enc = TextEncoder(tok, cfg.block_size)
    beta, lr = 0.1, 5e-5
    print(f"bench_rlhf: {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}; "
          f"B {a.B}, prompt {a.P}, answer/new {a.L} tokens; {threads} threads; torch "
          f"{torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m")
        from gptcore.train.checkpoint import _saveable_tokenizer

        GPT(cfg, seed=0).save_pretrained(path, tokenizer=_saveable_tokenizer(tok))

        def fresh():
            return GPT.from_pretrained(path)

        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        if a.only in (None, "dpo"):
            pairs = _pairs((a.steps + a.warmup) * a.B, a.P, a.L)
            g, t, tr = [], [], []
            for _ in range(a.rounds):
                g += dpo_gptcore(fresh(), tok, pairs, a.B, a.steps, a.warmup, beta, lr)
                t += dpo_torch(path, pairs, enc, a.B, a.steps, a.warmup, beta, lr)
                if not a.no_trl:
                    tr += dpo_trl(path, pairs, enc, a.B, a.steps, a.warmup, beta, lr) or []
            rows.append(("DPO", "torch loop", med(g), med(t)))
            if tr:
                rows.append(("DPO", "TRL DPOTrainer", med(g), med(tr)))
        if a.only in (None, "ppo"):
            rng = np.random.default_rng(1)
            prompts = [_text(rng, a.P).lstrip() for _ in range(4 * a.B)]
            g, t = [], []
            for _ in range(a.rounds):
                g += ppo_gptcore(fresh(), tok, prompts, a.B, a.L, a.E, a.steps, a.warmup)
                t += ppo_torch(path, tok, prompts, a.B, a.L, a.E, a.steps, a.warmup)
            rows.append(("PPO", "torch loop", med(g), med(t)))
    print("\n| algorithm | baseline | gptcore tokens/s | baseline tokens/s | ratio |")
    print("|---|---|---:|---:|---:|")
    for alg, base, g, t in rows:
        print(f"| {alg} | {base} | {g:,.0f} | {t:,.0f} | {g / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
