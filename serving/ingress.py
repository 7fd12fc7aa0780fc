"""The ingress deployment: HTTP in front of the engine replicas, joined to them by a handle.

    raylm serve --model MODEL_DIR --ingress            # or `ingress: true` in the serve config's args
    serve run raylm.serving.app:build_app model=MODEL_DIR ingress=true

When an engine replica dies with requests in flight (its process killed, its node lost), Ray
Serve's proxy answers those requests with a plain-text 500, because the code that would have
answered died with the replica. With `ingress` set, the HTTP side runs in a deployment of its
own, `Ingress`, which hands each request, as it came (method, path, headers, body), to an engine
replica (the LLMServer deployment, as `EngineServer`, which also answers through the handle) and
sends back what the replica's own app (serving/api.py: auth, bounds, the engine) answered. So a
replica that dies is seen by code that lives on:

- a non-streaming request is retried once, on a live replica where Serve has one (it is not yet
  answered: nothing was generated for it that a client saw); if that fails too, the client gets a
  JSON 503 in OpenAI's error shape (`code: replica_failed`);
- a stream whose replica dies before its first byte is retried the same way; one that had started
  gets an `error` event (the same JSON) and `data: [DONE]`.

The cost is one more hop per request (and per stream write) between two Ray actors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from raylm.serving.app import (
    DEFAULT_CONFIG,
    AppArgs,
    LLMServer,
    deployment_options,
    read_serve_config,
)
from raylm.serving.protocol import ApiError, sse

log = logging.getLogger(__name__)
REPLICA_GONE = (RayActorError, ActorUnavailableError)  # how a handle call reports a dead replica
RETRIED_HEADER = "x-raylm-retried"  # set on an answer that came from the second try


def replica_failed() -> ApiError:
    message = "the engine replica serving this request failed; Ray Serve is replacing it, retry shortly"
    return ApiError(503, message, None, "server_error", "replica_failed")


async def run_asgi(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> AsyncIterator[dict]:
    """Run one HTTP request through an ASGI app in this process; yield the messages it sends
    (`http.response.start`, then `http.response.body` chunks) as it sends them."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    received = False

    async def receive() -> dict:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects: this call's caller cancels the task instead
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
    finally:
        task.cancel()


class EngineServer(LLMServer.func_or_class):
    """An LLMServer replica that also answers requests handed over by the ingress, with its own app."""

    async def __init__(self, args: AppArgs):  # the ingress-decorated parent's __init__ is a coroutine
        await super().__init__(args)
        self.api = self.__serve_build_asgi_app__()  # this replica gets no HTTP of its own: the ingress brings it

    async def answer(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, list, bytes]:
        status, response_headers, chunks = 500, [], []
        async for message in run_asgi(self.api, method, path, query, headers, body):
            if message["type"] == "http.response.start":
                status, response_headers = message["status"], message.get("headers", [])
            else:
                chunks.append(message.get("body", b""))
        return status, response_headers, b"".join(chunks)

    async def answer_stream(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> AsyncIterator:
        """Yield (status, headers) first, then the body's chunks as the app writes them."""
        async for message in run_asgi(self.api, method, path, query, headers, body):
            if message["type"] == "http.response.start":
                yield message["status"], message.get("headers", [])
            elif message.get("body"):
                yield message["body"]


def app_path(scope: dict) -> str:
    """The request's path below the application's route prefix, as the engine's app routes it."""
    path, prefix = scope["path"], scope.get("root_path", "")
    return path[len(prefix) :] or "/" if prefix and path.startswith(prefix) else path


def wants_stream(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False  # the replica refuses it, and says why
    return isinstance(data, dict) and data.get("stream") is True


def plain_headers(headers: list) -> dict[str, str]:
    skip = {b"content-length", b"transfer-encoding"}  # the response the ingress sends sets its own
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() not in skip}


# Light: it relays bytes (and reads only `stream`); more replicas join when one holds 64 requests.
# (Autoscaled also keeps Ray Serve 2.60 from warning, at every stop, that it cannot deregister a
# fixed-size deployment's autoscaling state.)
@serve.deployment(
    ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
)
class Ingress:
    """A plain HTTP deployment (Serve allows one ASGI app per application: the engine's)."""

    def __init__(self, engine, max_body_bytes: int, retry_after_s: float):
        self.engine = engine  # the engine deployment's handle (LLMServer, as EngineServer)
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s  # the engine deployment's backpressure_config's, as Serve's proxy says it

    async def __call__(self, request: Request) -> Response:
        from raylm.serving.api import read_body

        try:
            body = await read_body(request, self.max_body_bytes)
            call = (request.method, app_path(request.scope), request.url.query.encode(), request.headers.raw, body)
            if wants_stream(body):
                return await self.stream(call)
            return await self.answer(call)
        except BackPressureError:  # the engine deployment's queue is full, as Serve's proxy would answer
            retry_after = {"Retry-After": f"{self.retry_after_s:g}"}
            err = ApiError(429, "the server is busy: too many requests are queued; retry shortly", None, "server_error", "overloaded", retry_after)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def answer(self, call: tuple) -> Response:
        for attempt in range(2):
            try:
                status, headers, content = await self.engine.answer.remote(*call)
            except REPLICA_GONE as err:
                log.warning("an engine replica failed under request %s %s (try %d): %s", call[0], call[1], attempt + 1, err)
                continue
            response = Response(content, status_code=status, headers=plain_headers(headers))
            if attempt:
                response.headers[RETRIED_HEADER] = "1"
            return response
        raise replica_failed()

    async def stream(self, call: tuple) -> Response:
        for attempt in range(2):
            chunks = self.engine.options(stream=True).answer_stream.remote(*call)
            try:
                status, headers = await chunks.__anext__()
            except REPLICA_GONE as err:  # nothing was sent yet: as safe to retry as a plain request
                log.warning("an engine replica failed before a stream began (try %d): %s", attempt + 1, err)
                continue
            response_headers = plain_headers(headers) | ({RETRIED_HEADER: "1"} if attempt else {})
            return StreamingResponse(self.relay(chunks), status_code=status, headers=response_headers)
        raise replica_failed()

    @staticmethod
    async def relay(chunks) -> AsyncIterator[bytes]:
        ended = False
        try:
            async for chunk in chunks:
                yield chunk
            ended = True
        except REPLICA_GONE as err:  # the 200 and some events are out: the failure goes as an event
            ended = True
            log.warning("an engine replica failed during a stream: %s", err)
            yield (sse(replica_failed().body()) + sse("[DONE]")).encode()
        finally:
            if not ended:  # the client went away: the replica stops generating for it
                chunks.cancel()


def bind_ingress(app_args: AppArgs, engine_options: dict | None) -> serve.Application:
    """Ingress in front of the engine deployment, with `engine_options` (a serve config's, for
    LLMServer) over serve.yaml's. The engine deployment keeps the name LLMServer, so a config
    file's options for it apply with or without the ingress."""
    options = {**deployment_options(read_serve_config(DEFAULT_CONFIG)), **(engine_options or {})}
    retry_after_s = (options.get("backpressure_config") or {}).get("retry_after_s", 1)
    engine = LLMServer.options(func_or_class=EngineServer, **(engine_options or {}))
    return Ingress.bind(engine.bind(app_args), app_args.max_body_bytes, retry_after_s)
