"""`gptcore predict`: a fine-tuned model's predictions for a JSONL file of examples."""

from __future__ import annotations

import json
import sys

from ._args import positive_int


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "predict", help="predict labels with a model made by `gptcore finetune`",
        description="Read examples (JSONL, the task's format; labels optional) and write one JSON "
                    "object a line: {\"prediction\": ..., \"scores\": [...]}. When every example "
                    "has a label, the metrics go to stderr.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a `gptcore finetune --out` directory or its model/")
    p.add_argument("--input", required=True, metavar="FILE", help="JSONL examples")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="where to write the predictions (default: stdout; a file is replaced "
                        "only when all predictions are made)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="cpu")


def run(args, out=None) -> int:
    from .._fileio import atomic_file
    from ..data.tasks import read_jsonl
    from ..train.finetune import load_task_model, metrics

    tm = load_task_model(args.checkpoint, device=args.device)
    data = read_jsonl(args.input, tm.task, need_labels=False)
    scores = tm.scores(data, args.batch_size)
    preds = tm.labels_of(scores)
    lines = []
    for pred, s in zip(preds, scores):
        rec = {"prediction": pred}
        rec["score" if tm.labels.kind == "regression" else "scores"] = (
            float(s) if tm.labels.kind == "regression" else [float(v) for v in s])
        lines.append(json.dumps(rec) + "\n")
    if args.output:
        with atomic_file(args.output) as f:
            f.write("".join(lines).encode("utf-8"))
    else:
        (out or sys.stdout).write("".join(lines))
    if data.has_labels:
        m = metrics(tm.labels, scores, tm.labels.encode(data))
        print(f"{len(data)} examples: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()),
              file=sys.stderr)
    return 0
