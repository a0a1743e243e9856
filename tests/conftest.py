"""Shared fixtures for gptcore's tests.

* ``rng``: a NumPy Generator with a fresh seed per test. The seed is printed (pytest shows it
  for a failing test) and named in every comparison message, so a failure can be replayed with
  ``GPTCORE_TEST_SEED=<seed> pytest ...``.
* Tests marked ``gpu`` are skipped when ``gptcore.cuda.is_available()`` is False.
"""

from __future__ import annotations

import numpy as np
import pytest

import gptcore
from tests.helpers import fresh_seed


def pytest_collection_modifyitems(config, items):
    if gptcore.cuda.is_available():
        return
    why = gptcore.cuda.unavailable_reason() or "no CUDA GPU available"
    skip_gpu = pytest.mark.skip(reason=f"gpu test: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class SeededRng:
    """A ``numpy.random.Generator`` that remembers its seed (for failure messages)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def randn(self, *shape, scale: float = 1.0) -> np.ndarray:
        """Standard-normal float32 array of ``shape`` times ``scale``."""
        return (self.gen.standard_normal(shape) * scale).astype(np.float32)

    def __repr__(self) -> str:
        return f"seed={self.seed}"


@pytest.fixture
def rng() -> SeededRng:
    seed = fresh_seed()
    print(f"rng seed = {seed} (replay with GPTCORE_TEST_SEED={seed})")
    return SeededRng(seed)
