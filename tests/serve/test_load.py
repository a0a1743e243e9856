"""A bounded load test on loopback: 16 concurrent clients (the official openai client, streaming
and not) x 3 requests against a server with a batch of 8 (so requests also queue). Every answer
is complete and equals the one computed alone with gptcore.complete."""

from __future__ import annotations

import threading
import time

import pytest

from gptcore.generate import complete
from tests.serve.conftest import MODEL_NAME

openai = pytest.importorskip("openai")

CLIENTS, PER_CLIENT = 16, 3


def _job(c: int, j: int) -> dict:
    """Client c's j-th request: greedy or seeded, streaming or not, various lengths."""
    return dict(prompt=f"client {c} request {j}: ", max_tokens=8 + (5 * c + 3 * j) % 30,
                temperature=0 if (c + j) % 2 == 0 else 0.9, seed=100 * c + j,
                stream=(c % 3 == 0))


def test_concurrent_clients_get_correct_complete_answers(server, model, tokenizer):
    answers, errors = {}, []

    def client_thread(c):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        try:
            for j in range(PER_CLIENT):
                kw = _job(c, j)
                r = client.completions.create(model=MODEL_NAME, **kw)
                if kw["stream"]:
                    chunks = list(r)
                    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                    finish = chunks[-1].choices[0].finish_reason
                else:
                    text, finish = r.choices[0].text, r.choices[0].finish_reason
                answers[c, j] = (text, finish)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append((c, repr(e)))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert len(answers) == CLIENTS * PER_CLIENT
    assert elapsed < 60, f"the load test took {elapsed:.1f} s"
    for (c, j), (text, finish) in sorted(answers.items()):
        kw = _job(c, j)
        want = complete(model, tokenizer, kw["prompt"], max_new_tokens=kw["max_tokens"],
                        temperature=kw["temperature"], seed=kw["seed"])
        assert text == want, (c, j)
        assert finish in ("stop", "length")
        if finish == "length":
            assert len(tokenizer.encode(text)) == kw["max_tokens"]  # complete, not cut short
    assert server.wait_idle() is not None
