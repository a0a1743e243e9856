"""Crash-safe file writes shared by checkpoints, token shards and vocabularies: write a
temporary file beside the target, fsync it, then rename it into place."""

import contextlib
import os
import secrets
from typing import Any, Iterable, Iterator


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
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.{tag}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Any]:
    """Open a temporary file next to ``path`` for writing; on success fsync and rename it over
    ``path``. On any error the temporary file is removed and ``path`` is left untouched."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; expected a file name to write")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
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
