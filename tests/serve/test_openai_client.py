"""The server through the official `openai` client (its own request building, response parsing,
SSE reader and error classes): what OpenAI's users would run against it."""

from __future__ import annotations

import pytest

from gptcore.generate import complete
from tests.serve.conftest import MODEL_NAME

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_greedy_completion_equals_complete(client, model, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=20,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_NAME
    assert r.choices[0].text == complete(model, tokenizer, "Once upon a time", max_new_tokens=20,
                                         temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (16, 20, 36)


def test_sampling_controls(client, model, tokenizer):
    kw = dict(max_tokens=16, temperature=0.8, top_p=0.9, frequency_penalty=0.6,
              presence_penalty=0.4, seed=42, logit_bias={"101": 3.0, "32": -100}, stop=["zz", "44"])
    r = client.completions.create(model=MODEL_NAME, prompt=["alpha", "beta"], n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for k, p in enumerate(["alpha", "beta"]):
        want = complete(model, tokenizer, [p, p], max_new_tokens=16, temperature=0.8, top_p=0.9,
                        frequency_penalty=0.6, presence_penalty=0.4, seed=42,
                        logit_bias={101: 3.0, 32: -100.0}, stop=["zz", "44"])
        assert [c.text for c in r.choices[2 * k:2 * k + 2]] == want
    assert all(c.text for c in r.choices)
    assert [c.finish_reason for c in r.choices] == ["length", "length", "stop", "length"]
    assert not any(" " in c.text for c in r.choices)  # banned by logit_bias -100
    # the same seed gives the same answers
    again = client.completions.create(model=MODEL_NAME, prompt="alpha", n=2, **kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices[:2]]


def test_logprobs_and_echo(client):
    r = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=5, temperature=0,
                                  logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text.startswith("abc")
    assert c.logprobs.tokens[:3] == ["a", "b", "c"]
    assert c.logprobs.token_logprobs[0] is None
    assert len(c.logprobs.top_logprobs[4]) == 2


def test_streaming(client, model, tokenizer):
    stream = client.completions.create(model=MODEL_NAME, prompt="Stream me", max_tokens=24,
                                       temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) > 2  # flushed token by token
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == complete(model, tokenizer, "Stream me", max_new_tokens=24, temperature=0)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streaming_with_usage(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="u", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 1
    assert chunks[-1].usage.total_tokens == 1 + chunks[-1].usage.completion_tokens


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=-3)
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="a", temperature=9)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt="x" * 200, max_tokens=1)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="davinci-002", prompt="a")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # also when streaming: before the stream starts
        client.completions.create(model=MODEL_NAME, prompt="a", logprobs=99, stream=True)
    # and it still answers
    assert client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=1).choices


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_error_mid_stream_raises(client, server, monkeypatch):
    real = server.engine._dec.step_rows
    fail = {"left": 1}

    def flaky(ids, positions):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("device lost")
        return real(ids, positions)

    monkeypatch.setattr(server.engine._dec, "step_rows", flaky)
    stream = client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=5, stream=True)
    with pytest.raises(openai.APIError, match="device lost"):
        list(stream)
