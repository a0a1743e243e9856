"""Argument types shared by the subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
import os

__all__ = ["positive_int", "nonneg_int", "nonneg_float", "checkpoint_path"]


def checkpoint_path(path: str) -> str:
    """A checkpoint argument as given, or for a `gptcore train --out DIR` run directory (no
    config.json, a checkpoint/ inside) that run's checkpoint directory."""
    path = os.fspath(path)
    if (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isdir(os.path.join(path, "checkpoint"))):
        return os.path.join(path, "checkpoint")
    return path


def _parse(text: str, cast, kind: str, low: float, wanted: str):
    """``cast(text)``, refused with argparse's error unless it is finite and >= ``low``."""
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not (math.isfinite(v) and v >= low):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
    return v


def positive_int(text: str) -> int:
    return _parse(text, int, "an integer", 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    return _parse(text, int, "an integer", 0, "an integer >= 0")


def nonneg_float(text: str) -> float:
    return _parse(text, float, "a number", 0.0, "a finite number >= 0")
