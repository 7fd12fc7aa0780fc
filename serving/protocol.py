"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions.

Requests are pydantic models that refuse unknown fields and out-of-range values, and every field
has a bound (the MAX_* constants); `parse_request` also refuses bodies nested too deep, and turns a
validation failure into an `ApiError` whose message starts with the offending field, in OpenAI's
error shape. Beyond OpenAI's fields, vLLM's `top_k`, `stop_token_ids` and `ignore_eos`
are accepted. Responses are plain dicts built by the small functions at the bottom.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raylm.inference.sampling import SamplingParams, TokenChoice


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Bounds on what a request may ask for: past one, the request gets a 400 naming the field. The body's
# size is bounded by the app (`max_body_bytes`, 413), the prompt's tokens by the context (the engine).
MAX_STOP = 16  # stop strings: each is matched against the text after every token
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # tokens in logit_bias, as OpenAI allows
MAX_NAME_CHARS = 256  # model, user, a message's name
MAX_MESSAGES = 1024
MAX_JSON_DEPTH = 32  # nesting of the body's objects and lists (a chat request needs 4)
INT64 = (-(2**63), 2**63 - 1)  # the seed's range: OpenAI's, and what torch's generator takes
TOKEN_ID = Annotated[int, Field(ge=0, le=2**31 - 1)]  # ids past the vocabulary are refused by the engine
NAME = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
STOP_STRING = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: NAME
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] = 0  # vLLM's extension; -1 or 0 = off
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: STOP_STRING | Annotated[list[STOP_STRING], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TOKEN_ID], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    logit_bias: Annotated[dict[TOKEN_ID, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: NAME | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Literal[False] = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: NAME | None = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


Request = Union[CompletionRequest, ChatRequest]


def field_name(loc: tuple) -> str:
    """A pydantic error location -> the request field, e.g. ("messages", 0, "role") -> messages[0].role."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "int") or "[" in part or "-" in part:
            break  # pydantic names the union member it tried (or "[key]"); the field is what the user knows
        else:
            name += f".{part}" if name else str(part)
    return name


def telling_error(errors: list[dict]) -> dict:
    """The error to report: for a union (`stop` is a string or a list), the member whose type the
    value had and whose bound it broke, not the member it was never meant as."""
    return next((e for e in errors if not e["type"].endswith("_type")), errors[0])


def nested_deeper_than(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def load_json(body: bytes):
    """The body's JSON, nested at most MAX_JSON_DEPTH deep (deeper bodies would exhaust the parser's stack)."""
    too_deep = ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep; requests need far fewer", code="body_too_deep")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise too_deep from None
    if isinstance(data, (dict, list)) and nested_deeper_than(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


def parse_request(cls: type[Request], body: bytes) -> Request:
    data = load_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = telling_error(err.errors())
        param = field_name(first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"{param}: unknown field (not supported by this server)"
        elif first["type"] == "missing":
            message = f"{param}: field required"
        else:
            message = f"{param}: {first['msg']}"
        raise ApiError(400, message, param) from None


def sampling_params(req: Request, max_tokens: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if isinstance(req, CompletionRequest):
        logprobs = req.logprobs
    else:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=max(req.top_k, 0),
        top_p=req.top_p,
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        logit_bias=dict(req.logit_bias or {}),
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logprobs=logprobs,
    )


# ---- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(choices: list[TokenChoice], decode) -> dict:
    return {
        "tokens": [decode(c.token) for c in choices],
        "token_logprobs": [c.logprob for c in choices],
        "top_logprobs": [{decode(t): lp for t, lp in (c.top or [])} for c in choices],
    }


def chat_logprobs(choices: list[TokenChoice], decode) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in (c.top or [])]} for c in choices]}


def completion_body(rid: str, model: str, text: str, finish_reason: str | None, logprobs: dict | None, use: dict | None, chunk: bool) -> dict:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str | None, finish_reason: str | None, logprobs: dict | None, use: dict | None, chunk: bool, first: bool = False) -> dict:
    if chunk:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish_reason}
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None or not chunk:
        body["usage"] = use
    return body


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
