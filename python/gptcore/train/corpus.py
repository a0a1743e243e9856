"""The default corpus of `gptcore train`: a few MB of the running Python's standard library."""

import hashlib
import os
import shutil
import sys
import tempfile
from typing import List

from .. import data as gdata

# ---- the default corpus -------------------------------------------------------------------

DEFAULT_CORPUS_BYTES = 4_000_000


def _stdlib_files(max_bytes: int) -> List[str]:
    """A deterministic few-MB subset of the running Python's standard-library sources."""
    root = os.path.dirname(os.__file__)
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = rel_dir.split(os.sep)
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages",
                                                                "__pycache__", "test", "tests",
                                                                "idle_test", "lib2to3"))
        if any(p.startswith(".") for p in parts if p != "."):
            continue
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                candidates.append((hashlib.sha1(rel.encode()).hexdigest(), path))
    candidates.sort()  # a fixed pseudo-random order: a mix of modules, not one package
    chosen, total = [], 0
    for _, path in candidates:
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size < 200 or size > 400_000:
            continue
        try:
            gdata.read_text(path)  # `prepare` refuses files that are not UTF-8 text
        except (OSError, ValueError):
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise RuntimeError(f"no Python sources found under {root!r} for the default corpus; "
                           "pass --data DIR (see `gptcore prepare`)")
    return chosen


def _cache_root() -> str:
    env = os.environ.get("GPTCORE_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "gptcore")


def default_corpus_dir(progress: bool = True, max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """Prepare (once) and return the demo data: stdlib sources, byte-level tokens."""
    files = _stdlib_files(max_bytes)
    key = hashlib.sha1()
    for f in files:
        key.update(f.encode())
        key.update(str(os.path.getsize(f)).encode())
    name = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-byte-{key.hexdigest()[:10]}"
    for root in (_cache_root(), os.path.join(tempfile.gettempdir(), "gptcore-cache")):
        out = os.path.join(root, name)
        try:
            gdata.load_meta(out)
            if gdata.shard_paths(out, "train") and gdata.shard_paths(out, "val"):
                return out
        except (OSError, ValueError):
            pass
        try:
            os.makedirs(root, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-" + name, dir=root)
        except OSError:
            continue  # not writable: try the next place
        try:
            if progress:
                print(f"Preparing the default corpus: {len(files)} files of Python's standard "
                      f"library ({sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB) -> {out}",
                      flush=True)
            gdata.prepare(files, tmp, val_fraction=0.05, tokenizer="byte", progress=progress)
            if os.path.exists(out):
                shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return out
    raise RuntimeError("could not write the default corpus to any cache directory; "
                       "set GPTCORE_CACHE to a writable directory")


