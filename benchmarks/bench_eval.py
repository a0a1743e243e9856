"""Scoring throughput on multiple-choice requests: gptcore's lm-eval backend beside the harness's
own ``hf`` backend (transformers + PyTorch on the CPU), same model, same requests, same run.

The model is a random-init GPT-2 124M (``--shape gpt2``; speed does not depend on the weights)
saved once in transformers' layout with GPT-2's tokenizer files, so both backends load the same
directory. The requests are HellaSwag-shaped: QUESTIONS contexts of 2/3..4/3 x CTX words, each
with 4 endings of 2/3..4/3 x END words (seeded random common words), sent as lm-eval ``Instance`` objects to each
backend's ``loglikelihood`` -- what ``simple_evaluate`` calls -- with the same batch size. Model
loading is not timed. Throughput is scored tokens per second: the tokens of every request's
context + continuation (the harness's encoding), over the wall time of the call; the ratio is
what the issue's target (>= 3x) refers to. The per-request log-likelihoods of the two backends
are compared too (max relative difference), so a fast wrong answer cannot pass unnoticed.

Also timed: gptcore with ``share_context=False`` (every request a full sequence), to show what
running each question's context once buys.

    python benchmarks/bench_eval.py [--questions 40] [--batch-size 16] [--shape gpt2|small] [--rounds 2]

Needs torch, transformers, accelerate and lm-eval (``pip install '.[compare]'``). gptcore is
imported before torch (see the note at the imports); both backends then share that OpenMP
runtime and its settings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

# gptcore before torch: torch's wheel carries its own libgomp.so.1, which the gptcore extension
# then binds to; whichever is imported first initialises it, and gptcore's import sets
# GOMP_SPINCOUNT (idle OpenMP threads stop spinning soon, leaving the cores to OpenBLAS) first.
# With torch imported first, gptcore ran 2.8x slower on this 2-core VM (measured, see RESULTS.md).
import gptcore  # noqa: F401,E402

WORDS = ("the a man woman dog cat house garden car road water fire table chair book window door "
         "walks runs opens closes takes puts looks sees finds holds pulls pushes into onto over "
         "under with from before after while quickly slowly then again small large old new red "
         "blue green bright dark kitchen street river morning evening friend child teacher ball "
         "bottle paper knife cup plate song game picture letter").split()


def requests(n_questions: int, ctx_words: int, end_words: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_questions):  # lengths vary by up to a third either way, as HellaSwag's do
        n = int(rng.integers(ctx_words * 2 // 3, ctx_words * 4 // 3 + 1))
        ctx = " ".join(rng.choice(WORDS, n)).capitalize() + "."
        for _ in range(4):
            m = int(rng.integers(end_words * 2 // 3, end_words * 4 // 3 + 1))
            out.append((ctx, " " + " ".join(rng.choice(WORDS, m)) + "."))
    return out


def save_model(path: str, shape: str) -> None:
    import torch
    import transformers as tr

    from gptcore.tokenizer import Tokenizer

    kw = {"gpt2": {}, "small": dict(n_layer=4, n_embd=256, n_head=4)}[shape]
    torch.manual_seed(0)
    model = tr.GPT2LMHeadModel(tr.GPT2Config(**kw)).eval()
    model.save_pretrained(path)
    vocab = os.path.join(path, "_vocab")
    Tokenizer.gpt2().save(vocab)  # encoder.json / vocab.bpe: transformers' vocab.json / merges.txt
    shutil.copy(os.path.join(vocab, "encoder.json"), os.path.join(path, "vocab.json"))
    shutil.copy(os.path.join(vocab, "vocab.bpe"), os.path.join(path, "merges.txt"))
    shutil.rmtree(vocab)


def timed(lm, insts):
    t0 = time.perf_counter()
    res = lm.loglikelihood(insts)
    return time.perf_counter() - t0, np.array([r[0] for r in res])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--ctx-words", type=int, default=45)
    ap.add_argument("--end-words", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shape", choices=["gpt2", "small"], default="gpt2")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gptcore.eval.harness import GPTCoreLM

    load0 = os.getloadavg()
    reqs = requests(args.questions, args.ctx_words, args.end_words)
    insts = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
             for i, r in enumerate(reqs)]
    with tempfile.TemporaryDirectory() as d:
        save_model(d, args.shape)
        ours = GPTCoreLM(checkpoint=d, batch_size=args.batch_size)
        plain = GPTCoreLM(checkpoint=d, batch_size=args.batch_size, share_context=False)
        hf = HFLM(pretrained=d, tokenizer=d, device="cpu", batch_size=args.batch_size,
                  dtype="float32")
        pairs = [ours.scorer.encode_pair(*r) for r in reqs]
        n_tok = sum(len(a) + len(b) for a, b in pairs)
        n_cont = sum(len(b) for _, b in pairs)
        ours.loglikelihood(insts[:8])  # warm-up: workspaces, thread pools
        hf.loglikelihood(insts[:8], disable_tqdm=True)
        # rounds interleave the backends; each keeps its fastest round (the machine may be shared)
        t_ours = t_plain = t_hf = float("inf")
        for _ in range(args.rounds):
            t, ll_ours = timed(ours, insts)
            t_ours = min(t_ours, t)
            t, ll_plain = timed(plain, insts)
            t_plain = min(t_plain, t)
            t0 = time.perf_counter()
            ll_hf = np.array([r[0] for r in hf.loglikelihood(insts, disable_tqdm=True)])
            t_hf = min(t_hf, time.perf_counter() - t0)
    rel = float(np.max(np.abs(ll_ours - ll_hf) / np.abs(ll_hf)))
    rel_plain = float(np.max(np.abs(ll_plain - ll_hf) / np.abs(ll_hf)))
    print(f"model: random-init GPT-2 ({args.shape}), {len(reqs)} requests "
          f"({args.questions} questions x 4 endings), {n_tok} request tokens "
          f"({n_cont} continuation tokens), batch size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, best of "
          f"{args.rounds} interleaved rounds, load average before {load0} after {os.getloadavg()}")
    print("| backend | time (s) | scored tokens/s | continuation tokens/s | vs hf |")
    print("|---|---:|---:|---:|---:|")
    for name, t in (("gptcore (shared contexts)", t_ours), ("gptcore (share_context=False)", t_plain),
                    ("lm-eval hf (transformers + torch CPU)", t_hf)):
        print(f"| {name} | {t:.2f} | {n_tok / t:,.0f} | {n_cont / t:,.0f} | {t_hf / t:.2f}x |")
    print(f"max relative difference of the log-likelihoods vs hf: {rel:.2e} (shared), "
          f"{rel_plain:.2e} (plain)")


if __name__ == "__main__":
    main()
