"""Generation: the sampling controls (sampler.py), the batched KV-cache decode loop with
generate() and complete() (decode.py), and the continuous-batching loop a server drives
(continuous.py: Engine)."""

from .continuous import Engine
from .decode import complete, generate
from .sampler import PAD, Logprobs, TokenLogprob, filtered_distribution

__all__ = ["generate", "complete", "Engine", "PAD", "Logprobs", "TokenLogprob", "filtered_distribution"]
