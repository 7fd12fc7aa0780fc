"""The HTTP API (FastAPI): OpenAI's /v1 routes over an engine's streams (EngineStreams), plus health, stats and metrics.

    GET  /health                  200 while the engine runs (no key needed: for probes)
    GET  /v1/models               the one served model
    POST /v1/completions          text in, text out; SSE when "stream": true
    POST /v1/chat/completions     messages through the model's chat template; SSE when streaming
    GET  /stats                   the engine's counters as JSON
    GET  /metrics                 the same counters for Prometheus (prometheus_client's exposition)

A completions request may hold several prompts (strings or token-id lists); each prompt gets `n`
choices, sampled independently, indexed prompt-major as OpenAI does. `echo` shows the prompt
before the output and, with `logprobs`, scores it (the loglikelihood requests of
lm-evaluation-harness). With an API key set, every route but /health needs `Authorization:
Bearer <key>` (401 otherwise): one dependency of the whole app checks it, so a route added later
is guarded too. Request bodies over `max_body_bytes` get 413, every field has a bound
(serving/protocol.py), and a failed engine ends its requests with a 500 (an `error` event on a
stream) and refuses new ones with 503 until Serve replaces the replica. Errors use OpenAI's JSON
error shape. `build_api` makes the app for one replica; Serve wraps it (serving/app.py).
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from raylm.inference.detokenize import TokenTexts
from raylm.inference.engine import EngineFailed, EngineStreams, InvalidRequest
from raylm.inference.sampling import SamplingParams, TokenChoice, choice_seed
from raylm.inference.sequence import ERROR, Output
from raylm.serving.protocol import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionLogprobs,
    CompletionRequest,
    chat_body,
    chat_choice,
    chat_logprobs,
    completion_body,
    completion_choice,
    new_id,
    parse_request,
    sampling_params,
    schema_components,
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
    stream_writes_per_s: float = 0.0  # SSE writes a second of all streams together at most (0 = no limit)


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


@contextmanager
def engine_answers():
    """Around a read of the engine's stats: an engine that has stopped, or does not answer, is a 503."""
    try:
        yield
    except EngineFailed as err:
        raise engine_failed(err) from None
    except TimeoutError as err:
        raise ApiError(503, f"{err}; retry shortly", None, "server_error", "engine_busy") from None


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


STATS_SCHEMA = {"type": "object", "additionalProperties": {"type": ["number", "null"]}}  # null: a percentile before any request

# The engine's counters that only grow (Prometheus counters, exposed as NAME_total); its other stats are gauges.
ENGINE_COUNTERS = frozenset({
    "requests_finished", "requests_cancelled", "requests_failed", "decode_steps", "prompt_tokens", "generated_tokens",
    "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "preemptions",
})


class EngineCollector:
    """The engine's stats, read at each scrape, as `raylm_engine_*` metrics."""

    def __init__(self, loop):
        self.loop = loop

    def collect(self):
        for name, value in self.loop.stats().items():
            if value is None:  # a percentile before the first request
                continue
            family = CounterMetricFamily if name in ENGINE_COUNTERS else GaugeMetricFamily
            yield family(f"raylm_engine_{name}", f"raylm engine: {name.replace('_', ' ')}", value=value)


@dataclass
class Prompt:
    ids: list[int]
    echo: str | None  # the text shown before the output (completions with echo), else None


class Choice:
    """One choice as it is generated: the prompt it continues and what it has handed out."""

    def __init__(self, index: int, prompt: Prompt, params: SamplingParams, logprobs: CompletionLogprobs | None, streaming: bool):
        self.index, self.prompt, self.params, self.streaming = index, prompt, params, streaming
        self.completion_logprobs = logprobs  # completions with logprobs: the legacy shape, built as tokens come
        self.token_choices: list[TokenChoice] = []  # chat with logprobs: every token's
        self.text: list[str] = []
        self.started = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def take(self, out: Output, texts: TokenTexts) -> tuple[str, dict | None]:
        """The text and logprobs that `out` adds to this choice, the echoed prompt before the first."""
        text = out.text
        if not self.started and self.prompt.echo is not None:
            text = self.prompt.echo + text
        self.started = True
        self.text.append(text)
        self.finish_reason, self.completion_tokens = out.finish_reason, out.completion_tokens
        if self.params.logprobs is None:
            return text, None
        if self.completion_logprobs is None:
            self.token_choices += out.logprobs  # a whole answer formats them once, at the end
            return text, chat_logprobs(out.logprobs, texts) if out.logprobs and self.streaming else None
        parts = []
        if out.prompt_logprobs is not None:
            parts.append(self.completion_logprobs.add_prompt(self.prompt.ids, out.prompt_logprobs))
        if out.logprobs:
            parts.append(self.completion_logprobs.add(out.logprobs))
        return text, {key: [v for part in parts for v in part[key]] for key in parts[0]} if parts else None


def json_body(component: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}}


ERRORS = {
    400: json_body("ErrorResponse", "malformed JSON, a wrong type, a missing or unknown field, or a field past its bound: `param` and the message name it"),
    404: json_body("ErrorResponse", "`model` is not the served model"),
    413: json_body("ErrorResponse", "the body is larger than the server's max_body_bytes"),
    429: {"description": "the deployment's queue is full (Ray Serve's proxy answers); retry after `Retry-After` seconds"},
    500: json_body("ErrorResponse", "the engine failed during this request's generation (`code: engine_failed`)"),
    503: json_body("ErrorResponse", "this replica's engine has failed and Ray Serve is replacing it (`code: engine_failed`); retry"),
}


def generation_route(request: str, response: str) -> dict:
    """The OpenAPI of a POST route that parses its own body (to bound its size and depth first)."""
    ok = json_body(response, "the choices; with `stream: true`, server-sent events of chunks, then `data: [DONE]`")
    # Each event's data is one JSON chunk (the response's shape, with `delta`s in chat), or `[DONE]` last.
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    ok["content"]["text/event-stream"] = {"schema": event}
    return {
        "responses": {200: ok, **ERRORS},
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}}},
    }


def build_api(loop: EngineStreams, settings: ApiSettings) -> FastAPI:
    engine = loop.frontend  # encodes and checks requests; the engine itself may run in another process
    texts = TokenTexts(engine.tokenizer)
    # FastAPI's own /openapi.json route would bypass the app's dependencies: ours, below, is guarded.
    app = FastAPI(
        title="raylm", version=version("raylm"), docs_url=None, redoc_url=None, openapi_url=None,
        dependencies=[Depends(api_key_guard(settings.api_key))],
    )
    registry = CollectorRegistry()
    registry.register(EngineCollector(loop))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def parse(request: Request, cls):
        req = parse_request(cls, await read_body(request, settings.max_body_bytes))
        if req.model != settings.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {settings.model_name!r}", "model", code="model_not_found")
        return req

    def choices_for(req, prompts: list[Prompt], max_tokens: int | None, chat: bool) -> list[Choice]:
        """`n` choices per prompt, prompt-major (OpenAI's order), each checked by the engine; with a
        seed, each choice of a prompt samples from its own seed derived from it."""
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"n: {len(prompts)} prompts x n {req.n} = {len(prompts) * req.n} choices; at most {MAX_CHOICES} per request", "n")
        choices = []
        for p, prompt in enumerate(prompts):
            params = sampling_params(req, max_tokens if max_tokens is not None else max(1, engine.max_len - len(prompt.ids)))
            try:
                engine.check_request(prompt.ids, params, "messages" if chat else "prompt")
            except InvalidRequest as err:
                raise ApiError(400, str(err), err.param) from None
            for j in range(req.n):
                choice_params = dataclasses.replace(params, seed=choice_seed(params.seed, j))
                logprobs = None if chat or params.logprobs is None else CompletionLogprobs(texts, len(prompt.echo or ""))
                choices.append(Choice(p * req.n + j, prompt, choice_params, logprobs, req.stream))
        return choices

    def total_usage(prompts: list[Prompt], choices: list[Choice]) -> dict:
        return usage(sum(len(p.ids) for p in prompts), sum(c.completion_tokens for c in choices))

    async def respond(req, prompts: list[Prompt], choices: list[Choice], chat: bool):
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(rid, prompts, choices, chat, include_usage), media_type="text/event-stream")
        try:
            async with aclosing(loop.stream([(c.prompt.ids, c.params) for c in choices])) as outputs:
                async for batch in outputs:
                    for i, out in batch:
                        choices[i].take(out, texts)
        except EngineFailed as err:
            raise engine_failed(err) from None
        if any(c.finish_reason in (None, ERROR) for c in choices):
            raise generation_failed()
        if chat:
            made = [
                chat_choice(c.index, "".join(c.text), chat_logprobs(c.token_choices, texts) if c.params.logprobs is not None else None, c.finish_reason, chunk=False)
                for c in choices
            ]
            return chat_body(rid, settings.model_name, made, total_usage(prompts, choices), chunk=False)
        made = [completion_choice(c.index, "".join(c.text), c.completion_logprobs.total if c.completion_logprobs else None, c.finish_reason) for c in choices]
        return completion_body(rid, settings.model_name, made, total_usage(prompts, choices), chunk=False)

    async def stream_events(rid: str, prompts: list[Prompt], choices: list[Choice], chat: bool, include_usage: bool) -> AsyncIterator[str]:
        # Everything that piled up since the last write goes out in one write: under load the
        # stream falls back to fewer, larger writes instead of a backlog of tiny ones.
        name = settings.model_name
        if chat:
            yield "".join(sse(chat_body(rid, name, [chat_choice(c.index, "", None, None, chunk=True, first=True)], None, chunk=True)) for c in choices)
        failed = False
        try:
            async with aclosing(loop.stream([(c.prompt.ids, c.params) for c in choices], settings.stream_interval_s, settings.stream_writes_per_s)) as outputs:
                async for batch in outputs:
                    events = []
                    for i, out in batch:
                        if out.finish_reason == ERROR:
                            if not failed:
                                events.append(sse(generation_failed().body()))
                            failed = True
                            continue
                        text, logprobs = choices[i].take(out, texts)
                        if text or out.finish_reason or logprobs:
                            if chat:
                                events.append(sse(chat_body(rid, name, [chat_choice(i, text, logprobs, out.finish_reason, chunk=True)], None, chunk=True)))
                            else:
                                events.append(sse(completion_body(rid, name, [completion_choice(i, text, logprobs, out.finish_reason)], None, chunk=True)))
                    if events:
                        yield "".join(events)
        except EngineFailed as err:  # the headers (200) are out: the refusal goes as an event
            yield sse(engine_failed(err).body())
        if include_usage and not failed:
            yield sse(usage_chunk(rid, name, chat, total_usage(prompts, choices)))
        yield sse("[DONE]")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description="raylm's OpenAI-compatible endpoint", routes=app.routes)
            schema.setdefault("components", {})["schemas"] = schema_components(settings.model_name, engine.model_config.vocab_size, engine.max_len)
            if settings.api_key:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path not in OPEN_PATHS and settings.api_key:
                        operation["security"] = [{"bearer": []}]
                        operation["responses"]["401"] = json_body("ErrorResponse", "missing or wrong API key")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json():
        return openapi()

    @app.get("/health", responses={200: json_body("Health", "the engine runs"), 503: json_body("ErrorResponse", "the engine has stopped")})
    async def health():
        if not loop.alive():
            raise ApiError(503, "the engine has stopped", None, "server_error")
        return {"status": "ok"}

    @app.get("/v1/models", responses={200: json_body("ModelList", "the served model")})
    async def models():
        card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "raylm", "max_model_len": engine.max_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", **generation_route("CompletionRequest", "CompletionResponse"))
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens: 0 generates nothing; it is allowed only with echo (to score the prompt)", "max_tokens")
        prompts = []
        for prompt in req.prompts():
            try:
                ids = engine.encode_prompt(prompt)
            except InvalidRequest as err:
                raise ApiError(400, str(err), err.param) from None
            echo = (prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids, skip_special_tokens=False)) if req.echo else None
            prompts.append(Prompt(ids, echo))
        return await respond(req, prompts, choices_for(req, prompts, req.max_tokens, chat=False), chat=False)

    @app.post("/v1/chat/completions", **generation_route("ChatRequest", "ChatCompletionResponse"))
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        try:
            prompt = Prompt(engine.encode_chat([m.as_template_input() for m in req.messages]), None)
        except InvalidRequest as err:
            raise ApiError(400, str(err), err.param) from None
        return await respond(req, [prompt], choices_for(req, [prompt], req.max_completion_tokens or req.max_tokens, chat=True), chat=True)

    @app.get("/stats", responses={200: {"description": "the engine's counters", "content": {"application/json": {"schema": STATS_SCHEMA}}},
                                  503: json_body("ErrorResponse", "the engine has stopped")})
    def stats():  # a plain def: FastAPI runs it in a thread, as the engine's answer may take a step
        with engine_answers():
            return loop.stats()

    @app.get("/metrics", response_class=Response, responses={200: {"description": "the engine's counters for Prometheus", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                                                             503: json_body("ErrorResponse", "the engine has stopped")})
    def metrics():  # a plain def, as /stats
        with engine_answers():
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
