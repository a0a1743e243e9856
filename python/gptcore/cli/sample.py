"""`gptcore sample`: load a checkpoint and complete prompts."""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

from ..generate.decode import complete
from ._args import checkpoint_path

__all__ = ["add_subcommand", "run", "load_for_sampling"]


# ---- the `gptcore sample` command -----------------------------------------------------------------------


def _resolve_tokenizer(spec: Optional[str], path: str, vocab_size: int):
    """A tokenizer for a checkpoint: --tokenizer NAME|DIR, else the checkpoint's own
    (gptcore.train.checkpoint_tokenizer)."""
    from .. import data as gdata
    from ..tokenizer import Tokenizer
    from ..train.checkpoint import checkpoint_tokenizer

    if spec:
        if os.path.isdir(spec):
            return Tokenizer.load(spec)
        return gdata.get_tokenizer(spec)
    try:
        return checkpoint_tokenizer(path, vocab_size)
    except ValueError as e:
        raise ValueError(f"--tokenizer: {e}") from None


def load_for_sampling(path: str, device: str = "cpu", dtype: str = "float32",
                      tokenizer: Optional[str] = None):
    """(model, tokenizer) from a checkpoint: a `gptcore train` run directory or its checkpoint/,
    a transformers/gptcore checkpoint directory, or an llm.c model .bin."""
    from ..models.gpt import GPT

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint: {path!r} does not exist")
    path = checkpoint_path(path)  # a `gptcore train --out DIR` directory: its checkpoint/
    from ..train import is_native_v1_checkpoint, load_checkpoint

    if os.path.isdir(path) and is_native_v1_checkpoint(path):  # written by an older gptcore train
        ck = load_checkpoint(path)
        model = GPT(ck["config"], device=device, dtype=dtype, init=False)
        model.load_state_dict(ck["model"])
    else:
        from ..io.pretrained import load_pretrained

        model = load_pretrained(path, device=device, dtype=dtype)
    tok = _resolve_tokenizer(tokenizer, path, model.config.vocab_size)
    return model, tok


def _parse_bias(items: Optional[List[str]]) -> Optional[Dict[int, float]]:
    if not items:
        return None
    out = {}
    for s in items:
        tok, sep, val = s.partition("=")
        try:
            out[int(tok)] = float(val)
        except ValueError:
            raise ValueError(f"--logit-bias: expected TOKEN_ID=BIAS, got {s!r}") from None
        if not sep:
            raise ValueError(f"--logit-bias: expected TOKEN_ID=BIAS, got {s!r}")
    return out


def add_subcommand(subparsers) -> None:
    """Registers ``gptcore sample`` on an argparse sub-parser collection."""
    import argparse

    s = subparsers.add_parser(
        "sample", help="continue a prompt with a trained model, streaming the text",
        description="Sample text from a checkpoint with a KV cache, streaming it to the terminal. "
                    "The checkpoint is a `gptcore train --out` directory (or its checkpoint/), a "
                    "transformers/gptcore checkpoint directory, or an llm.c model .bin.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gptcore sample --checkpoint gptcore-run --prompt 'def '\n"
               "  gptcore sample --checkpoint gpt2-dir --prompt 'Hello' --temperature 0.8 --top-p 0.9 "
               "--stop '\\n\\n'\n")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="model to sample from")
    s.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    s.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate at most (default 200, or what fits in the model's "
                        "context after the prompt)")
    s.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="independent completions of the prompt (default 1)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--logit-bias", action="append", metavar="TOKEN_ID=BIAS",
                   help="add BIAS to a token's logit (repeatable; -inf bans)")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when TEXT is generated (repeatable; backslash escapes like \\n work)")
    s.add_argument("--seed", type=int, default=None, help="makes the sample reproducible")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16"])
    s.add_argument("--tokenizer", default=None, metavar="NAME|DIR",
                   help="gpt2, byte, or a directory with vocab.json + merges.txt "
                        "(default: the checkpoint's)")


def _unescape(s: str) -> str:
    try:
        return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return s


def run(args, out=None) -> int:
    """Runs ``gptcore sample`` for parsed ``args``; streams text to ``out`` (default stdout)."""
    out = out or sys.stdout
    if args.num_samples < 1:
        raise ValueError(f"--num-samples: expected >= 1, got {args.num_samples}")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    model, tok = load_for_sampling(args.checkpoint, device=args.device, dtype=dtype,
                                   tokenizer=args.tokenizer)
    stop = [_unescape(s) for s in args.stop] if args.stop else None
    max_new = args.max_new_tokens
    if max_new is None:  # the default never asks for more than the context holds
        prompt_len = max(len(tok.encode(args.prompt)), 1)  # an empty prompt is one end-of-text
        max_new = max(1, min(200, model.config.block_size - prompt_len))
    kw = dict(max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, logit_bias=_parse_bias(args.logit_bias),
              stop=stop, stream=True)
    for n in range(args.num_samples):
        seed = None if args.seed is None else args.seed + n
        if args.num_samples > 1:
            out.write(f"---- sample {n + 1} ----\n")
        pieces = iter(complete(model, tok, args.prompt, seed=seed, **kw))
        first = next(pieces, "")  # bad settings raise here, before anything is printed
        out.write(args.prompt + first)
        out.flush()
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0

