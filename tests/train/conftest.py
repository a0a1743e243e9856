"""Fixtures shared by the training tests."""

from __future__ import annotations

import numpy as np
import pytest

from gptcore import data as gd


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small byte-level dataset with some structure to learn."""
    root = tmp_path_factory.mktemp("corpus")
    gen = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "lambda", "yield", "for", "in", "if"]
    files = []
    for i in range(3):
        text = "\n".join(" ".join(gen.choice(words, 6)) + ":" for _ in range(300))
        p = root / f"f{i}.py"
        p.write_text(text)
        files.append(str(p))
    out = root / "data"
    gd.prepare(files, str(out), val_fraction=0.1, tokenizer="byte", progress=False)
    return str(out)
