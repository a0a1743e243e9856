"""A small progress bar (no dependencies): one redrawn line on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan / inf
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _format_count(n: float, unit: str) -> str:
    if unit == "B":
        for suffix in ("B", "KB", "MB", "GB"):
            if abs(n) < 1024 or suffix == "GB":
                return f"{n:.0f}{suffix}" if suffix == "B" else f"{n:.1f}{suffix}"
            n /= 1024
    return f"{int(n)}"


class Progress:
    """``Progress(total, desc)``; call ``update(n, postfix=...)`` and finally ``close()``.

    On a terminal the bar redraws in place (at most 10 times a second); when the stream is not
    a terminal (a log file, CI) it prints a full line every ``log_every`` seconds instead.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "it", enabled: bool = True,
                 stream: Optional[TextIO] = None, initial: int = 0, log_every: float = 10.0,
                 width: int = 24):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.n = self.start_n = int(initial)
        self.t0 = time.perf_counter()
        self.log_every, self.width = log_every, width
        self.postfix = ""
        self._last_draw = 0.0
        self._last_len = 0
        self._drawn_n = None

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.n - self.start_n) / dt if dt > 0 else 0.0

    def line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        rate = self.rate()
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        counts = f"{_format_count(self.n, self.unit)}/{_format_count(self.total, self.unit)}"
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.postfix}" if self.postfix else ""
        return (f"{head}{frac * 100:3.0f}% [{bar}] {counts} "
                f"[{format_duration(elapsed)}<{format_duration(eta)}]{tail}")

    def update(self, n: int = 1, postfix: Optional[str] = None, force: bool = False) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = 0.1 if self.tty else self.log_every
        if force or now - self._last_draw >= interval or self.n >= self.total:
            self._draw()
            self._last_draw = now

    def write(self, text: str) -> None:
        """Print a line above the bar without breaking it."""
        if self.enabled and self.tty and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
        print(text, file=sys.stdout if self.stream is sys.stderr else self.stream, flush=True)
        if self.enabled and self.tty and self._last_len:
            self._draw()

    def _draw(self) -> None:
        self._drawn_n = self.n
        text = self.line()
        if self.tty:
            pad = max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self._last_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty or self._drawn_n != self.n:
            self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self._last_len = 0
