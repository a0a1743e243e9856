"""Loads gptcore._C after making its OpenBLAS (from the scipy-openblas32 wheel) findable."""

import ctypes
import os


def _preload_openblas() -> None:
    # The extension links libscipy_openblas.so; its RPATH points at the installed wheel, but an
    # editable or unusual install may not match, so load the library by path first.
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError("gptcore needs the scipy-openblas32 package: pip install scipy-openblas32") from exc
    path = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()
# OpenMP threads spin this long after a parallel region before sleeping. GCC's default spins long
# enough to steal a core from whatever runs next (NumPy, OpenBLAS) on small machines.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from . import _C  # noqa: E402

__all__ = ["_C"]
