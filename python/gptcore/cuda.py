"""gptcore.cuda: is the CUDA backend built, is a GPU there, and which stream kernels use."""

from ._load import _C

_cuda = _C.cuda


def is_compiled() -> bool:
    """True when this build of gptcore contains the CUDA kernels."""
    return bool(_cuda.compiled)


def device_count() -> int:
    """Number of usable CUDA devices (0 without a driver or GPU, or in a CPU-only build)."""
    return int(_cuda.device_count())


def is_available() -> bool:
    """True when CUDA kernels are compiled in and at least one GPU can run them."""
    return is_compiled() and device_count() > 0


def _need_cuda(what: str) -> None:
    if not is_compiled():
        raise RuntimeError(f"{what}: this gptcore build has no CUDA support")


def set_stream(stream: int) -> None:
    """Launch every gptcore kernel on ``stream`` (a raw cudaStream_t as an int; 0 = default).

    With PyTorch: ``gptcore.cuda.set_stream(torch.cuda.current_stream().cuda_stream)``.
    """
    _need_cuda("set_stream")
    _cuda.set_stream(int(stream))


def current_stream() -> int:
    """The raw cudaStream_t gptcore launches on (0 = the legacy default stream)."""
    return int(_cuda.current_stream()) if is_compiled() else 0


def synchronize() -> None:
    """Wait for all work on gptcore's current stream."""
    _need_cuda("synchronize")
    _cuda.synchronize()


def empty_cache() -> None:
    """Return cached, unused GPU memory to the driver."""
    if is_compiled():
        _cuda.empty_cache()
