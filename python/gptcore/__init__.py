"""gptcore: GPT-1/2/3 with its own C++/CUDA kernels, a NumPy reference, and a small Python face.

    >>> import gptcore, numpy as np
    >>> x = gptcore.tensor(np.random.randn(4, 768), dtype="float32")
    >>> out, mean, rstd = gptcore.ops.layernorm_forward(x, np.ones(768, np.float32), np.zeros(768, np.float32))
"""

from ._load import _C
from .tensor import DTYPES, Tensor, as_tensor, empty, from_dlpack, from_numpy, tensor, zeros
from . import cuda, ops, reference
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Number of CPU threads gptcore's kernels use (0 restores the default).

    At most ``_C.max_num_threads()`` (OpenBLAS's MAX_THREADS, 64 for the scipy-openblas32
    wheel): every thread may call OpenBLAS at once. Outside [0, that limit] ValueError names it.
    """
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    n = n.__index__()
    if not -2 ** 63 <= n < 2 ** 63:  # what pybind11 cannot convert; the core checks the rest
        raise ValueError(f"num_threads: expected 0 (the default) to {_C.max_num_threads()}, got {n}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    return int(_C.get_num_threads())


__all__ = [
    "DTYPES", "Tensor", "as_tensor", "cuda", "empty", "from_dlpack", "from_numpy", "get_num_threads",
    "ops", "reference", "set_num_threads", "tensor", "Tokenizer", "zeros",
]

# ---- generation: text in, text out (gptcore.generate) ----
from .generate import complete  # noqa: E402

__all__ += ["complete"]

# ---- model, optimiser and schedules (gptcore.models, gptcore.optim) ----
from .models import GPT, GPTConfig  # noqa: E402
from .optim import AdamW, cosine_lr, linear_lr  # noqa: E402

__all__ += ["GPTConfig", "GPT", "AdamW", "cosine_lr", "linear_lr"]

# ---- GPT-1 style fine-tuning (gptcore.train.finetune), imported on first use ----
_FINETUNE = ("finetune", "FinetuneConfig", "Classifier", "MultipleChoice", "load_task_model")


def __getattr__(name):
    if name in _FINETUNE:
        from .train import finetune as _ft

        return getattr(_ft, name)
    raise AttributeError(f"module 'gptcore' has no attribute {name!r}")


__all__ += list(_FINETUNE)
