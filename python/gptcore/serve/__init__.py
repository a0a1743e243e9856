"""The OpenAI-compatible completion server (``gptcore serve``): ``POST /v1/completions`` with
continuous batching over one model, ``GET /v1/models``, ``GET /health``, and the playground and
ranking pages.

    >>> app = create_app(model, tokenizer, model_name="my-model")   # a Starlette app
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the ``serve`` extra (starlette, uvicorn).
"""

try:
    import starlette  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("gptcore.serve needs the serve extra: pip install 'gptcore[serve]'") from e

from .app import create_app

__all__ = ["create_app"]
