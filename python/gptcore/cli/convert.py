"""`gptcore convert`: a model, vocabulary or token shard from one format to another."""

from __future__ import annotations


def add_subcommand(sub) -> None:
    cv = sub.add_parser("convert", help="convert a model, vocabulary or token shard between formats",
                        description="Convert between gptcore/transformers checkpoint directories, "
                                    "llm.c model/tokenizer/shard .bin files, vocabulary files and .npy.")
    cv.add_argument("src", help="checkpoint dir (gptcore/transformers GPT-2 or GPT-1, or a `gptcore "
                                "train` run directory), llm.c "
                                "model/tokenizer/shard .bin, vocab.json/encoder.json/tokenizer.json, or .npy")
    cv.add_argument("dst", help="DST.bin: llm.c file; a directory: transformers layout (models) or "
                                "vocabulary files (vocabularies); DST.npy: tokens")
    cv.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="model weights' dtype (default: the source's)")
    cv.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args) -> None:
    from ..io.pretrained import convert
    from ._args import checkpoint_path

    print(convert(checkpoint_path(args.src), args.dst, dtype=args.dtype, overwrite=args.force))
