"""gptcore.generate.continuous.Engine: continuous batching gives each request exactly what
gptcore.complete / generate give it alone, whatever else shares the batch; the queue is bounded;
cancelled requests free their slots; stop() ends everything cleanly."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gptcore.generate import complete, generate
from gptcore.generate.continuous import Done, Engine, EngineStopped, Piece, QueueFull
from tests.serve.conftest import tiny_model

PROMPTS = ["Hello", "The quick brown fox", "a", "xyz abc", "12345", "foo bar baz qux", "Q", "zz"]


@pytest.fixture
def engine(model, tokenizer):
    e = Engine(model, tokenizer, max_batch=4, max_queue=32).start()
    yield e
    e.stop(drain=False)


def _wait_all(reqs, timeout=30):
    for r in reqs:
        assert r.wait(timeout), "a request did not finish"
        assert r.error is None, r.error


def test_greedy_equals_complete_with_more_requests_than_slots(engine, model, tokenizer):
    # 8 requests of different lengths through 4 slots: rows join and leave mid-batch
    lens = [20, 5, 33, 12, 1, 27, 9, 16]
    reqs = [engine.submit(tokenizer.encode(p), max_tokens=n, temperature=0)
            for p, n in zip(PROMPTS, lens)]
    _wait_all(reqs)
    for p, n, r in zip(PROMPTS, lens, reqs):
        want = complete(model, tokenizer, p, max_new_tokens=n, temperature=0)
        (c,) = r.choices
        assert c.text == want, p
        assert c.finish_reason == "length" and len(c.tokens) == n
        assert r.completion_tokens == n and r.prompt_tokens == len(tokenizer.encode(p))


def test_seeded_sampling_does_not_depend_on_the_batch(engine, model, tokenizer):
    kw = dict(max_tokens=25, temperature=0.9, top_p=0.9, top_k=50, frequency_penalty=0.5,
              presence_penalty=0.3, logit_bias={"65": 2.0, 66: -1.5}, seed=1234)
    alone = engine.submit(tokenizer.encode("Hi"), n=3, **kw)
    _wait_all([alone])
    # the same request again, now amid others with other controls and seeds
    noise = [engine.submit(tokenizer.encode(p), max_tokens=30, temperature=1.0, seed=i)
             for i, p in enumerate(PROMPTS[:3])]
    again = engine.submit(tokenizer.encode("Hi"), n=3, **kw)
    noise += [engine.submit(tokenizer.encode(p), max_tokens=10, temperature=0.5) for p in PROMPTS[3:6]]
    _wait_all(noise + [again])
    assert [c.text for c in again.choices] == [c.text for c in alone.choices]
    # n choices with seed s are complete([prompt] * n, seed=s)
    want = complete(model, tokenizer, ["Hi"] * 3, max_new_tokens=25, temperature=0.9, top_p=0.9,
                    top_k=50, frequency_penalty=0.5, presence_penalty=0.3,
                    logit_bias={65: 2.0, 66: -1.5}, seed=1234)
    assert [c.text for c in alone.choices] == want
    assert len(set(want)) > 1  # the choices are different samples


def test_logprobs_and_stop_match_generate(engine, model, tokenizer):
    ids = tokenizer.encode("stop here")
    greedy = complete(model, tokenizer, "stop here", max_new_tokens=30, temperature=0)
    # a stop sequence the greedy answer reaches after a few tokens
    stop = next(greedy[i:i + 2] for i in range(3, 28) if greedy.index(greedy[i:i + 2]) >= 3)
    r = engine.submit(ids, max_tokens=30, temperature=0, stop=[stop], logprobs=3)
    _wait_all([r])
    text, lp = complete(model, tokenizer, "stop here", max_new_tokens=30, temperature=0,
                        stop=[stop], logprobs=3)
    (c,) = r.choices
    assert c.text == text == greedy[:greedy.index(stop)]
    assert c.finish_reason == "stop"
    got = np.array([e.logprob for e in c.logprobs])
    np.testing.assert_allclose(got, lp.token_logprobs[:len(got)], rtol=1e-5, atol=1e-6)
    assert [e.token for e in c.logprobs] == c.tokens
    np.testing.assert_array_equal([[t for t, _ in e.top] for e in c.logprobs], lp.top_tokens[:len(got)])


def test_pieces_stream_the_whole_text_then_done(engine, tokenizer):
    events = []
    r = engine.submit(tokenizer.encode("abc"), n=2, max_tokens=12, temperature=0.7, seed=3,
                      on_event=events.append)
    _wait_all([r])
    assert isinstance(events[-1], Done) and events[-1].error is None
    pieces = [e for e in events if isinstance(e, Piece)]
    for i, c in enumerate(r.choices):
        mine = [p for p in pieces if p.index == i]
        assert "".join(p.text for p in mine) == c.text
        assert sum((p.tokens for p in mine), []) == c.tokens
        assert [p.finish_reason for p in mine][-1] == c.finish_reason == "length"
        assert all(p.finish_reason is None for p in mine[:-1])


def test_prompt_logprobs_match_full_forward(engine, model, tokenizer):
    ids = tokenizer.encode("scored prompt")
    r = engine.submit(ids, max_tokens=0, logprobs=2, prompt_logprobs=True)
    _wait_all([r])
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length"
    lg = model.logits(np.asarray(ids)[None, :])[0].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    lsm = lg - top - np.log(np.exp(lg - top).sum(-1, keepdims=True))
    assert r.prompt_logprobs[0] is None
    for t in range(1, len(ids)):
        e = r.prompt_logprobs[t]
        assert e.token == ids[t]
        assert e.logprob == pytest.approx(lsm[t - 1, ids[t]], abs=1e-4)
        assert e.top[0][0] == int(np.argmax(lsm[t - 1]))


def test_queue_is_bounded(model, tokenizer):
    e = Engine(model, tokenizer, max_batch=2, max_queue=3)  # not started: nothing leaves the queue
    # the first two fill the free slots at the next step; three more may wait for slots
    reqs = [e.submit([1, 2], max_tokens=4) for _ in range(5)]
    with pytest.raises(QueueFull, match=r"3 requests are waiting .*\(max_queue 3\)"):
        e.submit([1, 2], max_tokens=4)
    assert e.stats()["waiting_requests"] == 5
    e.stop()  # never started: the waiting requests end with an error instead of hanging
    assert all(r.done and "shutting down" in r.error for r in reqs)
    with pytest.raises(EngineStopped):
        e.submit([1, 2], max_tokens=4)


def test_without_a_queue_requests_get_slots_or_are_refused(model, tokenizer):
    e = Engine(model, tokenizer, max_batch=3, max_queue=0)
    e.submit([1], n=2)
    with pytest.raises(QueueFull):
        e.submit([1], n=2)  # one slot left
    e.submit([1], n=1)
    with pytest.raises(QueueFull):
        e.submit([1])
    e.stop()


def test_cancel_frees_the_slots(model, tokenizer):
    m = tiny_model(block_size=1024)
    e = Engine(m, tokenizer, max_batch=2, max_queue=8).start()
    try:
        started = threading.Event()
        long = e.submit([5], n=2, max_tokens=1000, temperature=1.0, seed=0, logit_bias={256: -100},
                        on_event=lambda ev: started.set())
        waiting = e.submit(tokenizer.encode("next"), max_tokens=5, temperature=0)
        assert started.wait(30)
        assert not waiting.done  # both slots are taken by the long request
        long.cancel()
        assert long.wait(30) and long.error == "cancelled"
        assert long.completion_tokens < 2 * 1000
        assert waiting.wait(30) and waiting.error is None
        assert waiting.choices[0].text == complete(m, tokenizer, "next", max_new_tokens=5, temperature=0)
        assert e.stats()["busy_slots"] == 0
    finally:
        e.stop(drain=False)


def test_stop_cancels_running_requests(model, tokenizer):
    m = tiny_model(block_size=1024)
    e = Engine(m, tokenizer, max_batch=1, max_queue=8).start()
    a = e.submit([1], max_tokens=1000, logit_bias={256: -100})
    b = e.submit([2], max_tokens=1000)
    e.stop(drain=False)
    assert a.done and b.done
    assert a.error is not None and b.error is not None  # cancelled, never a hang
    assert not e.running


def test_stop_drains_then_cancels_at_the_timeout(model, tokenizer, monkeypatch):
    m = tiny_model(block_size=1024)
    e = Engine(m, tokenizer, max_batch=2, max_queue=8).start()
    real = e._dec.step_rows

    def slow(ids, positions):  # 1000 tokens take >= 5 s
        time.sleep(0.005)
        return real(ids, positions)

    monkeypatch.setattr(e._dec, "step_rows", slow)
    short = e.submit(tokenizer.encode("short"), max_tokens=5, temperature=0)
    long = e.submit([1], max_tokens=1000, logit_bias={256: -100})  # no early end-of-text
    t0 = time.monotonic()
    e.stop(drain=True, timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert short.done and short.error is None  # finished within the grace period
    assert short.choices[0].text == complete(m, tokenizer, "short", max_new_tokens=5, temperature=0)
    assert long.done and "shutting down" in long.error and long.completion_tokens < 1000


@pytest.mark.parametrize("kw, match", [
    (dict(n=5), "n: expected an int in \\[1, 4\\]"),
    (dict(max_tokens=-1), "max_new_tokens"),
    (dict(max_tokens=200), "exceeds the model's context"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(logit_bias={"999": 1.0}), "logit_bias"),
])
def test_bad_arguments_raise(model, tokenizer, kw, match):
    e = Engine(model, tokenizer, max_batch=4, max_queue=4)
    with pytest.raises(ValueError, match=match):
        e.submit([1, 2, 3], **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        e.submit([1, 300])
    with pytest.raises(ValueError, match="prompt"):
        e.submit([])
    assert e.stats()["waiting_requests"] == 0


def test_token_prompts_equal_generate(engine, model):
    ids = [[3, 14, 15, 92], [65]]
    reqs = [engine.submit(p, max_tokens=10, temperature=0) for p in ids]
    _wait_all(reqs)
    for p, r in zip(ids, reqs):
        want = generate(model, p, 10, temperature=0)
        assert r.choices[0].tokens == want[len(p):].tolist()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, tokenizer, monkeypatch):
    e = Engine(model, tokenizer, max_batch=2, max_queue=4).start()
    try:
        real = e._dec.step_rows
        calls = []

        def broken_once(ids, positions):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device lost")
            return real(ids, positions)

        monkeypatch.setattr(e._dec, "step_rows", broken_once)
        bad = e.submit(tokenizer.encode("x"), max_tokens=5)
        assert bad.wait(30) and "device lost" in bad.error
        good = e.submit(tokenizer.encode("y"), max_tokens=5, temperature=0)
        assert good.wait(30) and good.error is None
        assert good.choices[0].text == complete(model, tokenizer, "y", max_new_tokens=5, temperature=0)
        assert e.stats()["busy_slots"] == 0
    finally:
        e.stop(drain=False)


def test_a_lone_request_steps_one_row_not_the_whole_batch(model, tokenizer):
    """Slots are taken lowest first and a step covers rows 0 .. the highest busy one, so a lone
    request on a 4-row engine pays for one row (and its answer is still complete()'s)."""
    e = Engine(model, tokenizer, max_batch=4, max_queue=4).start()
    widths = []
    real = e._dec.step_rows

    def spy(ids, positions):
        widths.append(len(ids))
        return real(ids, positions)

    e._dec.step_rows = spy
    try:
        r = e.submit(tokenizer.encode("Hello"), max_tokens=6, temperature=0)
        _wait_all([r])
    finally:
        e.stop(drain=False)
    assert widths and set(widths) == {1}
    assert r.choices[0].text == complete(model, tokenizer, "Hello", max_new_tokens=6, temperature=0)
