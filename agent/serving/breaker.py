"""A backend's circuit breaker, and the permit a request holds while it uses that backend.

::

    closed ──(a fatal failure, or ``failures_to_open`` failures in a row)──▶ open
    open ──(``cooldown_s`` passed)──▶ half_open: the next request takes the one probe permit
    half_open ──probe succeeded──▶ closed        half_open ──probe failed──▶ open
    any ──reset() (the backend was restarted and is ready)──▶ closed

Only the breaker changes its state. A ``Permit`` is the one way a request reports on the
backend, and it is resolved on every exit path: used as a context manager, an exit without
``success()`` or ``failure()`` (the client left, the request never reached the engine, the
request itself was invalid) is neutral and gives a probe back, so the next request probes. A
breaker can therefore never stay half-open with its probe taken by a request that is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    """closed / open / half_open with one probe at a time; see the module docstring."""

    def __init__(self, failures_to_open: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._open = False
        self._opened_at = 0.0
        self._probe_out = False
        self.failures = 0  # in a row, since the last success
        self.last_failure: str | None = None

    @property
    def state(self) -> str:
        if not self._open:
            return CLOSED
        return HALF_OPEN if self._clock() - self._opened_at >= self.cooldown_s else OPEN

    def permit(self) -> Permit | None:
        """A permit to send one request, or None while open (or while half-open with the probe
        out). Use it as a context manager."""
        state = self.state
        if state == CLOSED:
            return Permit(self, probe=False)
        if state == HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return Permit(self, probe=True)
        return None

    def reset(self) -> None:
        """The backend was (re)started and is ready: traffic may flow again."""
        self._open, self._probe_out, self.failures = False, False, 0

    def trip(self, reason: str) -> None:
        """Open now, outside any request (the engine died while idle)."""
        self.failures += 1
        self.last_failure = reason
        self._open_now()

    def retry_in_s(self) -> float | None:
        """Seconds until an open breaker lets a probe through; None unless open."""
        if self.state != OPEN:
            return None
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def half_open_for_s(self) -> float | None:
        """Seconds since the breaker became half-open; None unless half-open."""
        if self.state != HALF_OPEN:
            return None
        return self._clock() - self._opened_at - self.cooldown_s

    def describe(self) -> dict:
        """For /v1/node and readiness."""
        retry = self.retry_in_s()
        return {"state": self.state, "failures": self.failures, "last_failure": self.last_failure,
                "probe_in_s": None if retry is None else round(retry, 2), "probing": self._probe_out}

    # --- called by Permit only -------------------------------------------------------------
    def _succeeded(self, permit: Permit) -> None:
        if permit.probe:
            self._probe_out = False
            self.reset()
        elif not self._open:  # a request admitted before the breaker opened does not close it
            self.failures = 0

    def _failed(self, permit: Permit, fatal: bool, reason: str) -> None:
        if permit.probe:
            self._probe_out = False
        self.failures += 1
        self.last_failure = reason
        if fatal or permit.probe or self.failures >= self.failures_to_open:
            self._open_now()

    def _gave_back(self, permit: Permit) -> None:
        if permit.probe:
            self._probe_out = False

    def _open_now(self) -> None:
        self._open, self._opened_at = True, self._clock()


@dataclass(eq=False)
class Permit:
    """One request's pass through a breaker; resolved exactly once (later calls are ignored)."""

    breaker: Breaker
    probe: bool
    resolved: bool = False

    def success(self) -> None:
        if not self.resolved:
            self.resolved = True
            self.breaker._succeeded(self)

    def failure(self, fatal: bool, reason: str) -> None:
        if not self.resolved:
            self.resolved = True
            self.breaker._failed(self, fatal, reason)

    def give_back(self) -> None:
        """Neutral: nothing was learnt about the backend."""
        if not self.resolved:
            self.resolved = True
            self.breaker._gave_back(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.give_back()
