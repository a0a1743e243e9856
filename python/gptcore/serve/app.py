"""The Starlette app: OpenAI's completion API over the continuous-batching engine.

Routes: ``POST /v1/completions`` (whole responses, or server-sent events with ``stream``),
``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``, and the playground and ranking
pages of :mod:`gptcore.serve.pages` when that module is present.

The engine (:class:`gptcore.generate.continuous.Engine`) runs on its own thread and is started
and stopped by the app's lifespan. Every request is checked whole before it reaches the engine;
a request that fails answers OpenAI's error JSON and changes nothing for the others. A request
whose client disconnects is cancelled, which frees its decoder slots at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
from typing import List, Optional, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generate.continuous import Done, Engine, EngineStopped, QueueFull
from ..generate.decode import _encode_prompt
from .protocol import (
    APIError,
    CompletionParams,
    completion_object,
    context_error,
    error_body,
    logprobs_object,
    new_id,
    now,
    parse_completion_request,
    usage_object,
)

__all__ = ["create_app"]

DEFAULT_MAX_BODY = 1 << 20  # bytes
_DRAIN_CAP = 64 << 20  # an oversized body is read (and dropped) up to this much, so the client
# gets its 413 instead of a reset connection


def create_app(model, tokenizer, *, model_name: str, max_batch: int = 16, max_queue: int = 64,
               rank_prompts: Optional[str] = None, rankings_path: Optional[str] = None,
               rank_k: int = 4, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_request_tokens: Optional[int] = None, shutdown_timeout: float = 30.0) -> Starlette:
    """The completion server for ``model`` (a gptcore.GPT) and ``tokenizer``, answering to
    ``model_name``.

    max_batch: decoder rows shared by running requests (a request with ``n`` choices takes n);
    max_queue: requests that may wait for rows (beyond: 429). max_body_bytes: the largest
    request body (beyond: 413). max_request_tokens: the most tokens one request may ask for,
    prompts x n x max_tokens (default max_batch x the model's context; beyond: 400).
    shutdown_timeout: seconds running requests get to finish at shutdown before they are
    cancelled. rank_prompts, rankings_path, rank_k configure the ranking page.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name: expected a non-empty str, got {model_name!r}")
    for name, v in (("max_body_bytes", max_body_bytes), ("max_request_tokens", max_request_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    api = _API(engine, tokenizer, model_name, max_body_bytes,
               max_request_tokens or max_batch * engine.max_len)

    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    routes += _page_routes(rank_prompts, rankings_path, rank_k)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:  # the HTTP server has stopped taking requests and waited for running ones
            await run_in_threadpool(engine.stop, True, shutdown_timeout)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPException: _http_error, APIError: _api_error, Exception: _internal_error})
    app.state.engine = engine
    app.state.model_name = model_name
    return app


def _page_routes(rank_prompts, rankings_path, rank_k) -> list:
    """The playground and ranking pages (gptcore.serve.pages), when that module exists."""
    if importlib.util.find_spec(f"{__package__}.pages") is None:
        if rank_prompts is not None or rankings_path is not None:
            raise ValueError("rank_prompts: the ranking page (gptcore.serve.pages) is not available "
                             "in this installation")
        return []
    from . import pages

    return list(pages.page_routes(rank_prompts, rankings_path, rank_k))


# ---- errors ----------------------------------------------------------------------------------


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        msg = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        msg = f"Method {request.method} is not allowed for {request.url.path}"
    else:
        msg = str(exc.detail)
    return JSONResponse(error_body(msg), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}",
                                   type="server_error"), status_code=500)


def _overloaded(e: Exception) -> APIError:
    if isinstance(e, QueueFull):
        return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
    return APIError(503, str(e), type="server_error", code="unavailable")


# ---- the API -----------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it is larger than ``limit`` bytes. A body too large is
    still read (and dropped) up to _DRAIN_CAP, so the client gets the 413 rather than a reset
    connection while it is still sending."""
    too_big = APIError(413, f"request body: larger than this server's limit of {limit} bytes",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _DRAIN_CAP:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_CAP:
            break
    if size > limit:
        raise too_big
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (for requests whose body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _API:
    def __init__(self, engine: Engine, tokenizer, model_name: str, max_body: int,
                 max_request_tokens: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_body, self.max_request_tokens = max_body, max_request_tokens
        self.created = now()

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids])

    # ---- GET ----

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "gptcore"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        stats = self.engine.stats()
        up = self.engine.running
        return JSONResponse({"status": "ok" if up else "stopping", "model": self.model_name, **stats},
                            status_code=200 if up else 503)

    # ---- POST /v1/completions ----

    def _tokenize(self, prompts: List[Union[str, List[int]]]) -> List[List[int]]:
        out = []
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                where = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
                try:  # as OpenAI's endpoint: the text <|endoftext|> is the special token
                    out.append(_encode_prompt(self.tokenizer, p, where, "all"))
                except ValueError as e:
                    raise APIError(400, str(e), param="prompt") from None
            else:
                out.append(p)
        return out

    async def completions(self, request: Request) -> Response:
        engine = self.engine
        body = await _read_body(request, self.max_body)
        p = parse_completion_request(body, model_name=self.model_name, vocab_size=engine.V,
                                     max_len=engine.max_len, max_batch=engine.max_batch,
                                     max_request_tokens=self.max_request_tokens)
        prompt_ids = await run_in_threadpool(self._tokenize, p.prompts)
        for k, ids in enumerate(prompt_ids):
            if len(ids) + p.max_tokens > engine.max_len:
                raise context_error(len(ids), p.max_tokens, engine.max_len,
                                    "prompt" if len(prompt_ids) == 1 else f"prompt[{k}]")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(k, ev):  # on the engine thread: hand the event to this request's loop
            if p.stream or isinstance(ev, Done):  # a whole response only waits for the end
                loop.call_soon_threadsafe(events.put_nowait, (k, ev))

        reqs = []
        try:
            for k, ids in enumerate(prompt_ids):
                reqs.append(engine.submit(ids, on_event=functools.partial(post, k),
                                          **p.engine_kwargs()))
        except (QueueFull, EngineStopped) as e:
            for r in reqs:
                r.cancel()
            raise _overloaded(e) from None
        except (ValueError, TypeError) as e:  # the engine's own checks (after ours, rare)
            for r in reqs:
                r.cancel()
            raise APIError(400, str(e)) from None

        cid, created = new_id(), now()
        if p.stream:
            return StreamingResponse(self._stream(p, reqs, events, cid, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, p, reqs, events, cid, created)

    async def _whole(self, request, p: CompletionParams, reqs, events, cid, created) -> Response:
        async def all_done():
            left = len(reqs)
            while left:
                _, ev = await events.get()
                left -= isinstance(ev, Done)

        finished = asyncio.ensure_future(all_done())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (finished, gone):
                t.cancel()
            for r in reqs:  # the client left (or the server is stopping): free the slots
                if not r.done:
                    r.cancel()
        if not all(r.done for r in reqs):
            return Response(status_code=499)  # nobody is listening
        failed = [r.error for r in reqs if r.error]
        if failed:
            raise APIError(503 if "shutting down" in failed[0] else 500, failed[0],
                           type="server_error")
        choices, completion_tokens = [], 0
        for k, req in enumerate(reqs):
            echo_text = self.decode(req.prompt) if p.echo else ""
            completion_tokens += req.completion_tokens
            for i, c in enumerate(req.choices):
                lp = None
                if p.logprobs is not None:
                    entries = [(e, e.token) for e in c.logprobs]
                    if p.echo:
                        entries = list(zip(req.prompt_logprobs, req.prompt.tolist())) + entries
                    lp = logprobs_object(entries, self.decode)
                choices.append({"text": echo_text + c.text, "index": k * p.n + i, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        prompt_tokens = sum(r.prompt_tokens for r in reqs)
        return JSONResponse(completion_object(cid, created, self.model_name, choices,
                                              usage_object(prompt_tokens, completion_tokens)))

    async def _stream(self, p: CompletionParams, reqs, events, cid, created):
        """Server-sent events: one chunk per new piece of a choice's text, as soon as the engine
        decides it; ``data: [DONE]`` at the end (OpenAI's stream format)."""
        offsets = {}  # choice index -> characters sent so far (logprobs' text_offset)
        left = len(reqs)
        try:
            while left:
                k, ev = await events.get()
                if isinstance(ev, Done):
                    left -= 1
                    if ev.error:
                        status = "shutting down" in ev.error
                        yield _sse(error_body(ev.error, type="server_error",
                                              code="unavailable" if status else None))
                        return
                    continue
                req, index = reqs[k], k * p.n + ev.index
                text, entries = ev.text, [(e, e.token) for e in ev.logprobs or []]
                if index not in offsets:  # the choice's first chunk carries the echoed prompt
                    offsets[index] = 0
                    if p.echo:
                        text = self.decode(req.prompt) + text
                        if p.logprobs is not None:
                            entries = list(zip(req.prompt_logprobs, req.prompt.tolist())) + entries
                if not text and ev.finish_reason is None and (p.logprobs is None or not entries):
                    continue  # nothing new to say (e.g. text held back)
                lp = None
                if p.logprobs is not None:
                    lp = logprobs_object(entries, self.decode, offsets[index])
                offsets[index] += len(text)
                choice = {"text": text, "index": index, "logprobs": lp,
                          "finish_reason": ev.finish_reason}
                yield _sse(completion_object(cid, created, self.model_name, [choice]))
            if p.include_usage:
                usage = usage_object(sum(r.prompt_tokens for r in reqs),
                                     sum(r.completion_tokens for r in reqs))
                yield _sse(completion_object(cid, created, self.model_name, [], usage))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the response task is cancelled)
            for r in reqs:
                if not r.done:
                    r.cancel()
