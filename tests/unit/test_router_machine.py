"""A property-based state machine over the router, admission and breakers (#11).

Hypothesis drives two scripted backends (vLLM first, llama.cpp behind it) with random requests
(streamed and not, of random sizes), clients that leave at random points, and injected faults
(deaths mid-stream and while idle, raw engine errors, stalls before the first token, a failing
restart). After every step it checks what must always hold; at the end, with the faults
healed, that everything drains and every breaker closes again:

- no leaked KV tickets: with nothing in flight, nothing is reserved and no engine works;
- a queue is never longer than its bound, and no count goes negative;
- every request ends: an answer with a finish reason, or a typed error (never a hang, never a
  raw exception);
- usage equals what was delivered: one-character tokens make the delivered text's length the
  token count.
"""

from __future__ import annotations

import asyncio
import string

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.backends.base import BackendState, GenerationRequest
from agent.serving.errors import ApiError
from agent.serving.router import Router
from agent.settings import AdmissionSettings, RouterSettings
from tests.unit.fake_backend import FakeBackend, Script

LETTERS = list(string.ascii_lowercase)
SERVING = (BackendState.READY, BackendState.DEGRADED)


def fresh_script(**kw) -> Script:
    return Script(words=LETTERS, pattern=(1, 2, 3), delay=0.002, slots=2, kv=60, context=40, **kw)


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.backends = [FakeBackend("vllm", fresh_script()), FakeBackend("llamacpp", fresh_script())]
        self.router = Router(self.backends, RouterSettings(
            first_token_timeout_s=0.05, breaker_failures=2, breaker_cooldown_s=0.05, restart_backoff_s=0.01,
            restart_backoff_max_s=0.02, max_restart_attempts=10_000), AdmissionSettings(max_queue=3, queue_timeout_s=0.3))
        self.loop.run_until_complete(self.router.start())
        self.tasks: list[asyncio.Task] = []
        self.outcomes: list[tuple[str, object]] = []
        self.n = 0

    # --- driving ---------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    async def _stream(self, request: GenerationRequest, leave_after: int | None) -> None:
        text, last = "", None
        stream = self.router.stream(request)
        try:
            async for served in stream:
                text += served.delta.text
                last = served.delta
                if leave_after is not None and len(text) >= leave_after:
                    self.outcomes.append(("left", None))
                    return
        except ApiError as exc:
            self.outcomes.append(("error", exc))
            return
        finally:
            await stream.aclose()
        self.outcomes.append(("answer", (text, last, request)))

    async def _complete(self, request: GenerationRequest) -> None:
        try:
            _, text, last = await self.router.complete(request)
        except ApiError as exc:
            self.outcomes.append(("error", exc))
            return
        self.outcomes.append(("answer", (text, last, request)))

    @rule(stream=st.booleans(), max_tokens=st.integers(1, 30), prompt_words=st.integers(1, 45),
          leave_after=st.one_of(st.none(), st.integers(0, 10)))
    def send(self, stream, max_tokens, prompt_words, leave_after):
        self.n += 1
        request = GenerationRequest(f"r{self.n}", max_tokens, prompt=" ".join(["w"] * prompt_words))
        work = self._stream(request, leave_after) if stream else self._complete(request)
        self.tasks.append(self.loop.create_task(work))
        if not stream and leave_after is not None:  # a non-streamed client that gives up
            task = self.tasks[-1]
            self.loop.call_later(leave_after * 0.005, task.cancel)

    @rule(which=st.sampled_from([0, 1]), fault=st.sampled_from(["die_after", "raw_error_after", "stall"]),
          at=st.integers(0, 4))
    def inject(self, which, fault, at):
        script = self.backends[which].script
        if fault == "stall":
            script.stall = which == 0  # only where another backend can take over (terminal: no deadline)
        else:
            setattr(script, fault, at)

    @rule(which=st.sampled_from([0, 1]))
    def die_idle(self, which):
        self.backends[which].die()

    @rule(which=st.sampled_from([0, 1]), n=st.integers(1, 2))
    def failing_restarts(self, which, n):
        self.backends[which].script.fail_starts = n

    @rule(which=st.sampled_from([0, 1]))
    def heal(self, which):
        self.backends[which].script = fresh_script()

    @rule(seconds=st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    def wait(self, seconds):
        self.advance(seconds)

    # --- what always holds ------------------------------------------------------------------
    @invariant()
    def bounded_and_never_negative(self):
        for route in self.router.routes:
            a = route.admission
            assert a.queue_depth <= a.max_queue
            assert a.reserved >= 0 and a.active >= 0
            assert (a.reserved == 0) == (a.active == 0)

    @invariant()
    def nothing_leaks_once_idle(self):
        if all(t.done() for t in self.tasks):
            for route, backend in zip(self.router.routes, self.backends):
                if route.name in self.router.supervisor.probing:
                    continue  # the supervisor's own one-token probe holds a ticket while it runs
                assert route.admission.active == 0 and route.admission.reserved == 0, route.name
                assert backend.active == set(), (route.name, backend.active)

    @invariant()
    def every_finished_request_ended_properly(self):
        for task in self.tasks:
            if task.done() and not task.cancelled():
                assert task.exception() is None, repr(task.exception())  # no raw exception escaped
        for kind, value in self.outcomes:
            if kind == "answer":
                text, last, request = value
                assert last is not None and last.finish_reason in ("stop", "length")
                assert len(text) == last.completion_tokens <= request.max_tokens  # usage == delivered
            elif kind == "error":
                assert 400 <= value.status < 600 and value.message

    def teardown(self):
        try:
            for backend in self.backends:
                backend.script = fresh_script()
            deadline = self.loop.time() + 10
            while not all(t.done() for t in self.tasks) and self.loop.time() < deadline:
                self.advance(0.05)
            assert all(t.done() for t in self.tasks), "a request never ended"
            self.nothing_leaks_once_idle()
            # Healed: every backend comes back and every breaker closes (probes succeed).
            while self.loop.time() < deadline:
                for b in self.backends:
                    if b.state is BackendState.FAILED:
                        break
                else:
                    # bounded: a request that never ends fails the test instead of hanging the suite
                    self.loop.run_until_complete(asyncio.wait_for(
                        self.router.complete(GenerationRequest("final", 2, prompt="w")), 5))
                    if all(r.breaker.state == "closed" and r.backend.state in SERVING for r in self.router.routes):
                        break
                self.advance(0.06)
            assert all(r.breaker.state == "closed" for r in self.router.routes), \
                [r.breaker.describe() for r in self.router.routes]
            assert all(r.backend.state in SERVING for r in self.router.routes)
        finally:
            self.loop.run_until_complete(asyncio.wait_for(self.router.stop(), 10))
            self.loop.close()


RouterMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_router_state_machine = RouterMachine.TestCase
