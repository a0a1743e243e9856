"""`gptcore ppo`: RLHF, InstructGPT's step 3 -- PPO against a reward model with a KL leash."""

from __future__ import annotations

import argparse

from ._args import checkpoint_path, nonneg_float, nonneg_int, positive_int

_EPILOG = """\
examples:
  gptcore ppo --policy runs/sft --reward-model runs/rm --prompts prompts.jsonl --out runs/ppo
  gptcore ppo --policy runs/sft --reward-model runs/rm --prompts prompts.txt --steps 100 \\
              --kl-coef 0.05 --stop '\\n' --ptx-coef 0.5 --ptx-data data/ --out runs/ppo

prompts: a .jsonl file of {"prompt": ...} records, or a text file with one prompt a line.
log.jsonl has one record per step: reward, kl, entropy, clipfrac, policy_loss, value_loss, ...
"""


def add_subcommand(sub) -> None:
    from ..train.ppo import PPOConfig

    d = PPOConfig()
    f = sub.add_parser(
        "ppo", help="PPO against a reward model with a KL penalty to the SFT model (RLHF)",
        description="InstructGPT's RL step: rollouts sampled from the policy, scored by the reward "
                    "model, per-token reward -kl_coef * (log pi - log ref) plus the score on the "
                    "last token, GAE, clipped policy and value objectives. Writes log.jsonl, "
                    "samples.jsonl and model/ into --out.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = f.add_argument_group("data and models")
    g.add_argument("--policy", required=True, type=checkpoint_path, metavar="CKPT",
                   help="the SFT model to tune")
    g.add_argument("--reward-model", required=True, metavar="DIR",
                   help="a `gptcore reward-train` model directory")
    g.add_argument("--prompts", required=True, metavar="FILE", help="prompts (.jsonl or text)")
    g.add_argument("--ref", default=None, type=checkpoint_path, metavar="CKPT",
                   help="the frozen reference (default: the policy's checkpoint)")
    g.add_argument("--out", default=d.out, metavar="DIR", help=f"run directory (default {d.out})")
    g.add_argument("--overwrite", action="store_true", help="replace a run --out already holds")
    g = f.add_argument_group("rollouts")
    g.add_argument("--steps", type=positive_int, default=d.steps, help=f"rollout batches (default {d.steps})")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"rollouts per step (default {d.batch_size})")
    g.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                   help=f"default {d.max_new_tokens}")
    g.add_argument("--temperature", type=nonneg_float, default=d.temperature,
                   help=f"sampling temperature (default {d.temperature:g})")
    g.add_argument("--top-p", type=nonneg_float, default=None, help="nucleus sampling (default off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a completion ends after this text (repeatable; backslash escapes such "
                        "as \\n are read)")
    g = f.add_argument_group("PPO")
    g.add_argument("--kl-coef", type=nonneg_float, default=d.kl_coef, help=f"beta (default {d.kl_coef:g})")
    g.add_argument("--minibatch-size", type=positive_int, default=d.minibatch_size,
                   help=f"default {d.minibatch_size}")
    g.add_argument("--ppo-epochs", type=positive_int, default=d.ppo_epochs, help=f"default {d.ppo_epochs}")
    g.add_argument("--clip", type=nonneg_float, default=d.clip, help=f"default {d.clip:g}")
    g.add_argument("--value-clip", type=nonneg_float, default=d.value_clip, help=f"default {d.value_clip:g}")
    g.add_argument("--gamma", type=nonneg_float, default=d.gamma, help=f"default {d.gamma:g}")
    g.add_argument("--lam", type=nonneg_float, default=d.lam, help=f"GAE lambda (default {d.lam:g})")
    g.add_argument("--no-whiten", action="store_true", help="do not whiten the advantages")
    g.add_argument("--lr", type=nonneg_float, default=d.lr, help=f"policy lr (default {d.lr:g})")
    g.add_argument("--value-lr", type=nonneg_float, default=d.value_lr, help=f"default {d.value_lr:g}")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay,
                   help=f"policy weight decay (default {d.weight_decay:g})")
    g.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip, help=f"default {d.grad_clip:g}")
    g.add_argument("--ptx-coef", type=nonneg_float, default=d.ptx_coef,
                   help="PPO-ptx: weight of the pre-training LM loss (default 0: off)")
    g.add_argument("--ptx-data", default=None, metavar="PATH",
                   help="pre-training data: a `gptcore prepare` directory, a .bin shard, a text file")
    g.add_argument("--ptx-batch-size", type=positive_int, default=d.ptx_batch_size,
                   help=f"default {d.ptx_batch_size}")
    g.add_argument("--ptx-seq-len", type=positive_int, default=None, help="default: the context")
    g.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    g = f.add_argument_group("run")
    g.add_argument("--samples-per-step", type=nonneg_int, default=d.samples_per_step,
                   help=f"rollouts kept in samples.jsonl per step (default {d.samples_per_step})")
    g.add_argument("--device", default=d.device, help=f"cpu, cuda or cuda:N (default {d.device})")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or messages")


_FIELDS = ("policy", "reward_model", "prompts", "ref", "out", "overwrite", "steps", "batch_size",
           "max_new_tokens", "temperature", "top_p", "kl_coef", "minibatch_size", "ppo_epochs",
           "clip", "value_clip", "gamma", "lam", "lr", "value_lr", "weight_decay", "grad_clip",
           "ptx_coef", "ptx_data", "ptx_batch_size", "ptx_seq_len", "seed", "samples_per_step",
           "device", "threads")


def run(args) -> int:
    from ..train._run import INTERRUPTED_STATUS
    from ..train.ppo import PPOConfig, ppo

    stop = None
    if args.stop:
        stop = [s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in args.stop]
    cfg = PPOConfig(progress=not args.no_progress, whiten=not args.no_whiten, stop=stop,
                    **{k: getattr(args, k) for k in _FIELDS})
    return INTERRUPTED_STATUS if ppo(cfg).get("interrupted") else 0
