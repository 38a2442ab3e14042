"""The FastAPI app: one OpenAI-compatible endpoint in front of the router.

``create_app(settings, node)`` builds it; all state lives on the objects passed in, none at
module level. Handlers never branch on which engine serves: the router decides and the
``x-node-agent-backend`` header names it. The health endpoints (/health/*, /v1/node, /metrics)
never touch admission or an engine, and take their own token (``health.token``). Size and
authentication are decided by the ``Gate`` before any body is read. A non-streamed request
whose client leaves is aborted in the engine (as vLLM's server does); a stream always ends with
``[DONE]``, after an error event when it could not be finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import __version__
from agent.serving.errors import ApiError, InvalidRequest, ModelNotFound
from agent.serving.gate import Gate
from agent.serving.metrics import CONTENT_TYPE, ENDPOINTS
from agent.serving.node import Node
from agent.serving.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    usage,
)
from agent.serving.router import Router, Served
from agent.settings import Settings

log = logging.getLogger(__name__)
request_log = logging.getLogger("agent.requests")
BACKEND_HEADER = "x-node-agent-backend"


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", param=None)
    return InvalidRequest(f"{param or 'body'}: {msg}", param=param)


def create_app(settings: Settings, node: Node) -> FastAPI:
    """The ASGI app; the caller owns the router's and the monitor's lifecycles."""
    router, model_name = node.router, node.model_name
    app = FastAPI(title="node-agent", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if settings.server.openapi else None)
    app.state.node = node
    app.state.settings = settings
    app.add_middleware(Gate, api_key=_secret(settings.server.api_key), health_token=_secret(settings.health.token),
                       max_body_bytes=settings.server.max_request_bytes)
    app.add_middleware(RequestMetrics, telemetry=node.telemetry)  # outermost: refusals are counted too
    log_prompts = settings.server.log_prompts
    default_max = settings.admission.default_max_tokens

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (unknown path, wrong method, undecodable body) in the same envelope.
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: the envelope still, and the traceback in the log (Starlette
        # logs it after this answer is sent).
        body = {"error": {"message": f"internal error ({type(exc).__name__}); the agent's log has the details",
                          "type": "server_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    v1 = APIRouter(prefix="/v1")
    health = APIRouter()

    def log_request(endpoint: str, gen) -> None:
        """server.log_prompts: the text, as one JSON line at INFO; off: sizes only, at DEBUG."""
        if log_prompts:
            request_log.info(json.dumps({"event": "request", "request_id": gen.request_id, "endpoint": endpoint,
                                         "max_tokens": gen.max_tokens, "prompt": gen.prompt,
                                         "messages": gen.messages}))
        elif request_log.isEnabledFor(logging.DEBUG):
            chars = len(gen.prompt or "") + sum(len(m["content"]) for m in gen.messages or ())
            request_log.debug("request %s %s: %d prompt characters, max_tokens %d", gen.request_id, endpoint,
                              chars, gen.max_tokens)

    def log_answer(request_id: str, backend: str, text: str, last) -> None:
        if log_prompts:
            request_log.info(json.dumps({"event": "answer", "request_id": request_id, "backend": backend,
                                         "text": text, "finish_reason": last.finish_reason if last else None,
                                         "completion_tokens": last.completion_tokens if last else 0}))

    async def logged(request_id: str, events: AsyncIterator[Served]) -> AsyncIterator[Served]:
        """The stream, passed through; its text is logged when it ends (server.log_prompts)."""
        parts, backend, last = [], "", None
        try:
            async for served in events:
                # No reset on a new backend: a stream continues after a failover, so the client's
                # answer is everything yielded, from both engines.
                backend = served.backend
                parts.append(served.delta.text)
                last = served.delta
                yield served
        finally:
            await events.aclose()  # the router releases the request's KV and aborts the engine
            log_answer(request_id, backend, "".join(parts), last)

    async def answer(raw: Request, endpoint: str, gen, stream: bool, whole, frame):
        """Both endpoints: one JSON answer built by ``whole(text, last)``, or an SSE stream of
        ``frame`` chunks; the backend is named in the header either way."""
        log_request(endpoint, gen)
        if not stream:
            result = await _unless_disconnected(raw, router.complete(gen))
            if result is None:
                log.info("request %s: the client left; aborted", gen.request_id)
                return Response(status_code=499)
            backend, text, last = result
            log_answer(gen.request_id, backend, text, last)
            return JSONResponse(whole(text, last), headers={BACKEND_HEADER: backend})
        events = router.stream(gen)
        return await _sse(logged(gen.request_id, events) if log_prompts else events, frame)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ModelNotFound(f"model {name!r} is not served here; this node serves {model_name!r}", param="model")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "node-agent"}]}

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        rid = new_id("chatcmpl")
        gen = body.to_generation(rid, default_max)
        created = int(time.time())

        def frame(served: Served | None, first: bool) -> list[dict]:
            if served is None:
                return []
            d = served.delta
            out = []
            if first:
                out.append(chat_chunk(rid, model_name, created, {"role": "assistant", "content": ""}, None))
            if d.text or d.finish_reason:
                out.append(chat_chunk(rid, model_name, created, {"content": d.text} if d.text else {},
                                      d.finish_reason))
            if d.finish_reason and body.include_usage():
                out.append(chat_chunk(rid, model_name, created, {}, None, usage(d)))
            return out
        return await answer(raw, "/v1/chat/completions", gen, body.stream,
                            lambda text, last: chat_response(rid, model_name, text, last), frame)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        rid = new_id("cmpl")
        gen = body.to_generation(rid)
        created = int(time.time())

        def frame(served: Served | None, first: bool) -> list[dict]:
            if served is None:
                return []
            d = served.delta
            out = [completion_chunk(rid, model_name, created, d.text, d.finish_reason)]
            if d.finish_reason and body.include_usage():
                out.append(completion_chunk(rid, model_name, created, "", None, usage(d)))
            return out
        return await answer(raw, "/v1/completions", gen, body.stream,
                            lambda text, last: completion_response(rid, model_name, text, last), frame)

    @health.get("/health/live")
    async def live() -> dict:
        # Answering at all is the point: the process and its event loop are alive.
        return {"status": "ok"}

    @health.get("/health/ready")
    async def ready() -> JSONResponse:
        r = node.monitor.compute_readiness()
        if r.serving:
            body = {"status": r.status, "backend": r.backend}
            if r.reason:
                body["reason"] = r.reason
            if r.cluster:
                body["cluster"] = r.cluster
            return JSONResponse(body)
        body = {"status": r.status, "reason": r.reason}
        if r.progress:
            body["progress"] = r.progress
        if r.cluster:
            body["cluster"] = r.cluster
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5" if r.status == "loading" else "30"})

    @health.get("/v1/node")
    async def node_report() -> JSONResponse:
        # A JSONResponse straight away: FastAPI's jsonable_encoder walk of a returned dict
        # doubled this endpoint's cost.
        return JSONResponse(node.document())

    @health.get("/metrics")
    async def metrics() -> Response:
        return Response(node.telemetry.render(), media_type=CONTENT_TYPE)

    app.include_router(health)  # /v1/node is here, under the health token, not the API key
    app.include_router(v1)
    return app


class RequestMetrics:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which breaks disconnects): counts each
    inference request by endpoint, serving backend (from the response header) and status."""

    def __init__(self, app, telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in ENDPOINTS:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        seen = {"status": 500, "backend": None}

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for k, v in message.get("headers", ()):
                    if k == BACKEND_HEADER.encode():
                        seen["backend"] = v.decode()
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.telemetry.request_done(path, seen["backend"], seen["status"], time.monotonic() - started)


def _secret(value) -> str | None:
    return value.get_secret_value() if value is not None else None


async def _unless_disconnected(request: Request, work):
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (the
    router aborts the request in the engine) and None is returned. As vLLM's server does:
    without it, a client that gave up (and the openai client's retries) keep the engine busy."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _sse(events: AsyncIterator[Served], frame) -> StreamingResponse:
    """Start the stream before answering, so errors before the first token are plain HTTP errors
    (400/429/503) and the header can name the backend; then stream ``data:`` events and [DONE]."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in frame(first, True):
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            async for served in events:
                for chunk in frame(served, False):
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
        except Exception as exc:  # noqa: BLE001 - a stream always ends with an error event and [DONE]
            err = exc.body() if isinstance(exc, ApiError) else {"error": {
                "message": f"internal error ({type(exc).__name__}); the agent's log has the details",
                "type": "server_error", "param": None, "code": "internal_error"}}
            if isinstance(exc, ApiError):
                log.warning("stream ended with an error: %s", err["error"]["message"])
            else:
                log.error("stream ended with an unexpected error", exc_info=exc)
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            # A client that goes away cancels this body's task; Starlette cancels through anyio,
            # which re-cancels every later await in the scope. Shield the clean-up so the router
            # and the engine really abort the request and free its slot.
            with anyio.CancelScope(shield=True):
                await events.aclose()
        yield b"data: [DONE]\n\n"

    headers = {BACKEND_HEADER: first.backend} if first else {}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
