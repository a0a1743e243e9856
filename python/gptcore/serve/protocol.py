"""OpenAI's completion API: the request schema and its checks, the error JSON, and the response
objects (whole and streamed).

A request body is checked completely before anything runs; the first problem becomes an
:class:`APIError` with OpenAI's status code and error object, naming the parameter::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": null}}
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .._fileio import parse_json

__all__ = ["APIError", "CompletionParams", "parse_completion_request", "error_body",
           "completion_object", "logprobs_object"]

# OpenAI's documented limits for the legacy completions endpoint
MAX_STOP = 4
MAX_LOGPROBS = 5
MAX_LOGIT_BIAS = 100.0
PENALTY_RANGE = (-2.0, 2.0)
TEMPERATURE_RANGE = (0.0, 2.0)


class APIError(Exception):
    """An error answered as OpenAI's error JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclass
class CompletionParams:
    """A checked /v1/completions request. ``prompts`` holds one entry per prompt: a str, or a
    list of token ids (a token prompt)."""

    model: str
    prompts: List[Union[str, List[int]]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    n: int = 1
    stop: Optional[List[str]] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None
    logprobs: Optional[int] = None
    echo: bool = False
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def engine_kwargs(self) -> dict:
        """The sampling controls as :meth:`gptcore.generate.continuous.Engine.submit` takes them."""
        return dict(n=self.n, max_tokens=self.max_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, frequency_penalty=self.frequency_penalty,
                    presence_penalty=self.presence_penalty, logit_bias=self.logit_bias,
                    stop=self.stop, seed=self.seed, logprobs=self.logprobs,
                    prompt_logprobs=self.echo and self.logprobs is not None)


# ---- field checks --------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: dict, name: str, default, lo: int, hi: Optional[int] = None, nullable: bool = True):
    v = body.get(name, default)
    if v is None and nullable:
        return default
    if not _is_int(v):
        raise _bad(name, f"expected an integer, got {_json_type(v)}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(name, f"expected an integer {rng}, got {v}")
    return v


def _num(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if not _is_num(v) or not math.isfinite(v):
        raise _bad(name, f"expected a number, got {_json_type(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"expected a number in [{lo:g}, {hi:g}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"expected a boolean, got {_json_type(v)}")
    return v


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _prompts(v, vocab_size: int) -> List[Union[str, List[int]]]:
    """OpenAI's prompt forms: a string, an array of strings, an array of token ids, or an array
    of token-id arrays. A missing prompt is the empty string (start of a document)."""
    if v is None:
        return [""]
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise _bad("prompt", "expected a string, an array of strings, an array of token ids or "
                             "an array of token-id arrays (non-empty)")
    if all(_is_int(t) for t in v):
        return [_token_prompt(v, vocab_size, "prompt")]
    out: List[Union[str, List[int]]] = []
    for i, p in enumerate(v):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            out.append(_token_prompt(p, vocab_size, f"prompt[{i}]"))
        else:
            raise _bad("prompt", f"prompt[{i}]: expected a string or a non-empty array of token "
                                 f"ids, got {_json_type(p)}")
    return out


def _token_prompt(ids: List[int], vocab_size: int, where: str) -> List[int]:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise _bad("prompt", f"{where}: token id {t} is outside the vocabulary [0, {vocab_size})")
    return list(ids)


def _stop(v) -> Optional[List[str]]:
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", f"expected a string or an array of up to {MAX_STOP} strings, got {_json_type(v)}")
    if len(items) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop sequences, got {len(items)}")
    if any(s == "" for s in items):
        raise _bad("stop", "a stop sequence must not be empty")
    return items or None


def _logit_bias(v, vocab_size: int) -> Optional[Dict[int, float]]:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad("logit_bias", f"expected an object mapping token ids to biases, got {_json_type(v)}")
    out = {}
    for k, b in v.items():
        if not (k.isascii() and k.isdigit()) or not 0 <= int(k) < vocab_size:
            raise _bad("logit_bias", f"key {k!r} is not a token id in [0, {vocab_size})")
        if not _is_num(b) or not math.isfinite(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise _bad("logit_bias", f"the bias of token {k} must be a number in "
                                     f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {b!r}")
        out[int(k)] = float(b)
    return out or None


_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop",
          "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "echo", "seed",
          "stream", "stream_options", "best_of", "suffix", "user"}


def parse_completion_request(data: bytes, *, model_name: str, vocab_size: int, max_len: int,
                             max_batch: int, max_request_tokens: int) -> CompletionParams:
    """Check a /v1/completions body (raw bytes) and return its parameters, or raise APIError.

    Checks that need the prompt's token count (prompt + max_tokens within ``max_len``) are left
    to the caller, after tokenizing."""
    try:
        body = parse_json(data, "request body")
    except ValueError as e:
        raise APIError(400, f"{e}. The body must be a JSON object in UTF-8.") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: the model's name as a string (see GET /v1/models)")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist (this server serves "
                            f"`{model_name}`)", param="model", code="model_not_found")
    p = CompletionParams(model=model, prompts=_prompts(body.get("prompt"), vocab_size))
    p.max_tokens = _int(body, "max_tokens", 16, 0)
    p.temperature = _num(body, "temperature", 1.0, *TEMPERATURE_RANGE)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
    # top_p = 0 (allowed by OpenAI) keeps only the most likely token: the smallest nucleus
    p.top_p = None if top_p >= 1 else max(top_p, 1e-12)
    p.top_k = _int(body, "top_k", None, 1)  # an extension (not in OpenAI's API)
    p.n = _int(body, "n", 1, 1, max_batch)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != p.n:
        raise _bad("best_of", "not supported (only best_of = n, or leave it out)")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "not supported by this server")
    if "user" in body and not isinstance(body["user"], (str, type(None))):
        raise _bad("user", f"expected a string, got {_json_type(body['user'])}")
    p.stop = _stop(body.get("stop"))
    p.frequency_penalty = _num(body, "frequency_penalty", 0.0, *PENALTY_RANGE)
    p.presence_penalty = _num(body, "presence_penalty", 0.0, *PENALTY_RANGE)
    p.logit_bias = _logit_bias(body.get("logit_bias"), vocab_size)
    p.logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    p.echo = _bool(body, "echo", False)
    p.seed = _int(body, "seed", None, 0, 2 ** 63 - 1)
    p.stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None:
        if not p.stream:
            raise _bad("stream_options", "only allowed with stream: true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise _bad("stream_options", "expected an object {\"include_usage\": boolean}")
        p.include_usage = _bool(opts, "include_usage", False)
    total = len(p.prompts) * p.n * p.max_tokens
    if total > max_request_tokens:
        raise _bad("n", f"prompts x n x max_tokens = {len(p.prompts)} x {p.n} x {p.max_tokens} = "
                        f"{total} tokens is over this server's limit of {max_request_tokens} per request")
    if p.max_tokens > max_len:
        raise _bad("max_tokens", f"{p.max_tokens} is more than the model's context of {max_len} tokens")
    return p


def context_error(prompt_tokens: int, max_tokens: int, max_len: int, where: str = "prompt") -> APIError:
    """OpenAI's answer to a prompt that leaves no room for max_tokens."""
    return APIError(400, f"This model's maximum context length is {max_len} tokens, however you "
                         f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in your "
                         f"{where}; {max_tokens} for the completion). Please reduce your prompt; or "
                         f"completion length.", param="prompt", code="context_length_exceeded")


# ---- responses ---------------------------------------------------------------------------------


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def completion_object(cid: str, created: int, model: str, choices: List[dict],
                      usage: Optional[dict] = None) -> dict:
    """A ``text_completion`` object (a whole response, or one streamed chunk)."""
    out = {"id": cid, "object": "text_completion", "created": created, "model": model,
           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_object(entries, decode, offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` of a choice (or chunk) from TokenLogprob entries (None for a first
    prompt token, which has no logprob): the token strings, their logprobs, the top
    alternatives ({token string: logprob}) and each token's character offset in the text,
    counting from ``offset``."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for e, tok_id in entries:
        s = decode([tok_id])
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if e is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(float(e.logprob))
            tops.append({decode([t]): float(v) for t, v in e.top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def now() -> int:
    return int(time.time())
