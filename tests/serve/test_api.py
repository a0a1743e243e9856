"""POST /v1/completions and friends over real HTTP on loopback (the standard library's client):
OpenAI's response schema, streaming as server-sent events, the error JSON and status codes for
bad input (and the server serving everyone else meanwhile), 413 for huge bodies, 429 under
overload, a disconnecting client freeing its slot, and `gptcore serve` ending cleanly on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import gptcore
from gptcore.generate import complete
from gptcore.serve import create_app
from tests.serve.conftest import MODEL_NAME, LiveServer, get, post, stream_events, tiny_model


NO_EOT = {"256": -100}  # long requests run their full length (no early end-of-text)


def _body(**kw):
    return {"model": MODEL_NAME, **kw}


def test_completion_schema_and_greedy_answer(server, model, tokenizer):
    status, r = post(server, "/v1/completions", _body(prompt="Hello", max_tokens=12, temperature=0))
    assert status == 200, r
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert isinstance(r["created"], int) and r["model"] == MODEL_NAME
    (c,) = r["choices"]
    assert set(c) == {"text", "index", "logprobs", "finish_reason"}
    assert c["index"] == 0 and c["logprobs"] is None and c["finish_reason"] == "length"
    assert c["text"] == complete(model, tokenizer, "Hello", max_new_tokens=12, temperature=0)
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_several_prompts_and_choices(server, model, tokenizer):
    prompts = ["ab", "The cat", [72, 105]]  # strings and a token prompt ("Hi")
    status, r = post(server, "/v1/completions",
                     _body(prompt=prompts, n=2, max_tokens=8, temperature=0.8, seed=7))
    assert status == 200, r
    assert [c["index"] for c in r["choices"]] == list(range(6))
    for k, p in enumerate(["ab", "The cat", "Hi"]):
        want = complete(model, tokenizer, [p, p], max_new_tokens=8, temperature=0.8, seed=7)
        assert [c["text"] for c in r["choices"][2 * k:2 * k + 2]] == want
    # as OpenAI's: a prompt counts once however many choices it has; every generated token counts
    # (an end-of-text that stopped a choice too)
    assert r["usage"]["prompt_tokens"] == 2 + 7 + 2
    assert r["usage"]["completion_tokens"] == sum(
        len(tokenizer.encode(c["text"])) + (c["finish_reason"] == "stop") for c in r["choices"])


def test_echo_and_logprobs(server, model, tokenizer):
    status, r = post(server, "/v1/completions",
                     _body(prompt="Hey you", max_tokens=6, temperature=0, logprobs=3, echo=True))
    assert status == 200, r
    (c,) = r["choices"]
    gen = complete(model, tokenizer, "Hey you", max_new_tokens=6, temperature=0)
    assert c["text"] == "Hey you" + gen
    lp = c["logprobs"]
    assert "".join(lp["tokens"]) == c["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(t) == 3 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    # greedy: each generated token is its position's most likely one
    for tok, top in zip(lp["tokens"][7:], lp["top_logprobs"][7:]):
        assert max(top, key=top.get) == tok
    _, lp2 = complete(model, tokenizer, "Hey you", max_new_tokens=6, temperature=0, logprobs=3)
    assert lp["token_logprobs"][7:] == pytest.approx(lp2.token_logprobs.tolist(), abs=1e-5)


def test_stream_equals_whole_response(server):
    kw = dict(prompt=["one", "two"], n=2, max_tokens=20, temperature=1.0, seed=11, stop=["\n"])
    _, whole = post(server, "/v1/completions", _body(**kw))
    events = stream_events(server, _body(stream=True, stream_options={"include_usage": True}, **kw))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    texts, finish = {}, {}
    for ch in chunks:
        assert ch["object"] == "text_completion" and ch["model"] == MODEL_NAME
        assert ch["id"] == chunks[0]["id"]
        (c,) = ch["choices"]
        assert c["index"] not in finish, "a chunk after the choice finished"
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"] is not None:
            finish[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finish == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert len(chunks) > len(whole["choices"])  # token by token, not one chunk per choice


def test_stream_with_echo_and_logprobs(server):
    events = stream_events(server, _body(prompt="ab", max_tokens=5, temperature=0, echo=True,
                                         logprobs=1, stream=True))
    _, whole = post(server, "/v1/completions", _body(prompt="ab", max_tokens=5, temperature=0,
                                                     echo=True, logprobs=1))
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    streamed = sum((c["logprobs"]["tokens"] for c in chunks), [])
    assert streamed == whole["choices"][0]["logprobs"]["tokens"]
    offsets = sum((c["logprobs"]["text_offset"] for c in chunks), [])
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]


BAD = [
    (b"{", 400, None, "not JSON"),
    (b"\xff\xfe{}", 400, None, "not UTF-8"),
    (b'{"model": "tiny-test", "prompt": "\xc3\x28"}', 400, None, "not UTF-8"),
    (b"[1, 2]", 400, None, "JSON object"),
    (_body(prompt="a", max_tokens=-1), 400, "max_tokens", "max_tokens"),
    (_body(prompt="a", max_tokens="ten"), 400, "max_tokens", "integer"),
    (_body(prompt="a", temperature="hot"), 400, "temperature", "number"),
    (_body(prompt="a", temperature=3), 400, "temperature", "[0, 2]"),
    (_body(prompt="a", top_p=1.5), 400, "top_p", "top_p"),
    (_body(prompt="a", n=0), 400, "n", "n"),
    (_body(prompt="a", n=9), 400, "n", "n"),  # the fixture's batch is 8
    (_body(prompt="a", stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (_body(prompt="a", stop=7), 400, "stop", "stop"),
    (_body(prompt="a", logprobs=6), 400, "logprobs", "logprobs"),
    (_body(prompt="a", logit_bias={"65": 101}), 400, "logit_bias", "-100"),
    (_body(prompt="a", logit_bias={"999": 1}), 400, "logit_bias", "token id"),
    (_body(prompt="a", frequency_penalty=2.5), 400, "frequency_penalty", "frequency_penalty"),
    (_body(prompt="a", echo="yes"), 400, "echo", "boolean"),
    (_body(prompt="a", seed=-1), 400, "seed", "seed"),
    (_body(prompt="a", stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    (_body(prompt="a", best_of=3), 400, "best_of", "best_of"),
    (_body(prompt="a", bogus=1), 400, "bogus", "Unrecognized"),
    (_body(prompt=[]), 400, "prompt", "prompt"),
    (_body(prompt=[1, 2, 999]), 400, "prompt", "vocabulary"),
    (_body(prompt=[["a"]]), 400, "prompt", "prompt"),
    (_body(prompt="x" * 120, max_tokens=10), 400, "prompt", "maximum context length"),
    (_body(prompt=["a", "b", "c"], n=8, max_tokens=100), 400, "n", "limit"),
    (_body(prompt="a", max_tokens=500), 400, "max_tokens", "context"),
    ({"prompt": "a"}, 400, "model", "model"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body, status, param, text", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors(server, body, status, param, text):
    got, r = post(server, "/v1/completions", body)
    assert got == status, r
    assert set(r) == {"error"} and set(r["error"]) == {"message", "type", "param", "code"}
    assert r["error"]["param"] == param
    assert text in r["error"]["message"]
    if status == 404:
        assert r["error"]["code"] == "model_not_found"


def test_bad_requests_amid_good_ones(server, model, tokenizer):
    """Good clients get correct answers while others send garbage."""
    prompts = [f"client {i}" for i in range(6)]
    results, errors = {}, []

    def good(i):
        try:
            results[i] = post(server, "/v1/completions",
                              _body(prompt=prompts[i], max_tokens=15, temperature=0))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for body, status, _, _ in BAD:
        assert post(server, "/v1/completions", body)[0] == status
    for t in threads:
        t.join(60)
    assert not errors
    for i, p in enumerate(prompts):
        status, r = results[i]
        assert status == 200
        assert r["choices"][0]["text"] == complete(model, tokenizer, p, max_new_tokens=15, temperature=0)


def test_engine_failure_is_an_error_answer(server, monkeypatch):
    real = server.engine._dec.step_rows
    fail = {"left": 2}

    def flaky(ids, positions):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("device lost")
        return real(ids, positions)

    monkeypatch.setattr(server.engine._dec, "step_rows", flaky)
    status, r = post(server, "/v1/completions", _body(prompt="a", max_tokens=5))
    assert status == 500 and "device lost" in r["error"]["message"]
    assert r["error"]["type"] == "server_error"
    events = stream_events(server, _body(prompt="a", max_tokens=5, stream=True))
    assert "device lost" in json.loads(events[-1])["error"]["message"]  # an error event ends it
    assert post(server, "/v1/completions", _body(prompt="a", max_tokens=5))[0] == 200


def test_huge_body_is_refused(server):
    big = json.dumps(_body(prompt="x" * (10 << 20))).encode()  # a 10 MB prompt
    status, r = post(server, "/v1/completions", big)
    assert status == 413 and "limit" in r["error"]["message"]
    # a body sent in chunks (no Content-Length) over the limit
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b"x" * (1 << 16)] * 40), encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    # a declared length far too large is refused before anything is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    assert post(server, "/v1/completions", _body(prompt="still here", max_tokens=2))[0] == 200


def test_other_routes(server):
    status, r = get(server, "/v1/models")
    assert status == 200 and r["object"] == "list" and [m["id"] for m in r["data"]] == [MODEL_NAME]
    assert get(server, f"/v1/models/{MODEL_NAME}")[1]["id"] == MODEL_NAME
    status, r = get(server, "/v1/models/other")
    assert status == 404 and r["error"]["code"] == "model_not_found"
    status, r = get(server, "/health")
    assert status == 200 and r["status"] == "ok" and r["max_batch"] == 8
    status, r = get(server, "/nowhere")
    assert status == 404 and "error" in r
    status, r = get(server, "/v1/completions")
    assert status == 405 and "error" in r


@pytest.fixture(scope="module")
def long_server(tokenizer):
    """A model with a long context (long requests) and a batch of 2."""
    s = LiveServer(create_app(tiny_model(block_size=1024), tokenizer, model_name=MODEL_NAME,
                              max_batch=2, max_queue=1))
    yield s
    s.close()


def test_disconnected_client_frees_its_slot(long_server):
    before = long_server.engine.stats()["tokens_generated"]
    conn = http.client.HTTPConnection("127.0.0.1", long_server.port, timeout=30)
    conn.request("POST", "/v1/completions",
                 body=json.dumps(_body(prompt="go", max_tokens=1000, stream=True,
                                       logit_bias=NO_EOT)).encode())
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the stream has begun
    assert long_server.engine.stats()["busy_slots"] == 1
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    stats = long_server.wait_idle(timeout=20)
    assert stats is not None, "the slot was not freed"
    assert stats["tokens_generated"] - before < 1000  # it stopped early


def test_disconnected_client_frees_its_slot_without_streaming(long_server):
    before = long_server.engine.stats()["tokens_generated"]
    conn = http.client.HTTPConnection("127.0.0.1", long_server.port, timeout=30)
    conn.request("POST", "/v1/completions",
                 body=json.dumps(_body(prompt="go", max_tokens=1000, logit_bias=NO_EOT)).encode())
    deadline = time.monotonic() + 20
    while long_server.engine.stats()["busy_slots"] == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    conn.sock.close()  # gone before the answer
    conn.close()
    stats = long_server.wait_idle(timeout=20)
    assert stats is not None, "the slot was not freed"
    assert stats["tokens_generated"] - before < 1000


def test_overload_answers_429_and_recovers(long_server):
    """Batch 2, queue 1: one request holds both slots, one waits, the others get 429."""
    results = []

    def call(body):
        results.append(post(long_server, "/v1/completions", body, timeout=60))

    hog = threading.Thread(target=call, args=(_body(prompt="hog", n=2, max_tokens=900,
                                                    logit_bias=NO_EOT),))
    hog.start()
    deadline = time.monotonic() + 20
    while long_server.engine.stats()["busy_slots"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    others = [threading.Thread(target=call, args=(_body(prompt=f"p{i}", max_tokens=3),))
              for i in range(4)]
    for t in others:
        t.start()
    for t in others + [hog]:
        t.join(120)
    codes = sorted(s for s, _ in results)
    assert len(codes) == 5 and 429 in codes and codes.count(200) >= 2, codes
    for status, r in results:
        if status == 429:
            assert r["error"]["type"] == "rate_limit_error" and "busy" in r["error"]["message"]
        else:
            assert status == 200 and r["choices"][0]["finish_reason"] in ("stop", "length")
    assert post(long_server, "/v1/completions", _body(prompt="after", max_tokens=3))[0] == 200


def _env():
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(gptcore.__file__))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def test_cli_serves_and_stops_on_sigterm(tmp_path, tokenizer):
    ck = tmp_path / "my-model"
    tiny_model(block_size=512).save_pretrained(str(ck))
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "serve", "--checkpoint", str(ck),
                             "--port", "0", "--max-batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        banner = "".join(proc.stdout.readline() for _ in range(5))
        url = next(w for w in banner.split() if w.startswith("http://"))
        port = int(url.split(":")[2].split("/")[0])
        assert f"127.0.0.1:{port}/playground" in banner and f"127.0.0.1:{port}/rank" in banner
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "my-model"
        # a streaming request in flight when SIGTERM arrives is finished, then the server exits 0
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"model": "my-model", "prompt": "x", "max_tokens": 300,
                                      "logit_bias": NO_EOT, "stream": True}).encode())
        r = conn.getresponse()
        assert r.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert '"finish_reason": "length"' in rest
        assert proc.wait(60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors(tmp_path, capsys):
    from gptcore.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "gptcore serve: error:" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path), "--port", str(port)]) == 2
        assert f"--port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()
