"""Crash-safe file writes shared by checkpoints, token shards and vocabularies: write a
temporary file beside the target, fsync it, then rename it into place. Also the one JSON reader
for files that may be damaged or hostile (``parse_json``)."""

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Iterable, Iterator, Tuple


def fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def temp_name(path: str, tag: str) -> str:
    """``.NAME.TAG-PID-XXXXXXXX`` beside ``path``: the writing process's id in the name tells a
    later writer whether a leftover is still being written (see :func:`remove_stale_temps`)."""
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's live process (or a bogus number: keep it)
    return True


def remove_stale_temps(path: str) -> None:
    """Remove the temporary files or directories that writes of ``path`` killed mid-way left
    beside it (``.NAME.tmp-PID-XXXX`` whose process is gone, and the PID-less
    ``.NAME.tmp-XXXX`` of earlier versions). A write in progress by a live process is kept."""
    parent, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}.tmp-"
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid, _, rest = name[len(prefix):].partition("-")
        if rest and pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        full = os.path.join(parent, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Any]:
    """Open a temporary file next to ``path`` for writing; on success fsync and rename it over
    ``path``. On any error the temporary file is removed and ``path`` is left untouched."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; expected a file name to write")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(parent, directory=True)


def write_atomic(path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically: readers see the old file or the whole new one."""
    with atomic_file(path) as f:
        for chunk in chunks:
            f.write(chunk)


class _BadJSON(Exception):
    """Raised inside parse_json's hooks; turned into the caller's error type."""


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _BadJSON(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name):
    raise _BadJSON(f"{name} is not JSON")


def parse_json(data, where: str, error: type = ValueError):
    """The value of the JSON text ``data`` (UTF-8 bytes or str), or ``error("<where>: <why>")``.

    Everything a damaged or hostile file can make ``json.loads`` do becomes that one error: bytes
    that are not UTF-8, text that is not JSON, an object with the same key twice (``json`` would
    keep the last silently), NaN/Infinity (Python extensions, not JSON), an integer with more
    digits than Python converts (a bare ValueError) and nesting deep enough to exhaust the
    recursion limit (RecursionError)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text, so not JSON ({exc})") from None
    except _BadJSON as exc:
        raise error(f"{where}: {exc}") from None
    except RecursionError:
        raise error(f"{where}: not JSON that can be read (arrays/objects nested too deeply)") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer with too many digits
        raise error(f"{where}: not JSON ({exc})") from None


def jsonl_records(path) -> Iterator[Tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file. A line that is not
    UTF-8 or not JSON (or hostile JSON, see :func:`parse_json`) raises ValueError naming
    ``path:line``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, parse_json(raw, f"{path}:{lineno}")
