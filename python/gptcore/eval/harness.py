"""gptcore as a model backend of EleutherAI's lm-evaluation-harness (``pip install
'gptcore[eval]'``).

Importing this module registers the model name ``gptcore`` with the harness::

    >>> import gptcore.eval.harness                      # registers "gptcore"
    >>> import lm_eval
    >>> lm_eval.simple_evaluate(model="gptcore", model_args="checkpoint=DIR", tasks=["hellaswag"])

From the command line (lm_eval 0.4 finds models only among those imported, so the harness's
own ``lm_eval`` script cannot see this one; this module runs that same command line after
registering)::

    python -m gptcore.eval.harness --model gptcore --model_args checkpoint=DIR --tasks lambada_openai

Import gptcore before lm_eval (which imports torch): torch's wheel carries a libgomp.so.1 that
gptcore's extension then shares, and whichever comes first initialises it; gptcore's import
limits how long idle OpenMP threads spin (``GOMP_SPINCOUNT``), and without that gptcore's CPU
kernels ran 2.8x slower beside them on a 2-core machine. (Or set ``GOMP_SPINCOUNT=10000`` in
the environment.) ``python -m gptcore.eval.harness`` imports in the right order.

``model_args``: ``checkpoint`` (a directory ``gptcore eval`` takes: transformers' GPT-2/GPT-1
layout, a gptcore run), ``tokenizer`` (gpt2, byte or a directory; default the checkpoint's),
``max_length`` (default the model's block size), ``share_context`` (default true). The
harness's ``--batch_size`` and ``--device`` apply. Requests go to
:class:`gptcore.eval.Scorer`, so the numbers are the ones ``gptcore eval`` gives.
"""

from __future__ import annotations

from typing import List, Tuple

import lm_eval.models  # noqa: F401  (the harness's own models first: an empty registry reloads)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .scoring import Scorer

__all__ = ["GPTCoreLM"]

_TRUE = {"1", "true", "yes", "on"}


@register_model("gptcore")
class GPTCoreLM(LM):
    """The harness's ``LM`` over a gptcore model: ``loglikelihood``, ``loglikelihood_rolling``
    and ``generate_until`` (greedy)."""

    def __init__(self, checkpoint=None, model=None, tokenizer=None, device="cpu", batch_size=16,
                 max_length=None, share_context=True, **unused):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("gptcore: model_args needs checkpoint=DIR")
            # the loader `gptcore sample` and `gptcore eval` use (run directories, transformers
            # layouts, byte-level tokenizers); this backend is an entry point like they are
            from ..cli.sample import load_for_sampling

            model, tokenizer = load_for_sampling(str(checkpoint), device=_device(device),
                                                 tokenizer=tokenizer)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("gptcore: with model= pass the tokenizer object as tokenizer=")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():  # "auto" and the like: not supported, say so
                raise ValueError(f"gptcore: batch_size must be a number, got {batch_size!r}")
            batch_size = int(batch_size)
        if isinstance(share_context, str):
            share_context = share_context.lower() in _TRUE
        self.scorer = Scorer(model.eval(), tokenizer, batch_size=int(batch_size or 16),
                             max_length=int(max_length) if max_length else None,
                             share_context=bool(share_context))

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        return [ll for ll, _ in self.scorer.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        eos = self.scorer.tokenizer.decode([self.scorer.eot])
        batch = []
        for r in requests:
            context, gen_kwargs = r.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), min(256, self.max_length // 2))
            if kw.get("do_sample") and kw.get("temperature", 0.0) > 0:
                raise ValueError("gptcore: generate_until decodes greedily; this task asks for "
                                 "sampling (do_sample with temperature > 0)")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            batch.append((context, until + ([eos] if eos not in until else []),
                          int(kw["max_gen_toks"])))
        return self.scorer.generate_until(batch)


def _device(device) -> str:
    """The harness's command line asks for cuda:0 unless told otherwise; like its hf backend,
    run on the CPU where there is no GPU (the numbers do not depend on it)."""
    from .. import cuda

    device = str(device or "cpu")
    if device.startswith("cuda") and not cuda.is_available():
        import logging

        logging.getLogger(__name__).warning("gptcore: %s asked for, no CUDA GPU here: using the "
                                            "CPU", device)
        return "cpu"
    return device


def main(argv=None) -> None:
    """lm_eval's command line (``lm_eval.__main__.cli_evaluate``) with ``gptcore`` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
