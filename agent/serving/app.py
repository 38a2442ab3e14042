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
from agent.backends.base import BackendError, GenerationRequest, InvalidInput
from agent.serving import answers
from agent.serving.attempts import Served
from agent.serving.errors import ApiError, EngineFailed, InvalidRequest, ModelNotFound, NotReady
from agent.serving.gate import Gate
from agent.serving.jobs import Job, chat_job, completion_job
from agent.serving.metrics import CONTENT_TYPE, ENDPOINTS
from agent.serving.node import Node
from agent.serving.openai import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from agent.serving.output import new_id
from agent.serving.retry_hints import RetryHints
from agent.serving.router import describe_states
from agent.settings import Settings

log = logging.getLogger(__name__)
request_log = logging.getLogger("agent.requests")
BACKEND_HEADER = "x-node-agent-backend"
# how pydantic names a plain type of a union in an error's location (no request field has these names)
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "bytes", "none", "dict", "list"})


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = []
    for part in first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ()):
        if isinstance(part, str) and ("[" in part or part[:1].isupper() or part in _UNION_MEMBERS):
            break  # a union member's name (pydantic's), not a field
        loc.append(str(part))
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", param=None)
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    if param is None:  # a check across fields says which one it is about: "field: why"
        name, sep, _ = msg.partition(":")
        if sep and name.isidentifier():
            return InvalidRequest(msg, param=name)
    return InvalidRequest(f"{param or 'body'}: {msg}", param=param)


def create_app(settings: Settings, node: Node) -> FastAPI:
    """The ASGI app; the caller owns the router's and the monitor's lifecycles."""
    router, model_name = node.router, node.model_name
    app = FastAPI(title="node-agent", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if settings.server.openapi else None)
    app.state.node = node
    app.state.settings = settings
    app.add_middleware(Gate, api_key=_secret(settings.server.api_key), health_token=_secret(settings.health.token),
                       open_health_check=settings.health.open_health_check,
                       max_body_bytes=settings.server.max_request_bytes)
    app.add_middleware(RequestMetrics, telemetry=node.telemetry)  # refusals are counted too
    app.add_middleware(RetryHints)  # outermost: the gate's refusals say "do not retry" too
    log_prompts = settings.server.log_prompts
    default_max = settings.admission.default_max_tokens

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {**exc.headers, BACKEND_HEADER: exc.backend} if exc.backend else exc.headers
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

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

    def log_request(endpoint: str, job: Job) -> None:
        """server.log_prompts: the text, as one JSON line at INFO; off: sizes only, at DEBUG."""
        gen = job.requests[0]
        if log_prompts:
            request_log.info(json.dumps({"event": "request", "request_id": gen.request_id, "endpoint": endpoint,
                                         "max_tokens": gen.max_tokens, "n": len(job.requests), "prompt": gen.prompt,
                                         "messages": gen.messages, **job.log}))
        elif request_log.isEnabledFor(logging.DEBUG):
            chars = len(gen.prompt or "") + sum(len(m.get("content") or "") for m in gen.messages or ())
            request_log.debug("request %s %s: %d prompt characters, max_tokens %d, %d choices %s", gen.request_id,
                              endpoint, chars, gen.max_tokens, len(job.requests), json.dumps(job.log))

    def log_answer(request_id: str, backend: str, text: str, last) -> None:
        if log_prompts:
            request_log.info(json.dumps({"event": "answer", "request_id": request_id, "backend": backend,
                                         "text": text, "finish_reason": last.finish_reason if last else None,
                                         "completion_tokens": last.completion_tokens if last else 0}))

    async def logged(request_id: str, events: AsyncIterator[tuple[int, Served]]) -> AsyncIterator[tuple[int, Served]]:
        """The stream, passed through; its text is logged when it ends (server.log_prompts)."""
        parts, backend, last = [], "", None
        try:
            async for i, served in events:
                # No reset on a new backend: a stream continues after a failover, so the client's
                # answer is everything yielded, from both engines.
                backend = served.backend
                parts.append(served.delta.text)
                last = served.delta
                yield i, served
        finally:
            await events.aclose()  # the router releases the request's KV and aborts the engine
            log_answer(request_id, backend, "".join(parts), last)

    async def answer(raw: Request, endpoint: str, job: Job, rid: str):
        """Both endpoints: one JSON answer, or an SSE stream; the backend is named in the header
        (with n choices: the one that answered the first)."""
        log_request(endpoint, job)
        if not job.stream:
            result = await _unless_disconnected(raw, answers.complete(router, job))
            if result is None:
                log.info("request %s: the client left; aborted", rid)
                return Response(status_code=499)
            backend, results = result
            log_answer(rid, backend, "".join(d.text for d in results[0]), results[0][-1])
            return JSONResponse(answers.whole(job, rid, model_name, results), headers={BACKEND_HEADER: backend})
        events = answers.merged(router, job)
        frames = answers.Frames(job, rid, model_name, int(time.time()))
        return await _sse(logged(rid, events) if log_prompts else events, frames)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ModelNotFound(f"model {name!r} is not served here; this node serves {model_name!r}", param="model")

    def chain_features() -> list:
        return [r.backend.features() for r in router.routes]

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "node-agent",
                "max_model_len": node.max_model_len()}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise ModelNotFound(f"model {model_id!r} is not served here; this node serves {model_name!r}",
                                param="model")
        return model_card()

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        rid = new_id("chatcmpl")
        return await answer(raw, "/v1/chat/completions", chat_job(body, rid, default_max, chain_features()), rid)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        rid = new_id("cmpl")
        return await answer(raw, "/v1/completions", completion_job(body, rid, chain_features()), rid)

    def tokenizer_route():
        serving = router.serving()
        if not serving:
            raise NotReady(f"no backend can tokenize yet ({describe_states(router.routes)})")
        return serving[0]

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        check_model(body.model)
        route = tokenizer_route()
        if body.messages is not None:
            chat_body = ChatCompletionRequest(model=model_name, messages=body.messages, tools=body.tools,
                                              chat_template_kwargs=body.chat_template_kwargs)
            gen = chat_job(chat_body, new_id("tok"), 1, chain_features()).requests[0]
        else:
            gen = GenerationRequest(new_id("tok"), 1, prompt=body.prompt)
        prepared = await _typed(route.backend.prepare(gen))
        ids = list(prepared.token_ids)
        out = {"count": len(ids), "max_model_len": route.backend.capacity().max_context, "tokens": ids,
               "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [await route.backend.detokenize([t]) for t in ids]
        return JSONResponse(out, headers={BACKEND_HEADER: route.name})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        check_model(body.model)
        route = tokenizer_route()
        text = await _typed(route.backend.detokenize(body.tokens))
        return JSONResponse({"prompt": text}, headers={BACKEND_HEADER: route.name})

    @health.get("/health")
    async def health_probe() -> Response:
        # vLLM's server semantics, for the routers that poll it: 200 and no body while some engine
        # serves, else 503. As cheap as /health/ready (no engine call).
        r = node.monitor.compute_readiness()
        if r.serving:
            return Response(status_code=200)
        return JSONResponse({"status": r.status, "reason": r.reason}, status_code=503,
                            headers={"Retry-After": _retry_after(r)})

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
        return JSONResponse(body, status_code=503, headers={"Retry-After": _retry_after(r)})

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


def _retry_after(readiness) -> str:
    """Seconds a 503 from the health endpoints asks a prober to wait: soon while loading."""
    return "5" if readiness.status == "loading" else "30"


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


async def _typed(work):
    """``await work`` (a backend call outside the router), its typed errors as HTTP errors."""
    try:
        return await work
    except InvalidInput as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    except BackendError as exc:
        raise EngineFailed(f"the engine could not do it: {exc}") from exc


async def _sse(events: AsyncIterator[tuple[int, Served]], frame) -> StreamingResponse:
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

    headers = {BACKEND_HEADER: first[1].backend} if first else {}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
