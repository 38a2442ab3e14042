"""The gate in front of every route: size, authentication and the body bound, at the ASGI layer.

FastAPI reads and parses a request's body before it resolves the route's dependencies, so a
dependency cannot stop an unauthenticated caller from making the server read a multi-GB body.
The gate decides from the headers first, in this order, before a byte of the body is read:

1. a declared ``Content-Length`` above ``server.max_request_bytes`` → 413;
2. a missing or wrong ``Authorization: Bearer <token>`` → 401 (``health.token`` on /health/*,
   /v1/node and /metrics, and on /health unless ``health.open_health_check``; ``server.api_key``
   everywhere else; the scheme is case-insensitive and
   the token compared in constant time);
3. a body without a declared length is read here up to the bound (413 beyond it) and handed on.

A pure ASGI middleware, not Starlette's BaseHTTPMiddleware (which runs streaming bodies in a task
that a client disconnect does not cancel).
"""

from __future__ import annotations

import hmac
import json

HEALTH_PATHS = ("/health", "/v1/node", "/metrics")


def is_health_path(path: str) -> bool:
    return path in HEALTH_PATHS or path.startswith("/health/")


def bearer_matches(header: bytes | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, scheme case-insensitive, token compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


class Gate:
    """See the module docstring; ``api_key``/``health_token`` None: that part is open."""

    def __init__(self, app, api_key: str | None, health_token: str | None, max_body_bytes: int,
                 open_health_check: bool = False) -> None:
        self.app = app
        self.open_health_check = open_health_check
        self.api_key = api_key
        self.health_token = health_token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _refuse(send, 400, "invalid_request_error", "invalid_value",
                              "the Content-Length header is not a number")
                return
            if size > self.max_body_bytes:
                await self._too_large(send, f"the request body is {size} bytes")
                return
        path = scope.get("path", "")
        token = self.health_token if is_health_path(path) else self.api_key
        if path == "/health" and self.open_health_check:
            token = None  # 200/503 and nothing else: health.open_health_check
        if token and not bearer_matches(headers.get(b"authorization"), token):
            refusal = ("missing or wrong health token (Authorization: Bearer <health.token>)" if is_health_path(path)
                       else "missing or wrong API key (Authorization: Bearer <key>)")
            await _refuse(send, 401, "invalid_request_error", "invalid_api_key", refusal,
                          {"www-authenticate": "Bearer"})
            return
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_bounded(receive)
            if body is None:
                await self._too_large(send, "the request body is larger than that")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_bounded(self, receive) -> bytes | None:
        """The whole body of a request without a declared length; None past the bound."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)  # the client left; the route will see an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, send, what: str) -> None:
        await _refuse(send, 413, "invalid_request_error", "request_too_large",
                      f"{what}; this node accepts at most {self.max_body_bytes} bytes (server.max_request_bytes)",
                      {"connection": "close"})


def _replay(body: bytes, receive):
    """A receive that hands the app the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _refuse(send, status: int, kind: str, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
