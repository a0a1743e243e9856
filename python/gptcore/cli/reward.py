"""`gptcore reward-train` and `gptcore reward-score`: the reward model (InstructGPT step 2).

One module registers both subcommands (``_COMMANDS`` names it twice); :func:`run` dispatches on
the command's name."""

from __future__ import annotations

import argparse
import json
import sys

from ._args import positive_int
from .sft import add_recipe_options, recipe_kwargs

_TRAIN_EPILOG = """\
examples:
  gptcore reward-train --data rankings.jsonl --base runs/sft --out runs/rm
  gptcore reward-train --data rankings.jsonl --base runs/sft --demos demos.jsonl --out runs/rm
  gptcore reward-score --model runs/rm --data answers.jsonl

data (one JSON object a line; other keys are ignored, e.g. those the /rank page adds):
  {"prompt": ..., "ranked": [best, ..., worst]}         K >= 2 answers: C(K,2) pairs
  {"prompt": ..., "chosen": ..., "rejected": ...}       one pair
"""


def add_subcommand(sub) -> None:
    if "reward-train" in sub.choices:  # registered once for both names
        return
    from ..train.reward import RewardConfig

    d = RewardConfig()
    p = sub.add_parser(
        "reward-train", help="train a reward model on rankings (InstructGPT step 2)",
        description="Train a scalar reward on the last token of prompt + answer from rankings of "
                    "K answers (all C(K,2) pairs of a prompt in one batch, loss -log sigmoid("
                    "r_better - r_worse)); report held-out pair accuracy; normalise the reward so "
                    "demonstrations average 0.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=None, metavar="FILE", help="JSONL rankings or pairs")
    g.add_argument("--val", default=None, metavar="FILE",
                   help="JSONL held-out rankings (default: --val-fraction of --data's prompts)")
    g.add_argument("--base", default=None, metavar="CKPT",
                   help="the language model to start from (usually a `gptcore sft` run)")
    g.add_argument("--demos", default=None, metavar="FILE",
                   help="SFT JSONL whose demonstrations the reward is normalised on (default: "
                        "the best answer of every ranking)")
    g.add_argument("--out", default=None, metavar="DIR", help=f"run directory (default {d.out})")
    add_recipe_options(p, d, "rankings")

    s = sub.add_parser(
        "reward-score", help="score answers with a reward model",
        description="Read JSONL lines -- {\"prompt\", \"completion\"} (or {\"messages\"}: the "
                    "last assistant turn is scored), or rankings/pairs -- and write one JSON "
                    "object a line: {\"score\": r}, or {\"scores\": [...]} in the line's answer "
                    "order. Rankings' held-out pair accuracy goes to stderr.")
    s.add_argument("--model", required=True, metavar="DIR",
                   help="a `gptcore reward-train --out` directory or its model/")
    s.add_argument("--data", required=True, metavar="FILE", help="JSONL answers to score")
    s.add_argument("--output", default=None, metavar="FILE",
                   help="where to write the scores (default: stdout; a file is replaced only "
                        "when all are scored)")
    s.add_argument("--batch-size", type=positive_int, default=16)
    s.add_argument("--device", default="cpu")


def run(args, out=None) -> int:
    if args.command == "reward-score":
        return _score(args, out or sys.stdout)
    from ..train._run import INTERRUPTED_STATUS
    from ..train.reward import RewardConfig, train_reward

    if not args.resume:
        if args.data is None:
            raise ValueError("--data: required (a JSONL file of rankings)")
        if args.base is None:
            raise ValueError("--base: required (the language model to start from)")
    cfg = RewardConfig(data=args.data, base=args.base, demos=args.demos,
                       out=args.out or RewardConfig().out, resume=args.resume,
                       overwrite=args.overwrite, progress=not args.no_progress,
                       **recipe_kwargs(args))
    return INTERRUPTED_STATUS if train_reward(cfg).get("interrupted") else 0


def _score(args, out) -> int:
    import numpy as np

    from .._fileio import atomic_file, jsonl_records
    from ..data.preference import parse_ranking, pair_indices
    from ..data.sft import parse_sft_record
    from ..train.reward import load_reward_model, pair_accuracy

    rm = load_reward_model(args.model, device=args.device)
    lines = []  # (kind, number of answers)
    prompts, answers = [], []
    for lineno, rec in jsonl_records(args.data):
        where = f"{args.data}:{lineno}"
        if isinstance(rec, dict) and ("ranked" in rec or "chosen" in rec or "rejected" in rec):
            r = parse_ranking(rec, where)
            pairs = list(r.answers)
            lines.append(("ranking", len(pairs)))
        else:
            ex = parse_sft_record(rec, where)
            r, pairs = ex, [ex.completion]
            lines.append(("one", 1))
        for a in pairs:
            rm.encode(r.prompt, a, where)  # a prompt too long for the context: this line's error
            prompts.append(r.prompt)
            answers.append(a)
    if not lines:
        raise ValueError(f"--data: {args.data} holds no lines to score")
    scores = rm.score(prompts, answers, args.batch_size, progress=True)
    text, at, rb, rw = [], 0, [], []
    for kind, k in lines:
        s = scores[at: at + k]
        at += k
        if kind == "one":
            text.append(json.dumps({"score": float(s[0])}) + "\n")
        else:
            text.append(json.dumps({"scores": [float(v) for v in s]}) + "\n")
            for i, j in pair_indices(k):
                rb.append(s[i])
                rw.append(s[j])
    if args.output:
        with atomic_file(args.output) as f:
            f.write("".join(text).encode("utf-8"))
    else:
        out.write("".join(text))
    msg = f"{len(lines)} lines, {len(scores)} answers: mean reward {float(np.mean(scores)):.4f}"
    if rb:
        msg += f"; pair accuracy {pair_accuracy(rb, rw):.4f} on {len(rb)} pairs"
    print(msg, file=sys.stderr)
    return 0
