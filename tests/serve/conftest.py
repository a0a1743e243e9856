"""Fixtures for the completion server's tests: a tiny random model with the byte-level tokenizer,
and a real server (uvicorn on a free loopback port, in a thread) around it.

The model's weights have fan-in scale (as in tests/generate) so its next-token distributions are
neither flat nor one-hot: greedy answers vary with the prompt and sampling has real choices. One
embedding dimension, which the final LayerNorm pins to a constant, keeps its answers in printable
ASCII plus newline and end-of-text (every other byte's logit is 16 lower), so they read as text
and stop sequences can be plain strings.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import List, Optional, Tuple

import numpy as np
import pytest

from gptcore.models import GPT, GPTConfig
from gptcore.tokenizer import Tokenizer
from tests.helpers import mixing_weights

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

MODEL_NAME = "tiny-test"


def tiny_model(seed: int = 0, block_size: int = 128, n_layer: int = 2, n_embd: int = 64) -> GPT:
    m = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=block_size,
                      vocab_size=257), seed=seed)
    sd = mixing_weights(m, seed + 1)
    # channel 0 of the final LayerNorm is a constant 4, so every byte that is not printable
    # ASCII, a newline or end-of-text gets a logit 16 lower: samples read as text
    text = np.zeros(257, bool)
    text[32:127] = text[10] = text[256] = True
    sd["wte"][:, 0] = np.where(text, 0.0, -4.0)
    sd["ln_f.weight"][0], sd["ln_f.bias"][0] = 0.0, 4.0
    m.load_state_dict(sd)
    return m


class LiveServer:
    """A uvicorn server for ``app`` on 127.0.0.1 at a free port, run in a thread (the app's
    lifespan starts and stops its engine). ``url`` is its base URL."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self._sock = sock

    @property
    def engine(self):
        return self.app.state.engine

    def wait_idle(self, timeout: float = 10.0) -> Optional[dict]:
        """Waits until no request holds or waits for a slot; returns the engine's stats."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.engine.stats()
            if s["busy_slots"] == 0 and s["waiting_requests"] == 0:
                return s
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self._sock.close()


def post(server, path: str, body, timeout: float = 30.0) -> Tuple[int, dict]:
    """POST ``body`` (bytes as they are, anything else as JSON) with the standard library's
    HTTP client; returns (status, parsed JSON response)."""
    data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def get(server, path: str) -> Tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def stream_events(server, body: dict, timeout: float = 30.0) -> List[str]:
    """POST a streaming request; returns the ``data:`` payloads of its server-sent events."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        assert r.getheader("content-type").startswith("text/event-stream")
        text = r.read().decode()
    finally:
        conn.close()
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.byte_level()


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    from gptcore.serve import create_app

    s = LiveServer(create_app(model, tokenizer, model_name=MODEL_NAME, max_batch=8, max_queue=64))
    yield s
    s.close()
