"""`gptcore sft`: supervised instruction tuning on demonstrations (InstructGPT step 1)."""

from __future__ import annotations

import argparse

from ._args import nonneg_float, positive_int

_EPILOG = """\
examples:
  gptcore sft --data demos.jsonl --base gptcore-run --out runs/sft
  gptcore sft --out runs/sft --resume                  continue a stopped run exactly
  gptcore sample --checkpoint runs/sft --prompt 'User: hi\\nAssistant: ' --stop '\\nUser:'

data (one JSON object a line):
  {"prompt": ..., "completion": ...}                    loss on the completion (+ end-of-text)
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
      rendered "{system}\\n\\n", "User: {content}\\n", "Assistant: {content}\\n";
      loss on the assistant contents
"""

# SFTConfig fields the options set (the option is the field with - for _)
_FIELDS = ("val", "val_fraction", "lr", "min_lr", "batch_size", "epochs", "warmup", "dropout",
           "weight_decay", "grad_clip", "beta2", "n_ctx", "eval_every", "seed", "device",
           "threads", "stop_after")


def add_recipe_options(p, d, what: str) -> None:
    """The options `gptcore sft` and `gptcore reward-train` share (defaults from config ``d``)."""
    g = p.add_argument_group("recipe")
    g.add_argument("--val-fraction", type=nonneg_float, default=None, metavar="F",
                   help=f"without --val, hold out this fraction of {what} (default "
                        f"{d.val_fraction:g})")
    g.add_argument("--lr", type=nonneg_float, default=None, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--min-lr", type=nonneg_float, default=None,
                   help=f"cosine decay ends here (default {d.min_lr:g})")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"{what} per step (default {d.batch_size})")
    g.add_argument("--epochs", type=positive_int, default=None, help=f"default {d.epochs}")
    g.add_argument("--warmup", type=nonneg_float, default=None, metavar="FRACTION",
                   help=f"linear warmup over this fraction of the steps (default {d.warmup:g})")
    g.add_argument("--dropout", type=nonneg_float, default=None, metavar="P",
                   help=f"trunk dropout (default {d.dropout:g})")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help=f"default {d.weight_decay:g}")
    g.add_argument("--grad-clip", type=nonneg_float, default=None, help=f"default {d.grad_clip:g}")
    g.add_argument("--beta2", type=nonneg_float, default=None, help=f"Adam beta2 (default {d.beta2:g})")
    g.add_argument("--n-ctx", type=positive_int, default=None,
                   help="longest sequence (default: the model's context)")
    g.add_argument("--eval-every", type=positive_int, default=None, metavar="STEPS",
                   help="validate every this many steps too (always after each epoch)")
    g.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run that --out already holds (otherwise refused)")
    g.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default {d.device})")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    g.add_argument("--stop-after", type=positive_int, default=None, metavar="STEPS",
                   help="stop (with a checkpoint) after this many steps, as if interrupted")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or messages")


def recipe_kwargs(args) -> dict:
    """The config keywords the shared options gave (those left out keep their defaults)."""
    return {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}


def add_subcommand(sub) -> None:
    from ..train.sft import SFTConfig

    d = SFTConfig()
    p = sub.add_parser(
        "sft", help="supervised instruction tuning on demonstrations (InstructGPT step 1)",
        description="Fine-tune a language model on demonstrations (prompt/completion or chat "
                    "messages), the loss on the completion tokens only. Writes log.jsonl, "
                    "checkpoint/ and model/ (a GPT-2 directory with its tokenizer) into --out.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=None, metavar="FILE", help="JSONL demonstrations")
    g.add_argument("--val", default=None, metavar="FILE",
                   help="JSONL held-out demonstrations (default: --val-fraction of --data)")
    g.add_argument("--base", default=None, metavar="CKPT",
                   help="the language model to tune: a `gptcore train` run, a gptcore/"
                        "transformers GPT-2 directory, an llm.c .bin")
    g.add_argument("--out", default=None, metavar="DIR", help=f"run directory (default {d.out})")
    add_recipe_options(p, d, "examples")


def run(args) -> int:
    from ..train._run import INTERRUPTED_STATUS
    from ..train.sft import SFTConfig, sft

    kw = recipe_kwargs(args)
    if not args.resume:
        if args.data is None:
            raise ValueError("--data: required (a JSONL file of demonstrations)")
        if args.base is None:
            raise ValueError("--base: required (the language model to tune)")
    cfg = SFTConfig(data=args.data, base=args.base, out=args.out or SFTConfig().out,
                    resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                    **kw)
    return INTERRUPTED_STATUS if sft(cfg).get("interrupted") else 0
