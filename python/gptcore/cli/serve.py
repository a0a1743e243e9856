"""`gptcore serve`: an OpenAI-compatible completion server for a checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading

from ._args import nonneg_int, positive_int

__all__ = ["add_subcommand", "run"]


def add_subcommand(subparsers) -> None:
    """Registers ``gptcore serve`` on an argparse sub-parser collection."""
    import argparse

    s = subparsers.add_parser(
        "serve", help="serve a checkpoint over OpenAI's completion API (+ playground, ranking page)",
        description="Serve a checkpoint over HTTP with OpenAI's completion API "
                    "(POST /v1/completions, GET /v1/models, GET /health): many clients at once, "
                    "batched into one running decode batch, with a playground page (/playground) "
                    "and a page for ranking sampled answers (/rank). Needs the serve extra "
                    "(pip install 'gptcore[serve]'). SIGTERM or Ctrl-C stops it gracefully.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gptcore serve --checkpoint gptcore-run\n"
               "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"gptcore-run\", \"prompt\": \"def \", \"max_tokens\": 32}'\n")
    s.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model to serve (as for gptcore sample)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=nonneg_int, default=8000, help="port (default 8000; 0 = any free)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16"])
    s.add_argument("--tokenizer", default=None, metavar="NAME|DIR",
                   help="gpt2, byte, or a directory with vocab.json + merges.txt "
                        "(default: the checkpoint's)")
    s.add_argument("--model-name", default=None,
                   help="the name clients pass as `model` (default: the checkpoint directory's name)")
    s.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="sequences decoded together (default 16)")
    s.add_argument("--max-queue", type=nonneg_int, default=64, metavar="N",
                   help="requests that may wait for room in the batch; more get 429 (default 64)")
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="N",
                   help="largest request body accepted (default 1 MiB; larger get 413)")
    s.add_argument("--max-request-tokens", type=positive_int, default=None, metavar="N",
                   help="most tokens one request may ask for, prompts x n x max_tokens "
                        "(default: max-batch x the model's context)")
    s.add_argument("--rank-prompts", default=None, metavar="FILE",
                   help="prompts for the ranking page /rank")
    s.add_argument("--rankings", default=None, metavar="OUT.jsonl",
                   help="where the ranking page appends rankings")
    s.add_argument("--rank-k", type=positive_int, default=4, metavar="K",
                   help="answers shown per prompt on the ranking page (default 4)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds running requests get to finish at shutdown (default 30)")


def _model_name(checkpoint: str) -> str:
    path = os.path.normpath(os.path.abspath(checkpoint))
    if os.path.basename(path) == "checkpoint":  # a `gptcore train --out DIR` run: DIR's name
        path = os.path.dirname(path)
    name = os.path.basename(path)
    return os.path.splitext(name)[0] if os.path.isfile(path) else name  # model.bin -> model


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for the server, or a ValueError saying why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"--host: cannot listen on {host!r}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(args, out=None) -> int:
    """Runs ``gptcore serve`` for parsed ``args`` until SIGTERM / Ctrl-C; returns 0."""
    out = out or sys.stdout
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError:
        raise RuntimeError("gptcore serve needs the serve extra: pip install 'gptcore[serve]'") from None
    from .sample import load_for_sampling

    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout: expected seconds >= 0, got {args.shutdown_timeout}")
    sock = _listen(args.host, args.port)  # first: a taken port fails before the model loads
    try:
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
        model, tok = load_for_sampling(args.checkpoint, device=args.device, dtype=dtype,
                                       tokenizer=args.tokenizer)
        name = args.model_name or _model_name(args.checkpoint)
        app = create_app(model, tok, model_name=name, max_batch=args.max_batch,
                         max_queue=args.max_queue, rank_prompts=args.rank_prompts,
                         rankings_path=args.rankings, rank_k=args.rank_k,
                         max_body_bytes=args.max_body_bytes,
                         max_request_tokens=args.max_request_tokens, shutdown_timeout=args.shutdown_timeout)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=args.shutdown_timeout))
        host, port = sock.getsockname()[:2]  # the port chosen when --port was 0
        base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        banner = (f"gptcore serve: model {name!r} ({model.config.n_layer} layers, context "
                  f"{model.config.block_size}) on {args.device}, batch {args.max_batch}\n"
                  f"  completions  {base}/v1/completions  (OpenAI's API: base_url={base}/v1)\n"
                  f"  playground   {base}/playground\n"
                  f"  ranking      {base}/rank\n"
                  f"  health       {base}/health\n"
                  f"SIGTERM or Ctrl-C stops it.\n")

        async def main():
            async def announce():  # once the engine has started and the socket listens
                while not server.started and not server.should_exit:
                    await asyncio.sleep(0.02)
                if server.started:
                    out.write(banner)
                    out.flush()

            task = asyncio.ensure_future(announce())
            try:
                await server.serve(sockets=[sock])
            finally:
                task.cancel()

        # uvicorn turns SIGTERM into a graceful shutdown, then raises it again under the previous
        # handler; with this one the process then ends normally (exit 0), not killed by it
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda sig, frame: None) if in_main else None
        try:
            asyncio.run(main())
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError(f"the server did not start on {base}")
    out.write("gptcore serve: stopped\n")
    out.flush()
    return 0
