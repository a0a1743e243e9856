"""`gptcore dpo`: Direct Preference Optimization of an SFT model on preference pairs/rankings."""

from __future__ import annotations

import argparse

from ._args import checkpoint_path, nonneg_float, nonneg_int, positive_int

_EPILOG = """\
examples:
  gptcore dpo --data pairs.jsonl --policy runs/sft --out runs/dpo
  gptcore dpo --data rankings.jsonl --val val.jsonl --policy runs/sft --ref runs/sft \\
              --beta 0.1 --precompute-ref --out runs/dpo

data (one JSON object a line; rankings are expanded to their C(K, 2) pairs):
  {"prompt": ..., "chosen": ..., "rejected": ...}
  {"prompt": ..., "ranked": [best, ..., worst]}
"""


def add_subcommand(sub) -> None:
    from ..train.dpo import DPOConfig

    d = DPOConfig()
    f = sub.add_parser(
        "dpo", help="Direct Preference Optimization of an SFT model on preference pairs",
        description="DPO (Rafailov et al. 2023): loss -log sigmoid(beta * ((log pi(y_w) - log "
                    "ref(y_w)) - (log pi(y_l) - log ref(y_l)))) with log-probs summed over each "
                    "answer, against a frozen reference. Writes log.jsonl and model/ into --out.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = f.add_argument_group("data and models")
    g.add_argument("--data", required=True, metavar="FILE", help="JSONL pairs and/or rankings")
    g.add_argument("--val", default=None, metavar="FILE", help="held-out pairs (validated)")
    g.add_argument("--policy", required=True, type=checkpoint_path, metavar="CKPT",
                   help="the model to tune (an SFT checkpoint or run directory)")
    g.add_argument("--ref", default=None, type=checkpoint_path, metavar="CKPT",
                   help="the frozen reference (default: the policy's checkpoint)")
    g.add_argument("--out", default=d.out, metavar="DIR", help=f"run directory (default {d.out})")
    g.add_argument("--overwrite", action="store_true", help="replace a run --out already holds")
    g = f.add_argument_group("recipe")
    g.add_argument("--beta", type=nonneg_float, default=d.beta, help=f"default {d.beta:g}")
    g.add_argument("--lr", type=nonneg_float, default=d.lr, help=f"default {d.lr:g}")
    g.add_argument("--warmup", type=nonneg_int, default=d.warmup, metavar="STEPS",
                   help=f"linear warmup steps, then constant (default {d.warmup})")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"pairs per step (default {d.batch_size})")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay,
                   help=f"default {d.weight_decay:g}")
    g.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip, help=f"default {d.grad_clip:g}")
    g.add_argument("--precompute-ref", action="store_true",
                   help="score every pair with the reference once, up front, then free it")
    g.add_argument("--val-every", type=nonneg_int, default=d.val_every, metavar="STEPS",
                   help="validate every this many steps (default: each epoch's end)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    g = f.add_argument_group("run")
    g.add_argument("--device", default=d.device, help=f"cpu, cuda or cuda:N (default {d.device})")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    g.add_argument("--stop-after", type=positive_int, default=None, metavar="STEPS",
                   help="stop (saving model/) after this many steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or messages")


_FIELDS = ("data", "val", "policy", "ref", "out", "overwrite", "beta", "lr", "warmup",
           "batch_size", "epochs", "weight_decay", "grad_clip", "precompute_ref", "val_every",
           "seed", "device", "threads", "stop_after")


def run(args) -> int:
    from ..train._run import INTERRUPTED_STATUS
    from ..train.dpo import DPOConfig, dpo

    cfg = DPOConfig(progress=not args.no_progress, **{k: getattr(args, k) for k in _FIELDS})
    return INTERRUPTED_STATUS if dpo(cfg).get("interrupted") else 0
