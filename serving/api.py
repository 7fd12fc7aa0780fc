"""The HTTP API (FastAPI): OpenAI's /v1 routes over an EngineLoop, plus health, stats and metrics.

    GET  /health                  200 while the engine thread lives (no key needed: for probes)
    GET  /v1/models               the one served model
    POST /v1/completions          text in, text out; SSE when "stream": true
    POST /v1/chat/completions     messages through the model's chat template; SSE when streaming
    GET  /stats                   the engine's counters as JSON
    GET  /metrics                 the same counters in Prometheus' text format

With an API key set, every route but /health needs `Authorization: Bearer <key>` (401 otherwise):
one dependency of the whole app checks it, so a route added later is guarded too. Request bodies
over `max_body_bytes` get 413, every field has a bound (serving/protocol.py), and a failed engine
ends its requests with a 500 (an `error` event on a stream) and refuses new ones with 503 until
Serve replaces the replica. Errors use OpenAI's JSON error shape. `build_api` makes the app for one
replica; Serve wraps it (serving/app.py).
"""

from __future__ import annotations

import hmac
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from raylm.inference.engine import EngineFailed, EngineLoop, InvalidRequest, Output
from raylm.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    new_id,
    parse_request,
    sampling_params,
    sse,
    usage,
    usage_chunk,
)

OPEN_PATHS = frozenset({"/health"})  # the routes that need no key: probes have none


@dataclass
class ApiSettings:
    model_name: str  # the id clients pass as `model`
    api_key: str | None  # when set, required as a Bearer token
    max_body_bytes: int  # larger request bodies are refused with 413
    stream_interval_s: float = 0.0  # least time between two SSE writes of one stream (0 = every step)


def check_api_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", None, "authentication_error", "invalid_api_key")


def api_key_guard(api_key: str | None):
    """The dependency of the whole app: every route but OPEN_PATHS needs the key."""

    async def require_api_key(request: Request) -> None:
        route = request.scope.get("route")  # the matched route: its path is free of Serve's route prefix
        if getattr(route, "path", None) not in OPEN_PATHS:
            check_api_key(request, api_key)

    return require_api_key


def engine_failed(err: EngineFailed) -> ApiError:
    return ApiError(503, f"{err}; Ray Serve is replacing this replica, retry shortly", None, "server_error", "engine_failed")


def generation_failed() -> ApiError:
    message = "generation failed inside the engine; this replica takes no more requests and Ray Serve replaces it, retry shortly"
    return ApiError(500, message, None, "server_error", "engine_failed")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", None, code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", None, code="body_too_large")
    return bytes(body)


def prometheus_text(stats: dict) -> str:
    lines = []
    for name, value in stats.items():
        if isinstance(value, (int, float)):
            lines += [f"# TYPE raylm_engine_{name} gauge", f"raylm_engine_{name} {value}"]
    return "\n".join(lines) + "\n"


def build_api(loop: EngineLoop, settings: ApiSettings) -> FastAPI:
    engine = loop.engine
    app = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(api_key_guard(settings.api_key))])

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def decode_token(token: int) -> str:
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    async def parse(request: Request, cls):
        req = parse_request(cls, await read_body(request, settings.max_body_bytes))
        if req.model != settings.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {settings.model_name!r}", "model", code="model_not_found")
        return req

    def checked(prompt_ids: list[int], req, max_tokens: int):
        params = sampling_params(req, max_tokens)
        try:
            engine.check_request(prompt_ids, params, "prompt" if isinstance(req, CompletionRequest) else "messages")
        except InvalidRequest as err:
            raise ApiError(400, str(err), err.param) from None
        return params

    async def respond(req, prompt_ids: list[int], params, chat: bool):
        rid = new_id("chatcmpl" if chat else "cmpl")
        name = settings.model_name
        format_logprobs = chat_logprobs if chat else completion_logprobs
        body = chat_body if chat else completion_body
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(rid, name, prompt_ids, params, chat, include_usage), media_type="text/event-stream")
        texts, choices, last = [], [], None
        try:
            async with aclosing(loop.stream(prompt_ids, params)) as outputs:
                async for batch in outputs:
                    for out in batch:
                        texts.append(out.text)
                        choices += out.logprobs
                        last = out
        except EngineFailed as err:
            raise engine_failed(err) from None
        if last is None or last.finish_reason == "error":
            raise generation_failed()
        logprobs = format_logprobs(choices, decode_token) if params.logprobs is not None else None
        return body(rid, name, "".join(texts), last.finish_reason, logprobs, usage(last.prompt_tokens, last.completion_tokens), chunk=False)

    async def stream_events(rid: str, name: str, prompt_ids, params, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        # Everything that piled up since the last write goes out in one write: under load the
        # stream falls back to fewer, larger writes instead of a backlog of tiny ones.
        if chat:
            yield sse(chat_body(rid, name, "", None, None, None, chunk=True, first=True))
        last: Output | None = None
        try:
            async with aclosing(loop.stream(prompt_ids, params, settings.stream_interval_s)) as outputs:
                async for batch in outputs:
                    events = []
                    for out in batch:
                        last = out
                        if out.finish_reason == "error":
                            events.append(sse(generation_failed().body()))
                            continue
                        logprobs = None
                        if params.logprobs is not None and out.logprobs:
                            logprobs = (chat_logprobs if chat else completion_logprobs)(out.logprobs, decode_token)
                        if out.text or out.finish_reason or logprobs:
                            make = chat_body if chat else completion_body
                            events.append(sse(make(rid, name, out.text, out.finish_reason, logprobs, None, chunk=True)))
                    if events:
                        yield "".join(events)
        except EngineFailed as err:  # the headers (200) are out: the refusal goes as an event
            yield sse(engine_failed(err).body())
        if include_usage and last is not None:
            yield sse(usage_chunk(rid, name, chat, usage(last.prompt_tokens, last.completion_tokens)))
        yield sse("[DONE]")

    @app.get("/health")
    async def health():
        if not loop.alive():
            raise ApiError(503, "the engine thread has stopped", None, "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "raylm", "max_model_len": engine.max_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one prompt, as some clients send
        try:
            prompt_ids = engine.encode_prompt(prompt)
        except InvalidRequest as err:
            raise ApiError(400, str(err), err.param) from None
        return await respond(req, prompt_ids, checked(prompt_ids, req, req.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        try:
            prompt_ids = engine.encode_chat([m.as_template_input() for m in req.messages])
        except InvalidRequest as err:
            raise ApiError(400, str(err), err.param) from None
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, engine.max_len - len(prompt_ids))
        return await respond(req, prompt_ids, checked(prompt_ids, req, max_tokens), chat=True)

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.stats()), media_type="text/plain; version=0.0.4")

    return app
