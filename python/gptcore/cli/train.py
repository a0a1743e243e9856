"""`gptcore train`: train (or resume) a model; with no arguments a small CPU demo."""

from __future__ import annotations

import argparse
import sys

from ._args import nonneg_float, nonneg_int, positive_int

_TRAIN_EPILOG = """\
examples:
  gptcore train                                   demo: small model, stdlib corpus, minutes on 2 cores
  gptcore prepare book.txt --out data/book        tokenize text into train/val shards
  gptcore train --data data/book --preset small --steps 2000 --out runs/book
  gptcore train --out runs/book --resume          continue that run exactly where it stopped
  gptcore train --init-from runs/book/checkpoint --data data/other --out runs/other
                                                  start from trained weights on new data
  gptcore train --preset gpt2 --data DIR --device cuda --dtype bf16 --batch-size 8 --seq-len 1024

Press Ctrl-C once to stop after the current step with a checkpoint (resume with --resume);
the command then exits with status 130. An --out that already holds a run is refused unless
--resume or --overwrite says what to do with it.
"""



def add_subcommand(sub) -> None:
    from ..models.config import PRESETS
    from ..train import TrainConfig

    d = TrainConfig()
    t = sub.add_parser(
        "train", help="train (or resume) a model; no arguments = a small CPU demo",
        description="Train a GPT model. With no arguments: a small byte-level model (0.8M parameters)\n"
                    "on a few MB of Python's standard-library sources, prepared once into\n"
                    "~/.cache/gptcore; a few minutes on a 2-core CPU, ending with a sample.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = t.add_argument_group("model and data")
    presets = ", ".join(PRESETS)
    g.add_argument("--preset", default=None, metavar="NAME",
                   help=f"model preset (default {d.preset}): {presets}")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="a directory made by `gptcore prepare` (default: the built-in stdlib corpus)")
    g.add_argument("--n-layer", type=positive_int, default=None, help="override the preset's depth")
    g.add_argument("--n-head", type=positive_int, default=None, help="override the preset's head count")
    g.add_argument("--n-embd", type=positive_int, default=None, help="override the preset's width")
    g.add_argument("--block-size", type=positive_int, default=None,
                   help="override the preset's number of positions")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from the weights (and architecture) of a checkpoint: a gptcore run's "
                        "checkpoint/, a transformers GPT-2/GPT-1 directory or an llm.c .bin; a "
                        "fresh optimizer and schedule (default lr 1e-4)")
    g.add_argument("--dropout", type=nonneg_float, default=None, metavar="P",
                   help="dropout probability on embeddings, attention and residuals, as GPT-1/2 "
                        "trained (default 0)")
    g = t.add_argument_group("hardware")
    g.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default {d.device})")
    g.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16"],
                   help="parameter/activation dtype; bf16 = mixed precision on CUDA (default float32)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the kernels (default: all cores)")
    g = t.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default 1500)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence (default min(block_size, 256))")
    g.add_argument("--grad-accum", type=positive_int, default=None,
                   help=f"micro-batches per step (default {d.grad_accum})")
    g.add_argument("--lr", type=nonneg_float, default=None, help="peak learning rate (default 3e-3 for the demo presets, 6e-4 otherwise)")
    g.add_argument("--min-lr-ratio", type=nonneg_float, default=None,
                   help=f"final lr as a fraction of --lr (default {d.min_lr_ratio})")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=None,
                   help=f"lr decay after warmup (default {d.schedule})")
    g.add_argument("--warmup", type=nonneg_int, default=None, help="warmup steps (default min(50, --steps))")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help=f"AdamW weight decay on 2-D weights (default {d.weight_decay})")
    g.add_argument("--grad-clip", type=nonneg_float, default=None,
                   help=f"clip the global gradient norm to this (0 = off; default {d.grad_clip})")
    g.add_argument("--seed", type=int, default=None, help=f"seed for init and batches (default {d.seed})")
    g = t.add_argument_group("evaluation, output and resuming")
    g.add_argument("--eval-every", type=nonneg_int, default=None,
                   help="evaluate and checkpoint every N steps, 0 = only at the end (default 250)")
    g.add_argument("--eval-batches", type=positive_int, default=None,
                   help="validation batches per evaluation (default 8)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help=f"run directory for log.jsonl and checkpoint/ (default ./{d.out})")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from OUT/checkpoint (or the checkpoint directory CKPT) exactly")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run that OUT already holds (its log and checkpoint)")
    g.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
    g.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop after step N with a checkpoint, as if interrupted (for testing resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    g = t.add_argument_group("sample printed at the end")
    g.add_argument("--sample-tokens", type=nonneg_int, default=None,
                   help=f"tokens to sample at the end, 0 = none (default {d.sample_tokens})")
    g.add_argument("--temperature", type=nonneg_float, default=None,
                   help=f"sampling temperature, 0 = greedy (default {d.temperature})")
    g.add_argument("--top-k", type=nonneg_int, default=None,
                   help=f"sample from the k most likely tokens, 0 = all (default {d.top_k})")
    g.add_argument("--prompt", default=None, help="text the sample continues (default 'def ' for the demo)")


def train_config(args):
    from ..train import TrainConfig

    mapping = {
        "preset": args.preset, "data": args.data, "device": args.device, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
        "lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "schedule": args.schedule,
        "warmup": args.warmup, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
        "seed": args.seed, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
        "out": args.out, "stop_after": args.stop_after, "sample_tokens": args.sample_tokens,
        "temperature": args.temperature, "prompt": args.prompt, "threads": args.threads,
    }
    kw = {k: v for k, v in mapping.items() if v is not None}
    if args.dtype is not None:
        kw["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    if args.top_k is not None:
        kw["top_k"] = args.top_k or None
    if args.resume is not None:
        kw["resume"] = args.resume
    if args.no_checkpoint:
        kw["checkpoint"] = False
    if args.overwrite:
        kw["overwrite"] = True
    if args.init_from is not None:
        if args.preset is not None:
            raise ValueError("--init-from takes the architecture from the checkpoint; drop --preset")
        kw["init_from"] = args.init_from
    if args.no_progress:
        kw["progress"] = False
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                 if getattr(args, k) is not None}
    if args.dropout is not None:
        if args.dropout >= 1:
            raise ValueError(f"--dropout: expected a probability in [0, 1), got {args.dropout}")
        overrides.update(embd_pdrop=args.dropout, attn_pdrop=args.dropout, resid_pdrop=args.dropout)
    if overrides:
        kw["model_overrides"] = overrides
    if args.resume is not None:
        from ..train import RUN_CONTROL_FIELDS

        ignored = sorted(k for k in kw if k not in RUN_CONTROL_FIELDS + ("overwrite", "init_from"))
        if ignored:
            print(f"note: resuming uses the checkpoint's settings; ignoring "
                  f"{', '.join('--' + k.replace('_', '-') for k in ignored)}", file=sys.stderr)
    return TrainConfig(**kw)


def run(args) -> int:
    from ..train import train

    from ..train._run import INTERRUPTED_STATUS

    summary = train(train_config(args))  # Ctrl-C: a stopped run, not a finished one
    return INTERRUPTED_STATUS if summary.get("interrupted") else 0
