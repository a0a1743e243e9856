"""The two pages ``gptcore serve`` shows people: ``/playground`` and ``/rank``.

Both are static HTML with a little JavaScript (``static/``: no build step, nothing loaded from
outside the server) that call the server's own ``POST /v1/completions``, as any client would.

* ``/playground``: a prompt, GPT-3's sampling controls, and the completion streamed token by
  token (``stream: true``, server-sent events read with ``fetch`` and a ``ReadableStream``).
* ``/rank``: human feedback for a reward model (InstructGPT's ranking step). The page takes a
  prompt from ``GET /rank/next``, samples K answers with one ``n=K`` completion request, lets a
  person order them (buttons or Alt+Up/Alt+Down) and posts the order to ``POST /rank/submit``,
  which appends ``{"prompt", "ranked": [best, ..., worst], "time", "settings"}`` to the rankings
  file (:class:`~gptcore.serve.rankings.RankingWriter`: fsync'd, torn tails repaired).

The prompts file (``serve --rank-prompts F``): a file ending in ``.jsonl`` holds one JSON object
per line with a ``"prompt"`` string (other keys are ignored, so SFT files can be reused); any
other file is UTF-8 text with one prompt per line (blank lines skipped; a prompt with a newline
needs the JSONL form). Prompts must be non-empty, distinct and at most ``MAX_PROMPT_CHARS`` long.

Which prompt comes next: the one with the fewest rankings so far (the rankings file's existing
lines count, so a restarted server carries on), ties broken in file order starting after the prompt
handed out last, so people ranking at the same time are shown different prompts. "Skip prompt"
asks for the next one other than the prompt shown (``GET /rank/next?skip=INDEX``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
from typing import Any, Dict, List, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .._fileio import jsonl_records, parse_json
from ..data.preference import parse_ranking
from .rankings import RankingWriter

__all__ = ["page_routes", "load_prompts", "MAX_PROMPT_CHARS", "MAX_ANSWER_CHARS", "MAX_RANK_K"]

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# the files under /pages/ (a fixed list: nothing else on disk can be asked for)
_ASSETS = {"pages.css": "text/css; charset=utf-8", "common.js": "text/javascript; charset=utf-8",
           "playground.js": "text/javascript; charset=utf-8",
           "rank.js": "text/javascript; charset=utf-8"}

MAX_PROMPT_CHARS = 100_000
MAX_PROMPTS_FILE_BYTES = 256 << 20
MAX_ANSWER_CHARS = 100_000
MAX_RANK_K = 16
MAX_SUBMIT_BYTES = 8 << 20  # a K=16 submission of maximal answers and prompt fits
# the sampling settings a submission may record beside the ranking (the page sends these)
SETTINGS_KEYS = ("model", "max_tokens", "temperature", "top_p", "frequency_penalty",
                 "presence_penalty", "seed")


def load_prompts(path) -> List[str]:
    """The prompts of a ``--rank-prompts`` file (see the module's docstring for the two forms).

    Raises FileNotFoundError, or ValueError naming ``path:line`` and what is wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"rank_prompts: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rank_prompts: no such file: {path!r}")
    if os.path.getsize(path) > MAX_PROMPTS_FILE_BYTES:
        raise ValueError(f"rank_prompts: {path!r} is over {MAX_PROMPTS_FILE_BYTES >> 20} MiB")
    if path.lower().endswith(".jsonl"):
        lines = []
        for lineno, obj in jsonl_records(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a \"prompt\" string, "
                                 f"like {{\"prompt\": \"Explain the moon landing.\"}}")
            lines.append((lineno, obj["prompt"]))
    else:
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"rank_prompts: {path!r} is not UTF-8 text ({exc}); expected one "
                             f"prompt per line, or a .jsonl file") from None
        lines = [(n, line[:-1] if line.endswith("\r") else line)
                 for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    prompts: List[str] = []
    first_line: Dict[str, int] = {}
    for lineno, prompt in lines:
        if not prompt.strip():
            raise ValueError(f"{path}:{lineno}: empty prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path}:{lineno}: prompt of {len(prompt)} characters; at most "
                             f"{MAX_PROMPT_CHARS}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to unpaired surrogates
            raise ValueError(f"{path}:{lineno}: not Unicode text (a lone surrogate)") from None
        if prompt in first_line:
            raise ValueError(f"{path}:{lineno}: the same prompt as line {first_line[prompt]}; "
                             f"each prompt once")
        first_line[prompt] = lineno
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"rank_prompts: {path!r} holds no prompts")
    return prompts


def _read_rankings(path, whole_lines_only: bool = False) -> List[str]:
    """The prompts of the rankings in the file at ``path`` (none when it does not exist), each
    line checked with the reward-model training's own reader (ValueError naming file:line).
    ``whole_lines_only``: skip a last line without its newline (the writer repairs it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return []
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip() or (whole_lines_only and not raw.endswith(b"\n")):
                continue
            where = f"{path}:{lineno}"
            try:
                prompts.append(parse_ranking(parse_json(raw, where), where).prompt)
            except ValueError as exc:
                raise ValueError(f"{exc} (not a ranking: is --rankings the right file?)") from None
    return prompts


class _RankQueue:
    """The prompts, how often each was ranked, and the writer of the rankings file."""

    def __init__(self, prompts: List[str], rankings_path, k: int) -> None:
        self.prompts = prompts
        self.k = k
        self.index = {p: i for i, p in enumerate(prompts)}
        # every whole line is checked before the writer may touch the file (a wrong --rankings
        # path must not lose a line of someone's file to the torn-tail repair)
        _read_rankings(rankings_path, whole_lines_only=True)
        self.writer = RankingWriter(rankings_path)  # repairs a torn tail
        if self.writer.repaired_bytes:
            logging.getLogger(__name__).warning(
                "rankings: removed a torn last line (%d bytes, a ranking whose write was cut "
                "short) from %s", self.writer.repaired_bytes, self.writer.path)
        self.counts = [0] * len(prompts)
        self.total = 0
        for prompt in _read_rankings(self.writer.path):
            i = self.index.get(prompt)
            if i is not None:  # rankings of prompts no longer in the file still count in total
                self.counts[i] += 1
            self.total += 1
        self.cursor = 0
        self.lock = threading.Lock()

    def next(self, skip: Optional[int] = None) -> Dict[str, Any]:
        """The prompt to rank next; ``skip``: the index of a prompt the person passed over (not
        handed out again at once, unless it is the only one)."""
        with self.lock:
            n = len(self.prompts)
            ids = [j for j in range(n) if j != skip] or [0]
            i = min(ids, key=lambda j: (self.counts[j], (j - self.cursor) % n))
            self.cursor = (i + 1) % n
            return {"prompt": self.prompts[i], "index": i, "prompts": n, "k": self.k,
                    "rankings": self.counts[i], "total": self.total}

    def record(self, record: Dict[str, Any]) -> Dict[str, Any]:
        self.writer.append(record)  # blocking (fsync): called in a worker thread
        with self.lock:
            i = self.index[record["prompt"]]
            self.counts[i] += 1
            self.total += 1
            return {"ok": True, "index": i, "rankings": self.counts[i], "total": self.total}


def _error(status: int, message: str, param: Optional[str] = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    """An error in OpenAI's JSON shape, as the completion API answers."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": None}}, status_code=status)


class _Invalid(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _check_text(value: Any, param: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{param}: expected a string, got {type(value).__name__}", param)
    if len(value) > limit:
        raise _Invalid(f"{param}: {len(value)} characters; at most {limit}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{param}: not Unicode text (a lone surrogate)", param) from None
    return value


def _check_submission(body: Any, queue: _RankQueue) -> Dict[str, Any]:
    """The record to append for a ``POST /rank/submit`` body, or _Invalid saying what is wrong."""
    if not isinstance(body, dict):
        raise _Invalid(f"expected a JSON object {{\"prompt\", \"ranked\"}}, got "
                       f"{type(body).__name__}")
    unknown = sorted(set(body) - {"prompt", "ranked", "settings"})
    if unknown:
        raise _Invalid(f"{unknown[0]}: unknown field; expected prompt, ranked and optionally "
                       f"settings", unknown[0])
    if "prompt" not in body:
        raise _Invalid("prompt: missing", "prompt")
    prompt = _check_text(body["prompt"], "prompt", MAX_PROMPT_CHARS)
    if prompt not in queue.index:
        raise _Invalid("prompt: not one of the prompts this server hands out for ranking",
                       "prompt")
    ranked = body.get("ranked")
    if not isinstance(ranked, list):
        raise _Invalid(f"ranked: expected a list of answers, best first, got "
                       f"{type(ranked).__name__ if 'ranked' in body else 'nothing'}", "ranked")
    if not 2 <= len(ranked) <= queue.k:
        raise _Invalid(f"ranked: {len(ranked)} answers; expected 2 to {queue.k}", "ranked")
    seen = set()
    for i, answer in enumerate(ranked):
        _check_text(answer, f"ranked[{i}]", MAX_ANSWER_CHARS)
        if answer in seen:
            raise _Invalid(f"ranked[{i}]: the same answer twice; a ranking orders distinct "
                           f"answers", "ranked")
        seen.add(answer)
    record: Dict[str, Any] = {"prompt": prompt, "ranked": list(ranked),
                              "time": datetime.datetime.now(datetime.timezone.utc)
                              .isoformat(timespec="seconds").replace("+00:00", "Z")}
    settings = body.get("settings")
    if settings is not None:
        if not isinstance(settings, dict):
            raise _Invalid(f"settings: expected an object, got {type(settings).__name__}",
                           "settings")
        for key, value in settings.items():
            if key not in SETTINGS_KEYS:
                raise _Invalid(f"settings.{key}: unknown; expected some of "
                               f"{', '.join(SETTINGS_KEYS)}", "settings")
            ok = value is None or (isinstance(value, str) and len(value) <= 256) or (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
            if not ok:
                raise _Invalid(f"settings.{key}: expected a number, a short string or null",
                               "settings")
            if isinstance(value, str):
                _check_text(value, f"settings.{key}", 256)
        record["settings"] = dict(settings)
    try:  # what the reward-model training will read back (gptcore.data.preference)
        parse_ranking(record, "the ranking")
    except ValueError as exc:  # pragma: no cover - the checks above are stricter
        raise _Invalid(str(exc), "ranked") from None
    return record


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Invalid(f"request body of {declared} bytes; at most {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Invalid(f"request body over {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _static(name: str) -> bytes:
    with open(os.path.join(STATIC_DIR, name), "rb") as f:
        return f.read()


def page_routes(rank_prompts: Optional[str] = None, rankings_path: Optional[str] = None,
                rank_k: int = 4) -> list:
    """Starlette routes of the pages: ``/playground``, ``/rank``, their assets under
    ``/pages/``, and the ranking API ``GET /rank/next`` and ``POST /rank/submit``.

    ``rank_prompts`` and ``rankings_path`` come together (both or neither; without them /rank
    says how to turn ranking on). ``rank_k``: answers sampled per prompt, 2 to MAX_RANK_K.
    The prompts file is read and checked here, and the rankings file opened (created if need be,
    a torn last line repaired), so a bad argument fails before the server starts."""
    if isinstance(rank_k, bool) or not isinstance(rank_k, int):
        raise TypeError(f"rank_k: expected an int, got {type(rank_k).__name__}")
    if not 2 <= rank_k <= MAX_RANK_K:
        raise ValueError(f"rank_k: expected 2 to {MAX_RANK_K} answers per prompt, got {rank_k}")
    if (rank_prompts is None) != (rankings_path is None):
        raise ValueError("rank_prompts and rankings_path: give both (--rank-prompts F "
                         "--rankings OUT.jsonl) to turn on /rank, or neither")
    queue = None
    if rank_prompts is not None:
        queue = _RankQueue(load_prompts(rank_prompts), rankings_path, rank_k)

    pages = {"playground": _static("playground.html"), "rank": _static("rank.html")}
    assets = {name: _static(name) for name in _ASSETS}
    no_cache = {"Cache-Control": "no-cache"}

    async def playground(request: Request) -> Response:
        return HTMLResponse(pages["playground"], headers=no_cache)

    async def rank(request: Request) -> Response:
        return HTMLResponse(pages["rank"], headers=no_cache)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return _error(404, f"no such page asset: {name!r}", type_="not_found_error")
        return Response(assets[name], media_type=_ASSETS[name], headers=no_cache)

    def disabled() -> JSONResponse:
        return _error(404, "ranking is off: start the server with `gptcore serve --rank-prompts "
                           "PROMPTS --rankings OUT.jsonl` to rank answers", type_="not_found_error")

    async def rank_next(request: Request) -> Response:
        if queue is None:
            return disabled()
        skip = request.query_params.get("skip")
        if skip is not None:
            if not (skip.isdigit() and int(skip) < len(queue.prompts)):
                return _error(400, f"skip: expected a prompt index, 0 to "
                                   f"{len(queue.prompts) - 1}, got {skip[:20]!r}", "skip")
            skip = int(skip)
        return JSONResponse(queue.next(skip), headers=no_cache)

    async def rank_submit(request: Request) -> Response:
        if queue is None:
            return disabled()
        try:
            body = parse_json(await _read_body(request, MAX_SUBMIT_BYTES), "request body",
                              _Invalid)
            record = _check_submission(body, queue)
        except _Invalid as exc:
            return _error(exc.status, str(exc), exc.param)
        try:
            result = await run_in_threadpool(queue.record, record)
        except OSError as exc:  # disk full, file removed from under us: the ranking is not saved
            return _error(500, f"the ranking was not saved: {exc}", type_="server_error")
        return JSONResponse(result)

    return [
        Route("/playground", playground, methods=["GET"]),
        Route("/rank", rank, methods=["GET"]),
        Route("/rank/next", rank_next, methods=["GET"]),
        Route("/rank/submit", rank_submit, methods=["POST"]),
        Route("/pages/{name}", asset, methods=["GET"]),
    ]
