"""gptcore inside PyTorch programs (needs the ``torch`` extra: ``pip install 'gptcore[torch]'``).

* :mod:`gptcore.torch.ops`: the kernels as ``torch.library`` custom ops with autograd, fake
  tensors and ``torch.compile`` support -- :func:`attention`, :func:`attention_qkv`,
  :func:`layer_norm`, :func:`residual_layer_norm`, :func:`linear`, :func:`linear_gelu`,
  :func:`cross_entropy`, :func:`linear_cross_entropy`, :func:`embedding`, :func:`dropout`.
* :class:`AdamW`: a ``torch.optim.Optimizer`` running gptcore's multi-tensor AdamW kernel.
* :class:`GPT`: a GPT-2 ``nn.Module`` built from these ops, loading gptcore and transformers
  checkpoints.

Nothing else in gptcore imports this package, and ``import gptcore`` never imports torch.
"""

from .ops import (attention, attention_qkv, cross_entropy, dropout, embedding, layer_norm, linear,
                  linear_cross_entropy, linear_gelu, residual_layer_norm)
from .model import GPT
from .optim import AdamW

__all__ = ["GPT", "AdamW", "attention", "attention_qkv", "cross_entropy", "dropout", "embedding",
           "layer_norm", "linear", "linear_cross_entropy", "linear_gelu", "residual_layer_norm"]
