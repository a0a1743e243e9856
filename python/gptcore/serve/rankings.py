"""The rankings file of ``gptcore serve --rankings OUT.jsonl``: one JSON line per ranking a person
submitted on the ``/rank`` page, ``{"prompt": ..., "ranked": [best, ..., worst], ...}``, the
format the reward-model training reads (``gptcore.data.preference``).

Durability: each ranking is one ``write`` to a descriptor opened with ``O_APPEND``, followed by
``fsync``, under a thread lock and an advisory ``flock`` (so two writers of one file, threads or
processes, never interleave). A crash (power loss, ``kill -9``) therefore loses at most the ranking
being written, and can leave only that one line torn: a tail with no final newline. Before every
append the writer repairs such a tail (:func:`repair_torn_tail`): a tail that is a whole JSON
object (a line whose newline alone is missing, say from an editor) gets its newline; a tail that
begins like one is a torn write and is truncated away (a tail that does not is no ranking: the
file is refused, not cut). So a new ranking never glues onto a broken line and the file always
reads back as whole JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any, Dict

from .._fileio import fsync_path, parse_json

try:  # advisory locks between processes (POSIX); the thread lock alone elsewhere
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RankingWriter", "repair_torn_tail"]

_CHUNK = 1 << 16
# a last line longer than this is not read back to check it is whole (it is torn: the /rank
# page's submissions are far smaller)
_MAX_TAIL = 16 << 20


def _last_line_start(fd: int, size: int) -> int:
    """Offset just past the last newline before ``size`` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        block = os.pread(fd, end - start, start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def repair_torn_tail(fd: int, where: str = "the rankings file") -> int:
    """Make the file open at ``fd`` (readable and writable) end with a newline.

    A last line without its newline that is a whole JSON object is kept and gets the newline; a
    tail that begins like one (``{``: a write cut short by a crash) is truncated. Any other tail
    cannot come from this writer, and the file is left alone: ValueError naming ``where``.
    Returns the number of bytes removed (0 when nothing was torn). The caller holds the locks."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    start = _last_line_start(fd, size)
    if os.pread(fd, 1, start) != b"{":
        raise ValueError(f"{where}: its last line has no newline and is not the start of a JSON "
                         f"object, so it is not a ranking cut short; not a rankings file?")
    tail = os.pread(fd, size - start, start) if size - start <= _MAX_TAIL else None
    try:
        whole = tail is not None and isinstance(parse_json(tail, "tail"), dict)
    except ValueError:
        whole = False
    if whole:
        _write_all(fd, b"\n")
        os.fsync(fd)
        return 0
    os.ftruncate(fd, start)
    os.fsync(fd)
    return size - start


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class RankingWriter:
    """Appends rankings to a JSON Lines file, durably (see the module's docstring).

    ``append`` may be called from many threads at once; each call returns once its line is on
    disk (fsync). Use as a context manager, or call :meth:`close`."""

    def __init__(self, path) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a file path (str or os.PathLike), got "
                            f"{type(path).__name__}")
        path = os.path.abspath(os.fspath(path))
        if os.path.isdir(path):
            raise IsADirectoryError(f"rankings: {path!r} is a directory; expected a .jsonl file")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"rankings: the directory {parent!r} does not exist")
        self.path = path
        existed = os.path.exists(path)
        # O_RDWR: the torn-tail repair reads the last line; O_APPEND: every write goes to the end
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                           0o666)
        self._lock = threading.Lock()
        if not existed:
            fsync_path(parent, directory=True)  # the new file's name survives a crash too
        try:
            with self._locked():
                self.repaired_bytes = repair_torn_tail(self._fd, path)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _locked(self):
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"rankings: {self.path!r} is closed")
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def append(self, record: Dict[str, Any]) -> None:
        """Write ``record`` (a JSON-serialisable dict) as one line and fsync it.

        Raises ValueError for a record that is not a dict or not JSON (NaN, a lone surrogate);
        on a failed write (disk full) the partial line is cut off again, and the error raised."""
        if not isinstance(record, dict):
            raise TypeError(f"record: expected a dict, got {type(record).__name__}")
        try:
            line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise ValueError(f"record: not writable as a JSON line ({exc})") from None
        with self._locked():
            repair_torn_tail(self._fd, self.path)
            size = os.fstat(self._fd).st_size
            try:
                _write_all(self._fd, line)
                os.fsync(self._fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                raise

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "RankingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - a writer dropped without close()
        with contextlib.suppress(Exception):
            self.close()
