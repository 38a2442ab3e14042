"""A ``Job``'s choices run through the router and come back as one OpenAI answer.

Each choice is its own request to the router (``jobs``): it is admitted, fails over and is
accounted on its own. Non-streamed, the choices run concurrently and the first that fails
cancels the others (the client gets one error). Streamed, their deltas are merged as they come,
each chunk naming its choice's ``index``; the usage chunk follows once every choice finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from agent.backends.base import Delta
from agent.serving.attempts import Served
from agent.serving.jobs import Job
from agent.serving.output import (
    Shaper,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    job_usage,
)
from agent.serving.router import Router


def shapers(job: Job) -> list[Shaper]:
    chat = job.endpoint == "chat"
    return [Shaper(job.tools, job.logprobs, chat, job.echo[i] if job.echo else "") for i in range(len(job.requests))]


async def complete(router: Router, job: Job) -> tuple[str, list[list[Delta]]]:
    """Every choice's deltas (and the backend that answered the first)."""
    if len(job.requests) == 1:
        backend, deltas = await router.complete_deltas(job.requests[0])
        return backend, [deltas]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(router.complete_deltas(r)) for r in job.requests]
    results = [t.result() for t in tasks]
    return results[0][0], [deltas for _, deltas in results]


def whole(job: Job, rid: str, model: str, results: list[list[Delta]]) -> dict:
    """The non-streamed answer."""
    shaped = []
    for shaper, deltas in zip(shapers(job), results):
        for d in deltas:
            shaper.feed(d)
        shaped.append((shaper, deltas[-1]))
    usage = job_usage(job, [deltas[-1] for deltas in results])
    build = chat_response if job.endpoint == "chat" else completion_response
    return build(rid, model, shaped, usage)


async def merged(router: Router, job: Job) -> AsyncIterator[tuple[int, Served]]:
    """(choice index, served delta) of every choice, as they come."""
    if len(job.requests) == 1:
        stream = router.stream(job.requests[0])
        try:
            async for served in stream:
                yield 0, served
        finally:
            await stream.aclose()
        return
    streams = [router.stream(r) for r in job.requests]
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Served]) -> None:
        try:
            async for served in stream:
                await queue.put((i, served, None))
            await queue.put((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the merging side, which raises it
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, served, error = await queue.get()
            if error is not None:
                raise error
            if served is None:
                left -= 1
                continue
            yield i, served
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


class Frames:
    """SSE chunks for a job's stream: ``frames(index, served, first)`` per delta."""

    def __init__(self, job: Job, rid: str, model: str, created: int) -> None:
        self.job, self.rid, self.model, self.created = job, rid, model, created
        self.shapers = shapers(job)
        self.opened: set[int] = set()
        self.lasts: dict[int, Delta] = {}

    def __call__(self, item: tuple[int, Served] | None, first: bool = False) -> list[dict]:
        if item is None:
            return []
        i, served = item
        d, shaper = served.delta, self.shapers[i]
        out = self._chat(i, d, shaper) if self.job.endpoint == "chat" else self._completion(i, d, shaper)
        if d.finish_reason is not None:
            self.lasts[i] = d
            if self.job.include_usage and len(self.lasts) == len(self.shapers):
                lasts = [self.lasts[k] for k in range(len(self.shapers))]
                build = chat_chunk if self.job.endpoint == "chat" else completion_chunk
                out.append(build(self.rid, self.model, self.created, {} if build is chat_chunk else "", None,
                                 job_usage(self.job, lasts)))
        return out

    def _chat(self, i: int, d: Delta, shaper: Shaper) -> list[dict]:
        out = []
        if i not in self.opened:
            self.opened.add(i)
            out.append(chat_chunk(self.rid, self.model, self.created, {"role": "assistant", "content": ""}, None,
                                  index=i))
        fragments = shaper.feed(d)
        finish = shaper.finish_reason(d) if d.finish_reason is not None else None
        if not fragments and finish is not None:
            fragments = [{}]
        for k, fragment in enumerate(fragments):
            entries = fragment.pop("logprobs", None)
            out.append(chat_chunk(self.rid, self.model, self.created, fragment,
                                  finish if k == len(fragments) - 1 else None, index=i,
                                  logprobs=shaper.logprobs(entries) if entries else None))
        return out

    def _completion(self, i: int, d: Delta, shaper: Shaper) -> list[dict]:
        echo = ""
        if i not in self.opened:
            self.opened.add(i)
            echo = self.job.echo[i] if self.job.echo else ""
        shaper.feed(d)
        logprobs = shaper.logprobs(list(d.logprobs)) if self.job.logprobs is not None else None
        if not (echo or d.text or d.finish_reason):
            return []
        return [completion_chunk(self.rid, self.model, self.created, echo + d.text, d.finish_reason, index=i,
                                 logprobs=logprobs)]
