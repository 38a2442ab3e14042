"""``x-should-retry: false`` on every permanent error the node answers.

The openai client retries 408, 409, 429 and 5xx by itself, and before that obeys
``x-should-retry`` when a server sends it (openai ``_base_client._should_retry``); gateways built on
it (LiteLLM) do the same. Any other 4xx — a bad body, a wrong key, an unknown model, a body too
large — cannot succeed when sent again, so the node says so and no client or gateway spends a
retry (or another node's time) on it. Retryable answers (429, 503) carry ``Retry-After`` instead,
set where they are raised.

A pure ASGI middleware, outermost, so the gate's own refusals (401, 413) carry the hint too.
"""

from __future__ import annotations

RETRYABLE_4XX = frozenset({408, 409, 429})
HEADER = (b"x-should-retry", b"false")


def is_permanent(status: int) -> bool:
    """A client error that a retry cannot fix."""
    return 400 <= status < 500 and status not in RETRYABLE_4XX


class RetryHints:
    """Adds ``x-should-retry: false`` to responses whose status ``is_permanent``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def hinted(message) -> None:
            if message["type"] == "http.response.start" and is_permanent(message["status"]):
                message = {**message, "headers": [*message.get("headers", ()), HEADER]}
            await send(message)

        await self.app(scope, receive, hinted)
