"""`gptcore finetune`: GPT-1 style fine-tuning on labelled JSONL; no data = the transfer demo."""

from __future__ import annotations

import argparse

from ._args import nonneg_float, positive_int

_EPILOG = """\
examples:
  gptcore finetune                       demo: pre-train (cached), then fine-tuned vs from-scratch
                                         vs LM weight 0 on three tasks built from Python's stdlib
  gptcore finetune --task entail --train train.jsonl --val val.jsonl \\
                   --checkpoint gptcore-run --out runs/entail
  gptcore finetune --out runs/entail --resume          continue a stopped run exactly
  gptcore predict --checkpoint runs/entail --input test.jsonl --output predictions.jsonl

data (one JSON object a line):
  classify  {"text": ..., "label": ...}
  entail    {"premise": ..., "hypothesis": ..., "label": ...}
  similar   {"text_a": ..., "text_b": ..., "label": ...}   (a float label: regression)
  choice    {"context": ..., "choices": [...], "label": index of the right choice}
"""


def add_subcommand(sub) -> None:
    from ..data.tasks import TASKS
    from ..train.finetune import FinetuneConfig

    d = FinetuneConfig()
    f = sub.add_parser(
        "finetune", help="fine-tune a pre-trained model on a labelled task (GPT-1); no data = demo",
        description="Fine-tune a pre-trained GPT on a classification, entailment, similarity or "
                    "multiple-choice task as GPT-1 did: start/delimiter/extract tokens added to the "
                    "vocabulary, a linear head on the extract token, task loss + LM weight x LM "
                    "loss. Without --train: the demo (pre-training is cached in ~/.cache/gptcore).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = f.add_argument_group("task and data")
    g.add_argument("--task", choices=TASKS, default=None, help="the task's format (required with --train)")
    g.add_argument("--train", default=None, metavar="FILE", help="labelled JSONL training examples")
    g.add_argument("--val", default=None, metavar="FILE", help="labelled JSONL validation examples "
                   "(evaluated after every epoch)")
    g.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="the pre-trained model: a `gptcore train` run, a gptcore/transformers GPT-2 "
                        "or GPT-1 directory, an llm.c .bin")
    g.add_argument("--out", default=None, metavar="DIR",
                   help=f"run directory: log.jsonl, checkpoint/, model/ (default {d.out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run that --out already holds (otherwise refused)")
    g.add_argument("--n-ctx", type=positive_int, default=None,
                   help="longest sequence (default: the model's context); longer inputs are cut")
    g = f.add_argument_group("recipe (defaults: GPT-1's)")
    g.add_argument("--lr", type=nonneg_float, default=None, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"examples per step (default {d.batch_size})")
    g.add_argument("--epochs", type=positive_int, default=None, help=f"default {d.epochs}")
    g.add_argument("--warmup", type=nonneg_float, default=None, metavar="FRACTION",
                   help=f"linear warmup over this fraction of the steps, then linear decay to 0 "
                        f"(default {d.warmup:g})")
    g.add_argument("--lm-weight", type=nonneg_float, default=None, metavar="LAMBDA",
                   help=f"weight of the auxiliary LM loss (default {d.lm_weight:g}; 0 turns it off)")
    g.add_argument("--dropout", type=nonneg_float, default=None, metavar="P",
                   help=f"trunk dropout (default {d.dropout:g})")
    g.add_argument("--head-dropout", type=nonneg_float, default=None, metavar="P",
                   help=f"dropout before the head (default {d.head_dropout:g})")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help=f"decoupled, on >= 2-D weights (default {d.weight_decay:g})")
    g.add_argument("--grad-clip", type=nonneg_float, default=None, help=f"default {d.grad_clip:g}")
    g.add_argument("--beta2", type=nonneg_float, default=None, help=f"Adam beta2 (default {d.beta2:g})")
    g.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    g = f.add_argument_group("run")
    g.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default {d.device})")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    g.add_argument("--stop-after", type=positive_int, default=None, metavar="STEPS",
                   help="stop (with a checkpoint) after this many steps, as if interrupted")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    g.add_argument("--seeds", type=positive_int, default=None,
                   help="demo only: fine-tuning seeds per table cell (default 2)")


_RECIPE = ("lr", "batch_size", "epochs", "warmup", "lm_weight", "dropout", "head_dropout",
           "weight_decay", "grad_clip", "beta2", "seed", "n_ctx", "device", "threads",
           "stop_after")


def run(args) -> int:
    if args.train is None and not args.resume:
        if args.task or args.val or args.checkpoint:
            raise ValueError("--train: needed with --task/--val/--checkpoint (without --train, "
                             "`gptcore finetune` runs the demo)")
        from ..train.tasks_demo import run_demo

        run_demo(out=args.out or "gptcore-finetune-demo", seeds=args.seeds or 2,
                 threads=args.threads, progress=not args.no_progress)
        return 0
    from ..train.finetune import FinetuneConfig, finetune

    kw = {k: getattr(args, k) for k in _RECIPE if getattr(args, k) is not None}
    if args.resume:
        kw.update(task=args.task or "classify", train=args.train, val=args.val,
                  checkpoint=args.checkpoint)
    else:
        if args.task is None:
            raise ValueError("--task: required with --train (classify, entail, similar or choice)")
        if args.checkpoint is None:
            raise ValueError("--checkpoint: required (the pre-trained model to fine-tune)")
        kw.update(task=args.task, train=args.train, val=args.val, checkpoint=args.checkpoint)
    cfg = FinetuneConfig(out=args.out or FinetuneConfig().out, resume=args.resume,
                         overwrite=args.overwrite,
                         progress=not args.no_progress, **kw)
    from ..train._run import INTERRUPTED_STATUS

    return INTERRUPTED_STATUS if finetune(cfg).get("interrupted") else 0
