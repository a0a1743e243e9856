"""`gptcore prepare`: tokenize text files into llm.c-format train/val shards."""

from __future__ import annotations

from ._args import nonneg_float, positive_int


def add_subcommand(sub) -> None:
    pr = sub.add_parser(
        "prepare", help="tokenize text files into llm.c-format train/val shards",
        description="Tokenize text files into train_*.bin / val_*.bin shards (llm.c's format: "
                    "256 int32 header, uint16 tokens) plus meta.json. Each file is one document.")
    pr.add_argument("files", nargs="+", metavar="TEXT_FILE",
                    help="UTF-8 text files, or directories (every text file under them)")
    pr.add_argument("--out", required=True, metavar="DIR", help="output directory")
    pr.add_argument("--val-fraction", type=nonneg_float, default=0.05,
                    help="fraction of each document's tokens kept for validation (default 0.05)")
    pr.add_argument("--tokenizer", choices=["auto", "gpt2", "byte"], default="auto",
                    help="gpt2 (GPT-2 BPE), byte (UTF-8 bytes + end-of-text), or auto: gpt2 when "
                         "available (default auto)")
    pr.add_argument("--shard-tokens", type=positive_int, default=100_000_000,
                    help="maximum tokens per shard (default 100M)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> None:
    from ..data import prepare

    meta = prepare(args.files, args.out, val_fraction=args.val_fraction, tokenizer=args.tokenizer,
                   shard_tokens=args.shard_tokens, progress=not args.no_progress)
    print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}) from {meta['documents']} "
          f"files to {args.out}"
          + (f"; skipped {meta['skipped_files']} binary or non-UTF-8 files" if meta["skipped_files"] else ""))
