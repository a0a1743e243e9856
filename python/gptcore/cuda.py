"""gptcore.cuda: is the CUDA backend built, is a GPU there, which stream kernels use, and CUDA
graphs (:class:`Graph`) that replay a captured decode step with one launch."""

import contextlib

from ._load import _C

_cuda = _C.cuda


def is_compiled() -> bool:
    """True when this build of gptcore contains the CUDA kernels."""
    return bool(_cuda.compiled)


def device_count() -> int:
    """Number of usable CUDA devices (0 without a driver or GPU, or in a CPU-only build)."""
    return int(_cuda.device_count())


def unavailable_reason() -> str:
    """Why :func:`is_available` is False ("" when it is True): no CUDA support in this build,
    no driver, a driver too old for the CUDA runtime gptcore was built with, or no device."""
    return str(_cuda.unavailable_reason())


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


def capturing() -> bool:
    """True while gptcore's current stream is being recorded into a CUDA graph."""
    return bool(_cuda.capturing())


class Graph:
    """A decode step (or any fixed sequence of gptcore ops) captured once as a CUDA graph and
    replayed with a single launch.

        >>> g = gptcore.cuda.Graph()
        >>> step(...)                      # warm-up: fills gptcore's cache with scratch memory
        >>> with g.capture():
        ...     step(...)                  # recorded, not run
        >>> for _ in range(n):
        ...     ids_buf.copy_(next_ids)    # change the inputs in place
        ...     g.replay()                 # runs the recorded kernels

    What a replay does is fixed at capture time: the kernels, their launch shapes, every
    Python-side number (an ``int`` ``pos`` included) and every buffer address. So

    * inputs and outputs live in buffers allocated before the capture (pass them as ``out=``);
      to feed a new step, write into those buffers (``copy_``) and replay. A value that changes
      every step, such as the decode position, goes in a device tensor (``ops.embedding_forward``
      and ``ops.attention_kvcache`` take ``pos`` as a 1-element int32 tensor);
    * every tensor the captured ops read or write must stay alive while the graph is replayed;
    * inside ``capture()`` nothing may allocate new GPU memory from the driver (a cudaMalloc
      cannot be captured), copy from or to the host, or synchronise: those raise RuntimeError.
      Run the step once before capturing, so gptcore's cache holds the scratch memory its
      kernels need. Memory allocated or freed during the capture stays reserved for this graph
      until :meth:`reset` (or the graph is garbage-collected);
    * other threads must not launch gptcore work while a capture runs: the current stream is
      process-wide, and their kernels would be recorded too.

    The capture runs on a private stream that first waits for the work already queued on the
    current stream; the previous stream is restored when the block exits, also when it raises
    (the unfinished capture is then discarded and the error propagates). :meth:`replay` launches
    on gptcore's current stream at the time of the call, so it is ordered after everything queued
    there before it and before everything queued after it, like a single kernel.
    """

    def __init__(self):
        if not is_compiled():
            raise RuntimeError("Graph: this gptcore build has no CUDA support (rebuild with nvcc)")
        if device_count() == 0:
            raise RuntimeError("Graph: no CUDA GPU is available (gptcore.cuda.is_available() is "
                               "False)")
        self._graph = _cuda.Graph()

    @contextlib.contextmanager
    def capture(self):
        """Record the gptcore ops run in the ``with`` block (they do not execute now)."""
        self._graph.capture_begin()
        try:
            yield self
        except BaseException:
            self._graph.capture_abort()
            raise
        self._graph.capture_end()

    def replay(self) -> None:
        """Launch the captured work on gptcore's current stream (asynchronously)."""
        self._graph.replay()

    def reset(self) -> None:
        """Free the captured graph and the memory reserved for it."""
        self._graph.reset()

    @property
    def captured(self) -> bool:
        """True when a capture finished and the graph can be replayed."""
        return bool(self._graph.captured)

    def __repr__(self) -> str:
        state = ("capturing" if self._graph.in_capture
                 else "captured" if self._graph.captured else "empty")
        return f"gptcore.cuda.Graph({state})"
