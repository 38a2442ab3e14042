"""Errors the HTTP layer renders, each knowing its status, OpenAI type/code and headers.

One exception handler (``app.py``) turns any of them into
``{"error": {"message", "type", "param", "code"}}``. Nothing matches on message text.
"""

from __future__ import annotations


class ApiError(Exception):
    """Base: an error with an HTTP rendering."""

    status = 500
    type = "server_error"
    code: str | None = None
    backend: str | None = None  # the engine involved, if any: named in the x-node-agent-backend header

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        """The OpenAI error envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    """A parameter is missing, of the wrong type or out of range."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextTooLong(InvalidRequest):
    """The prompt does not fit the model's context."""

    code = "context_length_exceeded"


class ModelNotFound(ApiError):
    """The request names a model this node does not serve."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(ApiError):
    """Missing or wrong API key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Overloaded(ApiError):
    """Admission queue full or its deadline passed; try again after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class NotReady(ApiError):
    """No backend can serve right now (loading, or every engine failed)."""

    status = 503
    type = "server_error"
    code = "not_ready"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class EngineFailed(ApiError):
    """Every backend in the chain failed this request."""

    status = 502
    type = "server_error"
    code = "engine_failed"


class StreamInterrupted(ApiError):
    """A stream's backend failed after text was sent and continuation is off."""

    status = 502
    code = "stream_interrupted"


class CannotHold(ApiError):
    """The backends serving now cannot hold the request; a bigger one of the chain could, once
    it is back (not the client's fault: a 503 with Retry-After)."""

    status = 503
    code = "context_unavailable"

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class CannotHonour(CannotHold):
    """No engine serving now can honour the request (a constraint, a constrained continuation,
    a vocabulary: ``Features.refuses``); a 503 with Retry-After, not the client's fault (#12)."""

    code = "capability_unavailable"
