"""Accuracy against the number of demonstrations, as bars per task (GPT-3's zero-, one- and
few-shot figures). Needs matplotlib (``pip install 'gptcore[plot]'``)."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

from .._fileio import atomic_file

__all__ = ["plot_shots", "PLOT_METRIC"]

# the metric each kind of task is plotted by
PLOT_METRIC = {"multiple_choice": "acc", "cloze": "acc", "generation": "exact_match"}


def plot_shots(rows: Sequence[Dict], path) -> None:
    """Write a PNG bar chart of each task's accuracy (``PLOT_METRIC``) at each number of shots,
    with standard-error bars, from :func:`gptcore.eval.evaluate` rows. Perplexity rows are left
    out. The file appears whole or not at all."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'gptcore[plot]'") from e
    picked = [r for r in rows if PLOT_METRIC.get(r["kind"]) == r["metric"]]
    if not picked:
        raise ValueError("plot: no accuracy results to plot (perplexity tasks have none)")
    tasks: List[str] = list(dict.fromkeys(r["task"] for r in picked))
    shots: List[int] = sorted({r["shots"] for r in picked})
    width = 0.8 / len(shots)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) * len(shots) ** 0.5), 3.6))
    try:
        for j, k in enumerate(shots):
            xs, ys, es = [], [], []
            for i, t in enumerate(tasks):
                r = next((r for r in picked if r["task"] == t and r["shots"] == k), None)
                if r is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["value"])
                    es.append(r["stderr"] or 0.0)
            label = {0: "zero-shot", 1: "one-shot"}.get(k, f"{k}-shot")
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=label)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("accuracy by number of demonstrations (shots)", fontsize=10)
        ax.legend()
        fig.tight_layout()
        with atomic_file(os.fspath(path)) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
