"""`gptcore instruct-demo`: InstructGPT's pipeline (SFT, rankings, reward model, PPO, DPO) on the
CPU in minutes, ranked by a property a program checks: the completed line of Python parses."""

from __future__ import annotations

import argparse

from ._args import checkpoint_path, positive_int

_EPILOG = """\
examples:
  gptcore instruct-demo                        the whole demo (pre-training cached)
  gptcore instruct-demo --quick --out /tmp/d   every stage, tiny (under a minute)
  gptcore instruct-demo --seeds 1 --overwrite  one run of each stage (+- over prompts)

The output directory gets results.md (the table), results.json, ppo_curve.png (with matplotlib),
the prompts, and per seed seed-<i>/ with the rankings and every stage's run directory.
"""


def add_subcommand(sub) -> None:
    f = sub.add_parser(
        "instruct-demo",
        help="SFT -> rankings -> reward model -> PPO and DPO on a checked property (a demo)",
        description="InstructGPT's pipeline end to end on the demo model pre-trained on Python "
                    "sources: the 'labeler' ranks sampled completions of a line of Python by "
                    "whether the finished line parses (checked, not learned), so the table's "
                    "true rate cannot be faked by the reward model.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--out", default="gptcore-instruct-demo", metavar="DIR",
                   help="output directory (default gptcore-instruct-demo); refused if it holds a "
                        "previous run, unless --overwrite")
    f.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    f.add_argument("--quick", action="store_true",
                   help="a tiny version of every stage (numbers mean nothing; it checks the "
                        "pipeline runs)")
    f.add_argument("--base", type=checkpoint_path, default=None, metavar="CHECKPOINT",
                   help="start from this byte-level model instead of the demo's pre-trained one "
                        "(cached in ~/.cache/gptcore after its first run)")
    f.add_argument("--seeds", type=positive_int, default=3,
                   help="runs of every stage after pre-training, each with its own seed, for "
                        "the table's mean +- std (default 3)")
    f.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    f.add_argument("--no-progress", action="store_true", help="no progress bars or messages")


def run(args) -> int:
    from ..train.instruct_demo import run_demo

    res = run_demo(out=args.out, quick=args.quick, seeds=args.seeds, threads=args.threads,
                   overwrite=args.overwrite, progress=not args.no_progress, base=args.base)
    from ..train._run import INTERRUPTED_STATUS

    return INTERRUPTED_STATUS if res.get("interrupted") else 0
