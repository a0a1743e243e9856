"""The ``gptcore`` command: ``train``, ``prepare``, ``sample``, ``convert`` and ``eval``.

``gptcore train`` with no arguments trains a small byte-level model on a few MB of the running
Python's standard library (prepared once into ~/.cache/gptcore) and prints a sample.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import convert, prepare, sample, train
from . import eval as eval_command  # (named so it does not hide the builtin eval)
from . import finetune, predict
from . import dpo, ppo
from . import reward, sft
from . import instruct_demo
from . import serve

__all__ = ["main", "build_parser"]

# One module per subcommand, each with add_subcommand(subparsers) and run(args).
_COMMANDS = {"train": train, "prepare": prepare, "sample": sample, "convert": convert,
             "serve": serve,
             "eval": eval_command, "finetune": finetune, "predict": predict,
             "sft": sft, "reward-train": reward, "reward-score": reward,
             "instruct-demo": instruct_demo,
             "dpo": dpo, "ppo": ppo}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptcore",
        description="Train and prepare data for GPT-1/2/3 models on gptcore's own C++/CUDA kernels.",
        epilog="Run `gptcore COMMAND --help` for a command's options.\n"
               "Start with `gptcore train` (no arguments): a CPU demo of a few minutes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gptcore {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS.values():
        command.add_subcommand(sub)
    return p


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "?"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        status = _COMMANDS[args.command].run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError,
            MemoryError) as e:
        if os.environ.get("GPTCORE_DEBUG"):
            raise
        print(f"gptcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptcore {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":  # python -m gptcore.cli
    sys.exit(main())
