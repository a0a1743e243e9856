"""What every training loop here shares (pre-training, fine-tuning): the run directory and its
JSONL log, checkpoints that survive a failed save, Ctrl-C, stopping on a non-finite loss, and
refusing up front a run that cannot fit in memory.

* :func:`refuse_existing_run` keeps a new run from writing over an old one (unless told to
  resume or overwrite it), and :func:`open_run_log` on resume drops the log records the resumed
  run will write again;
* :class:`Checkpointer` reports a failed save and retries at the next one (the last save of a
  run is the exception: it raises, naming the step the checkpoint on disk still holds);
* :func:`diverged` builds the message of a run that stopped on a NaN/inf, naming where the
  first non-finite value is (:meth:`gptcore.GPT.find_non_finite`);
* :class:`StopFlag` turns the first Ctrl-C into "stop after this step" (exit status 130).
"""

import json
import math
import os
import signal
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from .. import io as gio
from .._fileio import write_atomic
from ..models.config import GPTConfig
from ..models.gpt import training_memory

__all__ = ["TrainingDiverged", "StopFlag", "Checkpointer", "refuse_existing_run", "open_run_log",
           "emit", "diverged",
           "available_memory", "check_memory", "INTERRUPTED_STATUS", "RUN_CONTROL",
           "resumed_config", "after_update"]

INTERRUPTED_STATUS = 130  # a command stopped by Ctrl-C, as the shell reports SIGINT

# A loop config's fields that say how to run it, not what to train: a resumed run takes these
# from the new call and everything else from its checkpoint.
RUN_CONTROL = ("out", "resume", "overwrite", "stop_after", "threads", "progress", "device")


def resumed_config(cfg, key: str, command: str, given_again: Sequence[str] = ()):
    """For ``cfg.resume``: (config, training state) of the run in ``cfg.out``'s checkpoint
    directory. The config is the one the run started with (saved under ``key`` in its trainer
    state) with ``cfg``'s :data:`RUN_CONTROL` fields; the fields in ``given_again`` that the run
    got in memory (saved as "<memory>") are taken from ``cfg``; a ``base`` model is dropped (the
    checkpoint holds the weights)."""
    from .checkpoint import CHECKPOINT_NAME

    ckpt_dir = os.path.join(cfg.out, CHECKPOINT_NAME)
    training = gio.load_training_state(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if training is None or key not in training["state"]:
        raise FileNotFoundError(f"resume: {ckpt_dir!r} holds no `{command}` checkpoint")
    saved = dict(training["state"][key])
    saved.update({k: getattr(cfg, k) for k in RUN_CONTROL})
    for k in given_again:
        if saved[k] == "<memory>":
            saved[k] = getattr(cfg, k)
    if "base" in saved:
        saved["base"] = None
    return type(cfg)(**saved), training


def _json_safe(record: Dict[str, Any]) -> Dict[str, Any]:
    """NaN and inf (not JSON) as null, so log.jsonl stays valid for strict readers."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def emit(log_file, record: Dict[str, Any]) -> None:
    if log_file is not None:
        log_file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        log_file.flush()


def _trim_log(path: str, last_step: int) -> None:
    """Drop the records a resumed run will write again: those after the checkpoint's step (a
    run killed between two saves logged them) and a half-written last line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
                kept.append(json.dumps(rec) + "\n")
    write_atomic(path, ["".join(kept).encode("utf-8")])


class TrainingDiverged(RuntimeError):
    """A training step produced a non-finite loss or gradient; the run stopped before the update
    (the checkpoint on disk is the last good one)."""


def available_memory(device: str = "cpu") -> Optional[int]:
    """Bytes this process can still allocate on ``device``: the host's MemAvailable, capped by
    a cgroup (container) limit when there is one; None when it cannot be told (not Linux, or a
    CUDA device: there the allocator reports out-of-memory itself)."""
    if device != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if limit.isdigit():
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_memory(model_cfg: GPTConfig, batch_size: int, seq_len: int, dtype: str, device: str,
                 what: str = "this run") -> None:
    """Refuse, before allocating anything, a run whose parameters, optimizer state and
    activations cannot fit in the memory the machine has left (a clear error instead of an
    OOM kill or minutes of swapping)."""
    need = training_memory(model_cfg, batch_size, seq_len, dtype)
    avail = available_memory(device)
    if avail is not None and need["total"] > 0.9 * avail:
        gib = lambda b: f"{b / 2**30:,.2f} GiB"
        parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items() if k != "total")
        raise MemoryError(f"{what} needs about {gib(need['total'])} ({parts}; "
                          f"{model_cfg.num_parameters():,} parameters, batch {batch_size} x seq "
                          f"{seq_len}) but only {gib(avail)} of memory is available: use a smaller "
                          f"model, --batch-size or --seq-len")


class StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[gptcore] stopping after this step (Ctrl-C again to abort without a checkpoint)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def refuse_existing_run(out: str, markers: Sequence[str] = ("log.jsonl", "checkpoint")) -> None:
    """A new run must not write over one that ``out`` already holds (one of ``markers``)."""
    existing = [n for n in markers if os.path.exists(os.path.join(out, n))]
    if existing:
        raise FileExistsError(f"out: {out!r} already holds a run ({', '.join(existing)}); "
                              "continue it with --resume, replace it with --overwrite, or "
                              "choose another --out")


def open_run_log(out: str, resume_step: Optional[int]):
    """``out``/log.jsonl for a run: new, or when resuming from ``resume_step`` appended to after
    dropping the records the resumed run will write again."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.jsonl")
    if resume_step is not None:
        _trim_log(path, resume_step)
    return open(path, "a" if resume_step is not None else "w", encoding="utf-8")


def after_update(step: int, epoch: int, per_epoch: int, total: int, validate, saver, stop,
                 bar, eval_every: int = 0, stop_after: Optional[int] = None) -> bool:
    """What an epoch-based loop (fine-tuning, SFT, reward model) does after update ``step``
    (counted from 1; ``epoch`` the 0-based epoch it belonged to): validate at the end of every
    epoch -- ``validate(epochs done)`` -- and every ``eval_every`` steps in between --
    ``validate(epoch)`` --, checkpoint at the end of every epoch but the last (the run's final
    save is the caller's). Returns True when the loop must stop here (Ctrl-C, or ``stop_after``
    reached before the end), after saving the checkpoint as the run's last."""
    if step % per_epoch == 0:
        validate(step // per_epoch)
        if step < total:
            saver.save(step)
    elif eval_every and step % eval_every == 0:
        validate(epoch)
    if stop.requested or (stop_after is not None and step >= stop_after and step < total):
        saver.save(step, final=True)
        bar.write(f"stopped at step {step}; continue with --resume")
        return True
    return False


class Checkpointer:
    """``save(step)`` through ``write(step)``; an OSError (disk full...) is reported with
    ``report`` and training goes on, to retry at the next save, except with ``final=True``
    (the run's last save), which raises RuntimeError naming what the checkpoint still holds."""

    def __init__(self, path: Optional[str], write: Callable[[int], None],
                 report: Callable[[str], None], last_saved: Optional[int] = None):
        self.path, self.write, self.report = path, write, report
        self.last_saved = last_saved

    def held(self) -> str:
        return (f"{self.path} holds step {self.last_saved}" if self.last_saved is not None
                else "no checkpoint was saved")

    def save(self, step: int, final: bool = False) -> None:
        if self.path is None:
            return
        try:
            self.write(step)
            self.last_saved = step
        except OSError as e:
            if final:
                raise RuntimeError(f"step {step}: could not save the checkpoint ({e}); "
                                   f"{self.held()}") from e
            self.report(f"step {step}: could not save the checkpoint ({e}); {self.held()}; "
                        "training goes on and the next save tries again")


def diverged(model, step: int, loss: float, norm: float, lr: float,
             ckpt: Optional[Checkpointer]) -> str:
    """The message of a run stopped at ``step`` by a non-finite loss or gradient norm."""
    where = model.find_non_finite() or "nowhere in the model's buffers"
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
    held = f"; {ckpt.held()}" if ckpt is not None and ckpt.path is not None else ""
    return (f"step {step}: {what}; the first non-finite value is in {where}. Training stopped "
            f"before updating the weights{held}. Try a lower --lr (now {lr:g}) or --grad-clip")
