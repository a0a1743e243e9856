"""Generation: the sampling controls (sampler.py) and the batched KV-cache decode loop with
generate() and complete() (decode.py)."""

from .decode import complete, generate
from .sampler import PAD, Logprobs, TokenLogprob, filtered_distribution

__all__ = ["generate", "complete", "PAD", "Logprobs", "TokenLogprob", "filtered_distribution"]
