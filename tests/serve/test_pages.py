"""gptcore serve's pages: /playground and /rank, in a real headless browser, and the ranking
API's validation over plain HTTP.

The browser tests drive Debian's Chromium with selenium (``/usr/bin/chromium`` and
``/usr/bin/chromedriver``, given explicitly: selenium's own driver download is never tried)
against a real server (uvicorn on loopback, the byte-level tokenizer, a tiny model). They are
skipped when the browser is not installed, except where the ``CI`` variable is set (CI installs
it, so its absence is a failure there). Each page's screenshot is kept in
``test-artifacts/screenshots/`` (or ``$GPTCORE_ARTIFACTS/screenshots/``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from gptcore.data.preference import read_rankings  # noqa: E402
from gptcore.generate import complete  # noqa: E402
from gptcore.models import GPT, GPTConfig  # noqa: E402
from gptcore.serve import create_app  # noqa: E402
from gptcore.serve import pages  # noqa: E402
from gptcore.serve.pages import load_prompts, page_routes  # noqa: E402
from gptcore.tokenizer import Tokenizer  # noqa: E402
from tests.serve.conftest import LiveServer, post  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = ["The moon is", "Once upon a time,\nthere was"]


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text("utf-8").splitlines()]


# ---- the prompts file --------------------------------------------------------------------------

def test_prompts_plain_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"first prompt\r\n\n   \nsecond: with trailing space \nlast without newline")
    assert load_prompts(txt) == ["first prompt", "second: with trailing space ",
                                 "last without newline"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a\\nb", "id": 7}\n\n{"prompt": "c", "completion": "x"}\n', "utf-8")
    assert load_prompts(jl) == ["a\nb", "c"]


@pytest.mark.parametrize("name, data, match", [
    ("p.txt", b"", "no prompts"),
    ("p.txt", b"\n  \n", "no prompts"),
    ("p.txt", b"ok\n\xff\xfe\n", "not UTF-8"),
    ("p.txt", b"a\nb\na\n", r"p.txt:3: the same prompt as line 1"),
    ("p.txt", b"x" * (pages.MAX_PROMPT_CHARS + 1), "at most"),
    ("p.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', r"p.jsonl:2: expected an object with"),
    ("p.jsonl", b'["a"]\n', r"p.jsonl:1: expected an object"),
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": \n', r"p.jsonl:2: not JSON"),
    ("p.jsonl", b'{"prompt": "  "}\n', r"p.jsonl:1: empty prompt"),
    ("p.jsonl", b'{"prompt": "\\ud800"}\n', r"p.jsonl:1: not Unicode text"),
], ids=lambda v: "data" if isinstance(v, bytes) else str(v)[:40])
def test_bad_prompts_files(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        load_prompts(path)


def test_page_routes_arguments(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    with pytest.raises(FileNotFoundError, match="rank_prompts"):
        page_routes(str(tmp_path / "missing.txt"), str(tmp_path / "r.jsonl"), 4)
    with pytest.raises(ValueError, match="give both"):
        page_routes(str(prompts), None, 4)
    with pytest.raises(ValueError, match="give both"):
        page_routes(None, str(tmp_path / "r.jsonl"), 4)
    for k in (1, pages.MAX_RANK_K + 1):
        with pytest.raises(ValueError, match="rank_k"):
            page_routes(None, None, k)
    for k in (True, 3.0, "4"):
        with pytest.raises(TypeError, match="rank_k"):
            page_routes(None, None, k)
    bad = tmp_path / "bad.jsonl"  # --rankings pointed at some other JSONL file
    bad.write_text('{"text": "not a ranking"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'prompt'.*not a ranking"):
        page_routes(str(prompts), str(bad), 4)
    # someone's notes: refused before the writer's torn-tail repair could cut their last line
    notes = tmp_path / "notes.txt"
    for data in (b"line one\nline two", b'{"prompt": "a", "ranked": ["x", "y"]}\nnot json'):
        notes.write_bytes(data)
        with pytest.raises(ValueError, match="not a ranking"):
            page_routes(str(prompts), str(notes), 4)
        assert notes.read_bytes() == data
    assert not (tmp_path / "r.jsonl").exists()  # nothing created by the refused calls


def test_startup_repairs_and_reports_a_torn_rankings_file(tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    rankings = tmp_path / "r.jsonl"
    rankings.write_bytes(b'{"prompt": "a", "ranked": ["x", "y"]}\n{"prompt": "b", "ran')
    with TestClient(Starlette(routes=page_routes(str(prompts), str(rankings), 2))) as client:
        assert "torn last line (20 bytes" in caplog.text  # len(b'{"prompt": "b", "ran')
        assert client.get("/rank/next").json()["prompt"] == "b"  # a's one ranking counted
        assert client.post("/rank/submit", json={"prompt": "b", "ranked": ["u", "v"]}).is_success
    assert [x["prompt"] for x in _lines(rankings)] == ["a", "b"]


# ---- the ranking API over HTTP (no model needed) -----------------------------------------------

@pytest.fixture()
def rank_client(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["p0", "p1", "p2"]) + "\n")
    rankings = tmp_path / "rankings.jsonl"
    # rankings from an earlier run: p0 ranked once, and a pair for a prompt no longer served
    rankings.write_text(json.dumps({"prompt": "p0", "ranked": ["a", "b"]}) + "\n"
                        + json.dumps({"prompt": "gone", "chosen": "a", "rejected": "b"}) + "\n")
    app = Starlette(routes=page_routes(str(prompts), str(rankings), 3))
    with TestClient(app) as client:
        client.rankings = rankings
        yield client


def test_static_pages_and_assets(rank_client):
    for path in ("/playground", "/rank"):
        r = rank_client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<!DOCTYPE html>" in r.text
    for name, kind in [("pages.css", "text/css"), ("common.js", "text/javascript"),
                       ("playground.js", "text/javascript"), ("rank.js", "text/javascript")]:
        r = rank_client.get(f"/pages/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.content == (pathlib.Path(pages.STATIC_DIR) / name).read_bytes()
    for name in ("pages.py", "playground.html", "nope.js"):
        r = rank_client.get(f"/pages/{name}")
        assert r.status_code == 404 and "no such page asset" in r.json()["error"]["message"]
    for path in ("/pages/..%2Fpages.py", "/pages/../pages.py", "/pages/static/pages.css"):
        assert rank_client.get(path).status_code == 404


def test_pages_load_nothing_from_outside():
    for f in pathlib.Path(pages.STATIC_DIR).iterdir():
        text = f.read_text("utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


def test_next_prompt_is_the_least_ranked_then_cycles(rank_client):
    got = [rank_client.get("/rank/next").json() for _ in range(3)]
    # p0 has one ranking already: p1 and p2 come first, then p1 again (ties go round the file)
    assert [g["prompt"] for g in got] == ["p1", "p2", "p1"]
    assert got[0] == {"prompt": "p1", "index": 1, "prompts": 3, "k": 3, "rankings": 0, "total": 2}
    r = rank_client.post("/rank/submit", json={"prompt": "p1", "ranked": ["x", "y"]})
    assert r.status_code == 200 and r.json()["rankings"] == 1 and r.json()["total"] == 3
    assert rank_client.get("/rank/next").json()["prompt"] == "p2"  # now the only unranked one
    # skipped, the unranked p2 gives way to the least ranked of the others
    assert rank_client.get("/rank/next?skip=2").json()["prompt"] == "p0"
    for bad in ("-1", "3", "x", "", "1.0"):
        r = rank_client.get(f"/rank/next?skip={bad}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "skip", bad


def test_submit_appends_the_ranking(rank_client):
    settings = {"model": "tiny", "temperature": 0.7, "top_p": 1, "max_tokens": 16, "seed": None}
    body = {"prompt": "p2", "ranked": ["best ✓", "", "worst\n"], "settings": settings}
    r = rank_client.post("/rank/submit", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "index": 2, "rankings": 1, "total": 3}
    last = _lines(rank_client.rankings)[-1]
    assert set(last) == {"prompt", "ranked", "time", "settings"}
    assert last["prompt"] == "p2" and last["ranked"] == ["best ✓", "", "worst\n"]
    assert last["settings"] == settings
    assert time.strptime(last["time"], "%Y-%m-%dT%H:%M:%SZ")
    r = rank_client.post("/rank/submit", json={"prompt": "p2", "ranked": ["a", "b"]})
    assert r.status_code == 200 and "settings" not in _lines(rank_client.rankings)[-1]


_LONG = "x" * (pages.MAX_ANSWER_CHARS + 1)


@pytest.mark.parametrize("body, status, param, match", [
    (b"{not json", 400, None, "not JSON"),
    (b'{"prompt": "p0", "ranked": ["a", "b"], "prompt": "p1"}', 400, None, "duplicate key"),
    (b'{"prompt": "p0", "ranked": ["\xff", "b"]}', 400, None, "not UTF-8"),
    (b'["p0", ["a", "b"]]', 400, None, "expected a JSON object"),
    ({"prompt": "p0", "ranked": ["a", "b"], "extra": 1}, 400, "extra", "unknown field"),
    ({"ranked": ["a", "b"]}, 400, "prompt", "missing"),
    ({"prompt": 3, "ranked": ["a", "b"]}, 400, "prompt", "expected a string"),
    ({"prompt": "not served", "ranked": ["a", "b"]}, 400, "prompt", "not one of the prompts"),
    ({"prompt": "p0"}, 400, "ranked", "expected a list"),
    ({"prompt": "p0", "ranked": "a, b"}, 400, "ranked", "expected a list"),
    ({"prompt": "p0", "ranked": ["a"]}, 400, "ranked", "1 answers; expected 2 to 3"),
    ({"prompt": "p0", "ranked": ["a", "b", "c", "d"]}, 400, "ranked", "expected 2 to 3"),
    ({"prompt": "p0", "ranked": ["a", 2]}, 400, "ranked[1]", "expected a string"),
    ({"prompt": "p0", "ranked": ["a", "b", "a"]}, 400, "ranked", r"ranked\[2\]: the same answer"),
    ({"prompt": "p0", "ranked": ["a", _LONG]}, 400, "ranked[1]", "at most"),
    (b'{"prompt": "p0", "ranked": ["a", "\\udc80"]}', 400, "ranked[1]", "lone surrogate"),
    ({"prompt": "p0", "ranked": ["a", "b"], "settings": [1]}, 400, "settings", "an object"),
    ({"prompt": "p0", "ranked": ["a", "b"], "settings": {"x": 1}}, 400, "settings", "unknown"),
    ({"prompt": "p0", "ranked": ["a", "b"], "settings": {"seed": [1]}}, 400, "settings", "number"),
    ({"prompt": "p0", "ranked": ["a", "b"], "settings": {"seed": True}}, 400, "settings", "number"),
    (b'{"prompt": "p0", "ranked": ["a", "b"], "settings": {"top_p": NaN}}', 400, None, "not JSON"),
    (b"[" * 100_000, 400, None, "nested too deeply"),
    (b'"' + b"x" * (pages.MAX_SUBMIT_BYTES + 1) + b'"', 413, None, "at most"),
], ids=lambda v: "body" if isinstance(v, (bytes, dict)) else str(v)[:40])
def test_bad_submissions_are_refused_and_write_nothing(rank_client, body, status, param, match):
    before = rank_client.rankings.read_bytes()
    if isinstance(body, bytes):
        r = rank_client.post("/rank/submit", content=body,
                             headers={"Content-Type": "application/json"})
    else:
        r = rank_client.post("/rank/submit", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert re.search(match, err["message"]), err["message"]
    assert rank_client.rankings.read_bytes() == before
    ok = rank_client.post("/rank/submit", json={"prompt": "p0", "ranked": ["a", "b"]})
    assert ok.status_code == 200  # the endpoint keeps serving


def test_ranking_off_without_prompts():
    with TestClient(Starlette(routes=page_routes(None, None, 4))) as client:
        assert client.get("/rank").status_code == 200  # the page loads and shows why
        for r in (client.get("/rank/next"),
                  client.post("/rank/submit", json={"prompt": "a", "ranked": ["b", "c"]})):
            assert r.status_code == 404 and "--rank-prompts" in r.json()["error"]["message"]


# ---- in a real browser -------------------------------------------------------------------------

def _readable_model(seed: int = 0) -> GPT:
    """A tiny byte-level model whose samples are readable gibberish (lower-case letters, spaces
    and a little punctuation, drawn with English letter frequencies), so screenshots show text.

    The final LayerNorm's bias points along one axis; token embeddings carry each byte's log
    frequency on that axis, so the logits are that unigram table plus a context-dependent part
    (the random blocks, the other axes)."""
    freq = {" ": 18, "e": 10, "t": 7, "a": 6, "o": 6, "i": 6, "n": 6, "s": 5, "h": 5, "r": 5,
            "d": 3, "l": 3, "u": 2, "c": 2, "m": 2, "w": 2, "f": 2, "g": 2, "y": 2, "p": 2,
            "b": 1, "v": 1, "k": 1, ".": 1, ",": 1}
    d = 32
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=d, block_size=1024, vocab_size=257), seed=seed)
    r = np.random.default_rng(seed)
    sd = m.state_dict()
    unigram = np.full(257, -12.0)
    for ch, f in freq.items():
        unigram[ord(ch)] = np.log(f)
    unigram[256] = -4.0  # end-of-text now and then
    sd["wte"] = r.standard_normal((257, d)) * 0.3
    sd["wte"][:, 0] = unigram / 4.0
    sd["ln_f.weight"] = np.full(d, 0.5)
    sd["ln_f.weight"][0] = 0.0
    sd["ln_f.bias"] = np.eye(d)[0] * 4.0
    for k, v in sd.items():
        if v.ndim == 2 and k not in ("wte", "wpe"):
            sd[k] = r.standard_normal(v.shape) / np.sqrt(v.shape[1])
    m.load_state_dict(sd)
    return m


def _require_browser(chromium: str, chromedriver: str) -> None:
    """Skip (or, where CI is set, fail) unless the browser, its driver and selenium are here."""
    missing = [p for p in (chromium, chromedriver) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = (f"the browser tests need {', '.join(missing)} (Debian: apt-get install chromium "
               f"chromium-driver; pip install selenium)")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {why}")
        pytest.skip(why)


def test_missing_browser_skips_here_and_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        _require_browser(str(tmp_path / "no-chromium"), CHROMEDRIVER)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but .*no-driver"):
        _require_browser(CHROMIUM, str(tmp_path / "no-driver"))


@pytest.fixture(scope="module")
def browser():
    _require_browser(CHROMIUM, CHROMEDRIVER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the pages' console
    opts.binary_location = CHROMIUM  # with the Service path below: no Selenium Manager lookups
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots():
    root = os.environ.get("GPTCORE_ARTIFACTS")
    d = pathlib.Path(root) / "screenshots" if root else REPO / "test-artifacts" / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    model, tok = _readable_model(), Tokenizer.byte_level()
    app = create_app(model, tok, model_name="tiny-readable", max_batch=8,
                     rank_prompts=str(d / "prompts.jsonl"), rankings_path=str(d / "rankings.jsonl"),
                     rank_k=3)
    server = LiveServer(app)
    server.model, server.tokenizer, server.rankings = model, tok, d / "rankings.jsonl"
    yield server
    server.close()


def _console_errors(driver, expected=()):
    """The page's console errors (failed loads, JavaScript exceptions) since the last call, less
    those that contain one of the ``expected`` strings."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(x in e["message"] for x in expected)]


def _wait(driver, condition, timeout=20.0, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"timed out waiting for {what}")


def _set(driver, element_id, value):
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(value)


def _playground(browser, live, prompt, settings, shot=None):
    """Fill in the playground, submit, wait for the end of the stream; returns the completion
    shown, the status line and how many times the completion's text changed on the page."""
    _console_errors(browser)
    browser.get(live.url + "/playground")
    _wait(browser, lambda d: d.find_element("id", "model-name").text == "model: tiny-readable",
          what="the model name")
    _set(browser, "prompt", prompt)
    for k, v in settings.items():
        _set(browser, k, "\n".join(v) if k == "stop" else str(v))
    # count the DOM updates of the completion: a streamed answer arrives in many pieces
    browser.execute_script("""
        window.__updates = 0;
        new MutationObserver(() => { window.__updates += 1; }).observe(
            document.getElementById('completion'),
            {childList: true, characterData: true, subtree: true});""")
    browser.find_element("id", "submit").click()
    _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state")
          in ("done", "error"), what="the completion")
    if shot:
        browser.save_screenshot(str(shot))
    error = browser.find_element("id", "error")
    assert error.get_property("hidden"), error.text
    assert browser.find_element("id", "echo").get_property("textContent") == prompt
    assert _console_errors(browser) == []
    return (browser.find_element("id", "completion").get_property("textContent"),
            browser.find_element("id", "status").text,
            browser.execute_script("return window.__updates"))


def test_playground_streams_the_greedy_completion(browser, live, shots):
    prompt = "The moon is"
    settings = {"max_tokens": 40, "temperature": 0, "frequency_penalty": 1, "presence_penalty": 0.5}
    shown, status, updates = _playground(browser, live, prompt, settings, shots / "playground.png")
    assert "finish_reason: length" in status
    # the same request answered whole by the API, and by gptcore.complete in this process
    code, whole = post(live, "/v1/completions", {"model": "tiny-readable", "prompt": prompt,
                                                 **settings})
    assert code == 200, whole
    direct = complete(live.model, live.tokenizer, prompt, max_new_tokens=40, temperature=0,
                      frequency_penalty=1.0, presence_penalty=0.5)
    assert shown == whole["choices"][0]["text"] == direct
    assert len(set(shown)) > 5  # a varied answer (the penalties), not one letter repeated
    assert updates > 5  # streamed: the page's text grew piece by piece


def test_playground_sends_seed_top_p_and_stop(browser, live):
    prompt = "Once upon a time"
    free = complete(live.model, live.tokenizer, prompt, max_new_tokens=60, temperature=0.8,
                    top_p=0.9, seed=7)
    stop = [free[20:23], "\n"]  # a piece from the middle: the answer must stop right before it
    settings = {"max_tokens": 60, "temperature": 0.8, "top_p": 0.9, "seed": 7, "stop": stop}
    shown, status, _ = _playground(browser, live, prompt, settings)
    direct = complete(live.model, live.tokenizer, prompt, max_new_tokens=60, temperature=0.8,
                      top_p=0.9, seed=7, stop=stop)
    assert shown == direct == free[:free.index(stop[0])]
    assert "finish_reason: stop" in status


def test_playground_shows_api_errors(browser, live, shots):
    browser.get(live.url + "/playground")
    _set(browser, "prompt", "Hello")
    _set(browser, "max_tokens", "-5")
    browser.find_element("id", "submit").click()
    _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state") == "error",
          what="the error")
    box = browser.find_element("id", "error")
    assert box.is_displayed()
    assert "HTTP 400" in box.text and "max_tokens" in box.text, box.text
    assert browser.find_element("id", "submit").text == "Submit"  # ready for the next try
    assert _console_errors(browser, expected=["/v1/completions - Failed to load resource: the "
                                              "server responded with a status of 400"]) == []
    browser.save_screenshot(str(shots / "playground-error.png"))


def test_playground_stop_cancels_the_request(browser, live, shots):
    browser.get(live.url + "/playground")
    _set(browser, "prompt", "A long one:")
    _set(browser, "max_tokens", "1000")  # a stream of seconds: it is still running at the click
    _set(browser, "temperature", "0")  # greedy: this model never ends it early
    browser.find_element("id", "submit").click()
    _wait(browser, lambda d: len(d.find_element("id", "completion").get_property("textContent"))
          >= 3, what="the first tokens")
    assert browser.find_element("id", "submit").text == "Stop"
    browser.find_element("id", "submit").click()
    _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state")
          in ("stopped", "done", "error"), what="the stop")
    assert browser.find_element("id", "status").get_attribute("data-state") == "stopped", \
        browser.find_element("id", "status").text
    assert len(browser.find_element("id", "completion").get_property("textContent")) < 1000
    assert browser.find_element("id", "submit").text == "Submit"
    # the server noticed the closed connection and gave the request's decoder slot back
    assert live.wait_idle(10) is not None


def test_rank_page_orders_and_saves_a_ranking(browser, live, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _console_errors(browser)
    browser.get(live.url + "/rank")
    _set(browser, "max_tokens", "24")
    items = _wait(browser, lambda d: d.find_elements("css selector", "#answers li") or
                  d.find_element("id", "rank-error").is_displayed(), what="the answers")
    # the first prompt shown came with the page; resample so the answers use max_tokens 24
    browser.find_element("id", "resample").click()
    _wait(browser, lambda d: d.find_element("id", "rank-status").get_attribute("data-state")
          in ("ready", "error"), what="the resampled answers")
    assert not browser.find_element("id", "rank-error").is_displayed(), \
        browser.find_element("id", "rank-error").text
    assert browser.find_element("id", "rank-prompt").get_property("textContent") == PROMPTS[0]
    items = browser.find_elements("css selector", "#answers li")
    letters = [li.get_attribute("data-letter") for li in items]
    texts = {li.get_attribute("data-letter"):
             browser.execute_script("return arguments[0].answerText", li) for li in items}
    assert letters == ["A", "B", "C"] and len(set(texts.values())) == 3
    assert all(0 < len(t) <= 24 for t in texts.values()), texts
    # A down one place with its button (B A C), then C up one place from the keyboard (B C A)
    items[0].find_element("css selector", ".move-down").click()
    c = browser.find_element("css selector", "#answers li[data-letter='C']")
    browser.execute_script("arguments[0].focus()", c)
    ActionChains(browser).key_down(Keys.ALT).send_keys(Keys.ARROW_UP).key_up(Keys.ALT).perform()
    order = [li.get_attribute("data-letter")
             for li in browser.find_elements("css selector", "#answers li")]
    assert order == ["B", "C", "A"]
    ranks = [li.find_element("css selector", ".rankno").text.split()[0]
             for li in browser.find_elements("css selector", "#answers li")]
    assert ranks == ["1", "2", "3"]
    browser.save_screenshot(str(shots / "rank.png"))
    before = len(_lines(live.rankings)) if live.rankings.exists() else 0
    browser.find_element("id", "rank-submit").click()
    _wait(browser, lambda d: live.rankings.exists() and len(_lines(live.rankings)) > before,
          what="the ranking in the file")
    line = _lines(live.rankings)[-1]
    assert line["prompt"] == PROMPTS[0]
    assert line["ranked"] == [texts["B"], texts["C"], texts["A"]]
    ranking = read_rankings(live.rankings)[-1]  # as the reward-model training reads it
    assert (ranking.prompt, ranking.answers) == (PROMPTS[0], (texts["B"], texts["C"], texts["A"]))
    assert line["settings"] == {"model": "tiny-readable", "max_tokens": 24, "temperature": 1,
                                "top_p": 1}
    # the next prompt (the least ranked one) and fresh answers follow
    _wait(browser, lambda d: d.find_element("id", "rank-prompt").get_property("textContent")
          == PROMPTS[1] and len(d.find_elements("css selector", "#answers li")) == 3,
          what="the next prompt")
    _wait(browser, lambda d: "saved B > C > A" in d.find_element("id", "rank-status").text,
          what="the saved message")
    browser.save_screenshot(str(shots / "rank-next.png"))
    # skipping the unranked prompt brings back the other one, with new answers
    browser.find_element("id", "skip").click()
    _wait(browser, lambda d: d.find_element("id", "rank-prompt").get_property("textContent")
          == PROMPTS[0] and d.find_element("id", "rank-status").get_attribute("data-state")
          == "ready", what="the prompt after the skipped one")
    assert len(browser.find_elements("css selector", "#answers li")) == 3
    assert _console_errors(browser) == []


def test_rank_page_says_when_ranking_is_off(browser, shots):
    server = LiveServer(create_app(_readable_model(), Tokenizer.byte_level(), model_name="m"))
    try:
        _console_errors(browser)
        browser.get(server.url + "/rank")
        box = _wait(browser, lambda d: d.find_element("id", "rank-error").is_displayed()
                    and d.find_element("id", "rank-error"), what="the message")
        assert "HTTP 404" in box.text and "--rank-prompts" in box.text, box.text
        for b in ("rank-submit", "resample", "skip"):
            assert not browser.find_element("id", b).is_enabled(), b
        _wait(browser, lambda d: d.find_element("id", "model-name").text == "model: m",
              what="the model name")
        assert _console_errors(browser, expected=["/rank/next - Failed to load resource"]) == []
        browser.save_screenshot(str(shots / "rank-off.png"))
    finally:
        server.close()


def test_concurrent_submissions_each_land_whole(live):
    # 32 rankings posted from 8 threads at once through the real server: 32 whole lines
    from concurrent.futures import ThreadPoolExecutor

    before = len(_lines(live.rankings))
    big = "y" * 20_000

    def submit(i):
        return post(live, "/rank/submit", {"prompt": PROMPTS[i % 2],
                                           "ranked": [f"{i} best {big}", f"{i} worst"]})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(32)))
    assert all(code == 200 for code, _ in results), results
    lines = _lines(live.rankings)[before:]
    assert sorted(x["ranked"][1] for x in lines) == sorted(f"{i} worst" for i in range(32))
    assert all(x["ranked"][0] == x["ranked"][1].split()[0] + " best " + big for x in lines)
