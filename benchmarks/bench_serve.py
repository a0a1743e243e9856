"""Serving throughput: CLIENTS concurrent clients of `gptcore serve` against the same requests
served one at a time.

GPT-2 124M (random init: the speed does not depend on the weights) with GPT-2's tokenizer (or
the byte-level one), behind the real server (create_app + uvicorn on loopback, in this process)
and called over HTTP. Every request asks for MAX_TOKENS tokens of a different prompt (sampled,
end-of-text banned so all requests generate the same number of tokens).

* ``one at a time``: a server with a batch of 1 (the decode loop one request at a time, each
  step a batch-1 step) and one client sending the requests in turn.
* ``concurrent``: a server with a batch of CLIENTS and CLIENTS clients sending their requests
  at once (continuous batching: all of them share each decoding step).

Throughput is completion tokens / wall time from the first request sent to the last answer;
the ratio is concurrent / one at a time (issue 17's target: >= 4x at 16 clients on the CPU).

    python benchmarks/bench_serve.py [--clients 16] [--max-tokens 64] [--rounds 1] [--stream]
                                     [--device cpu] [--tokenizer gpt2|byte] [--preset gpt2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time

import numpy as np

from gptcore.models import GPT, GPTConfig
from gptcore.serve import create_app

MODEL = "bench"


class _Server:
    """create_app + uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


def _request(port: int, body: dict) -> dict:
    """The response of one request; a streamed one (server-sent events, read as they come)
    is returned as its last chunk, which carries the usage."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
        if not body.get("stream"):
            return json.loads(r.read())
        last = None
        for line in r:
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])
        return last
    finally:
        conn.close()


def _bodies(tok, n: int, max_tokens: int, prompt_words: int, stream: bool):
    rng = np.random.default_rng(0)
    words = ["the", "model", "serves", "many", "clients", "at", "once", "and", "every", "one",
             "gets", "its", "answer", "in", "time", "while", "a", "batch", "runs"]
    eot = getattr(tok, "eot_token", None)
    bias = {str(eot): -100} if eot is not None else None
    return [{"model": MODEL, "prompt": " ".join(rng.choice(words, prompt_words)),
             "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "logit_bias": bias,
             **({"stream": True, "stream_options": {"include_usage": True}} if stream else {})}
            for i in range(n)]


def _run(model, tok, bodies, batch: int, concurrent: bool):
    """(completion tokens, seconds) for ``bodies`` through a server with ``batch`` rows."""
    server = _Server(create_app(model, tok, model_name=MODEL, max_batch=batch,
                                max_queue=len(bodies)))
    try:
        _request(server.port, dict(bodies[0], max_tokens=2))  # warm-up: buffers, caches
        results = [None] * len(bodies)
        t0 = time.perf_counter()
        if concurrent:
            def client(i):
                results[i] = _request(server.port, bodies[i])
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i, b in enumerate(bodies):
                results[i] = _request(server.port, b)
        dt = time.perf_counter() - t0
    finally:
        server.close()
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return tokens, dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--rounds", type=int, default=1, help="requests per client")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "byte"])
    p.add_argument("--stream", action="store_true", help="streamed responses (server-sent events)")
    args = p.parse_args(argv)

    from gptcore.tokenizer import Tokenizer

    tok = Tokenizer.gpt2() if args.tokenizer == "gpt2" else Tokenizer.byte_level()
    cfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size) if args.tokenizer == "byte" \
        else GPTConfig.preset(args.preset)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    model = GPT(cfg, device=args.device, dtype=dtype, seed=0).eval()
    bodies = _bodies(tok, args.clients * args.rounds, args.max_tokens, args.prompt_words,
                     args.stream)
    print(f"bench_serve: {args.preset} ({model.num_parameters() / 1e6:.0f}M params, {args.tokenizer} "
          f"tokenizer) on {args.device}, {os.cpu_count()} CPUs, {len(bodies)} requests x "
          f"{args.max_tokens} tokens{', streamed' if args.stream else ''}", flush=True)
    seq_tokens, seq_s = _run(model, tok, bodies, batch=1, concurrent=False)
    seq = seq_tokens / seq_s
    print(f"  one at a time (batch 1):    {seq_tokens} tokens in {seq_s:7.2f} s = {seq:8.1f} tokens/s",
          flush=True)
    con_tokens, con_s = _run(model, tok, bodies, batch=args.clients, concurrent=True)
    con = con_tokens / con_s
    print(f"  {args.clients} concurrent (batch {args.clients}): {con_tokens} tokens in {con_s:7.2f} s = "
          f"{con:8.1f} tokens/s", flush=True)
    print(f"  ratio: {con / seq:.2f}x (target >= 4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
