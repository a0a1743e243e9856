"""The model layer: configuration, the parameter schema, the GPT trunk, its heads and KV caches.

Imports nothing above :mod:`gptcore.ops` (checkpoint loading and generation are reached through
thin delegations on :class:`GPT` that import their packages when called)."""

from .config import DEMO_PRESETS, PRESETS, GPTConfig
from .gpt import GPT

__all__ = ["GPTConfig", "GPT", "PRESETS", "DEMO_PRESETS"]
