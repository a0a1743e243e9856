"""`gptcore eval`: zero-, one- and few-shot evaluation of a checkpoint on task files."""

from __future__ import annotations

import datetime
import json
import math
import sys
from typing import Dict, List, Sequence

from .._fileio import write_atomic
from .._progress import Progress
from ..eval import Scorer, evaluate, load_task
from ._args import positive_int
from .sample import load_for_sampling

__all__ = ["add_subcommand", "run", "format_table"]


def _shots(text: str) -> List[int]:
    import argparse

    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,1,5, got {text!r}") from None
    if not out or any(k < 0 for k in out):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0 like 0,1,5, got {text!r}")
    return sorted(set(out))


def add_subcommand(subparsers) -> None:
    """Registers ``gptcore eval`` on an argparse sub-parser collection."""
    import argparse

    s = subparsers.add_parser(
        "eval", help="zero/one/few-shot evaluation on task files (accuracy, perplexity)",
        description="Evaluate a checkpoint on JSONL task files (multiple choice, cloze, "
                    "perplexity, generation) or HellaSwag / LAMBADA / WikiText files, with k "
                    "demonstrations in context. Prints a results table and writes it as JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="task file: a header line {\"kind\": \"multiple_choice\"|\"cloze\"|\"perplexity\"|"
               "\"generation\", ...} then one JSON example per line (see README, 'Evaluation').\n"
               "examples:\n"
               "  gptcore eval --checkpoint gpt2-dir --task hellaswag_val.jsonl --shots 0 --limit 500\n"
               "  gptcore eval --checkpoint run --task qa.jsonl --shots 0,1,5 --plot shots.png\n")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="the model to evaluate")
    s.add_argument("--task", required=True, action="append", metavar="FILE",
                   help="a task file (repeatable)")
    s.add_argument("--format", default="auto",
                   choices=["auto", "gptcore", "hellaswag", "lambada", "wikitext"],
                   help="the task files' format (default: detected)")
    s.add_argument("--fewshot-file", default=None, metavar="FILE",
                   help="demonstrations' pool for every task (default: the task file's "
                        "\"split\": \"train\" examples, else its other examples)")
    s.add_argument("--shots", type=_shots, default=[0], metavar="K,K,...",
                   help="numbers of demonstrations (default 0)")
    s.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N examples of each task")
    s.add_argument("--seed", type=int, default=1234, help="draws the demonstrations (default 1234)")
    s.add_argument("--batch-size", type=positive_int, default=16, metavar="N")
    s.add_argument("--out", default="eval-results.json", metavar="FILE",
                   help="results JSON (default eval-results.json)")
    s.add_argument("--plot", default=None, metavar="PNG",
                   help="bar plot of accuracy against shots (needs matplotlib)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    s.add_argument("--tokenizer", default=None, metavar="NAME|DIR",
                   help="gpt2, byte, or a directory with vocab.json + merges.txt "
                        "(default: the checkpoint's)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.4f}"


def format_table(rows: Sequence[Dict]) -> str:
    """The results as an aligned text table: task, shots, metric, value, stderr."""
    head = ("task", "shots", "metric", "value", "stderr")
    body = [(r["task"], str(r["shots"]), r["metric"], _fmt(r["value"]), _fmt(r["stderr"]))
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def run(args, out=None) -> int:
    """Runs ``gptcore eval`` for parsed ``args``; the table goes to ``out`` (default stdout)."""
    out = out or sys.stdout
    if args.plot:  # refuse before minutes of scoring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RuntimeError("--plot needs matplotlib: pip install 'gptcore[plot]'") from None
    tasks = [load_task(t, format=args.format, fewshot_path=args.fewshot_file) for t in args.task]
    model, tok = load_for_sampling(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    scorer = Scorer(model.eval(), tok, batch_size=args.batch_size)
    bar = (lambda desc, total: Progress(total, desc, unit="req")) if not args.no_progress else None
    rows: List[Dict] = []
    for task in tasks:
        shots = [0] if task.kind == "perplexity" else args.shots
        rows += evaluate(scorer, task, shots=shots, limit=args.limit, seed=args.seed, progress=bar)
    out.write(format_table(rows) + "\n")
    if scorer.truncated:
        out.write(f"note: {scorer.truncated} request(s) were longer than the model's "
                  f"{scorer.max_length} positions and kept their last tokens\n")
    report = {"checkpoint": args.checkpoint, "tasks": [t.path for t in tasks],
              "shots": args.shots, "limit": args.limit, "seed": args.seed,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "truncated_requests": scorer.truncated, "results": rows}
    write_atomic(args.out, [json.dumps(report, indent=2).encode("utf-8") + b"\n"])
    out.write(f"wrote {args.out}\n")
    if args.plot:
        from ..eval.plot import plot_shots

        plot_shots(rows, args.plot)
        out.write(f"wrote {args.plot}\n")
    return 0
