"""Evaluation: log-likelihood scoring (scoring.py), tasks, k-shot prompts and metrics
(tasks.py), the accuracy-against-shots plot (plot.py) and the lm-evaluation-harness backend
(harness.py, imported only on demand: it needs ``lm_eval``)."""

from .scoring import Scorer, rolling_windows
from .tasks import KINDS, Task, build_prompt, evaluate, load_task

__all__ = ["Scorer", "rolling_windows", "Task", "KINDS", "load_task", "build_prompt", "evaluate"]
