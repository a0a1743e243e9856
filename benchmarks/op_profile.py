"""Where a gptcore step spends its time, op by op: every function of ``gptcore.ops`` is wrapped
with a timer inside the model, the heads and the optimiser while the step runs (shared by
bench_train_cpu.py and bench_finetune.py)."""

from __future__ import annotations

import collections
import statistics
import time


def profile_ops(step, rounds: int):
    """Run ``step()`` once untimed, then ``rounds`` times with its ops timed. Returns (the
    median wall time of a step, {op: seconds per step}, {op: calls per step})."""
    import gptcore.models.gpt as gm
    import gptcore.models.heads as gh
    import gptcore.optim as go
    from gptcore import ops

    times, calls = collections.defaultdict(float), collections.Counter()

    class Timed:  # stands in for gptcore.ops inside the model, the heads and the optimiser
        pass

    timed = Timed()
    for name in ops.__all__:
        def wrapper(*a, _fn=getattr(ops, name), _name=name, **k):
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            times[_name] += time.perf_counter() - t0
            calls[_name] += 1
            return out
        setattr(timed, name, wrapper)
    step()
    walls = []
    gm.ops = gh.ops = go.ops = timed
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
    finally:
        gm.ops = gh.ops = go.ops = ops
    return (statistics.median(walls), {k: v / rounds for k, v in times.items()},
            {k: v // rounds for k, v in calls.items()})


def print_op_table(med: float, per_op: dict, calls: dict, top: int = 0, indent: str = "  ") -> None:
    """One line per op, slowest first: ms per step, share of the step, calls per step."""
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    for name, t in rows[:top] if top else rows:
        print(f"{indent}{name:32s} {t * 1e3:8.1f} ms  {100 * t / med:5.1f}%  ({calls[name]} calls)")
