"""A backend's own bounded worker threads.

Engine work (tokenizing, llama.cpp's blocking generation, loading) never runs in asyncio's
default executor, where it would queue behind, or starve, NVML sampling and other start-ups:
each backend owns pools sized for its work, and /health stays fast under load.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Workers:
    """``size`` threads named ``name-N``; ``run`` awaits a call, ``submit`` returns its future."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix=self.name)
        return self._pool

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Start ``fn(*args)`` on one of these threads; the future completes on the event loop."""
        return asyncio.get_running_loop().run_in_executor(self._executor(), functools.partial(fn, *args))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def close(self) -> None:
        """No new work; threads still running finish on their own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
