"""Pull progress: one tracker of bytes, rate and ETA, shown three ways.

- ``RichSink``: a rich progress bar per file and one for the total (``node-agent pull``);
- ``JsonSink``: one JSON line per event (``--json``), file events always, byte counts at most
  every ``JSON_EVERY_S`` per file;
- ``Tracker.snapshot()``: a dict for ``/health/ready`` while ``serve`` downloads.

The tracker is written by the download thread and read by the event loop; a lock keeps the
numbers of one snapshot consistent.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from typing import IO

from agent.hub.errors import gb

RATE_WINDOW_S = 10.0
JSON_EVERY_S = 0.5


class Tracker:
    """Bytes done of a known total, with a rate over the last ``RATE_WINDOW_S`` seconds."""

    def __init__(self, total: int, files: int, label: str = "") -> None:
        self.total, self.files, self.label = total, files, label
        self.done = 0  # bytes of the pull that are on disk, including resumed and present ones
        self.fetched = 0  # bytes moved over the network by this pull
        self.files_done = 0
        self.current: str | None = None
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._lock = threading.Lock()

    def add(self, n: int, fetched: bool = True) -> None:
        with self._lock:
            self.done += n
            if fetched:
                self.fetched += n
                now = time.monotonic()
                self._samples.append((now, self.fetched))
                while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
                    self._samples.popleft()

    def file_finished(self) -> None:
        with self._lock:
            self.files_done += 1

    def rate(self) -> float:
        """Bytes per second over the recent window (0 before the first byte)."""
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> dict:
        """The numbers ``/health/ready`` reports under ``progress.download``."""
        with self._lock:
            rate = self.rate()
            left = max(0, self.total - self.done)
            return {
                "model": self.label,
                "bytes_done": self.done,
                "bytes_total": self.total,
                "percent": round(100 * self.done / self.total, 1) if self.total else 100.0,
                "files_done": self.files_done,
                "files_total": self.files,
                "file": self.current,
                "rate_bytes_per_s": round(rate),
                "eta_s": round(left / rate) if rate > 0 else None,
                # one short line (systemd STATUS=, logs) that changes at most once per whole percent
                "summary": f"downloading {self.label}: {int(100 * self.done / self.total) if self.total else 100}% "
                           f"of {gb(self.total)}",
            }


class _TrackingSink:
    """The part every sink shares: keeping the tracker in step with the transfer."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def file_start(self, path: str, size: int, have: int) -> None:
        self.tracker.current = path
        self.tracker.add(have, fetched=False)

    def advance(self, path: str, n: int) -> None:
        self.tracker.add(n)

    def file_done(self, path: str, fetched: int, status: str) -> None:
        self.tracker.file_finished()

    def note(self, message: str) -> None:
        pass


class QuietSink(_TrackingSink):
    """Tracks only (serve: /health/ready reads the tracker)."""

    def __init__(self, tracker: Tracker, log) -> None:
        super().__init__(tracker)
        self.log = log

    def note(self, message: str) -> None:
        self.log.warning("%s", message)


class JsonSink(_TrackingSink):
    """One JSON object per line: {"event": "file_start"|"progress"|"file_done"|"note", ...}."""

    def __init__(self, tracker: Tracker, out: IO[str] | None = None) -> None:
        super().__init__(tracker)
        self.out = out or sys.stdout
        self._last: dict[str, float] = {}

    def emit(self, event: str, **fields) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")
        self.out.flush()

    def file_start(self, path: str, size: int, have: int) -> None:
        super().file_start(path, size, have)
        self.emit("file_start", path=path, size=size, have=have)

    def advance(self, path: str, n: int) -> None:
        super().advance(path, n)
        now = time.monotonic()
        if now - self._last.get(path, 0.0) >= JSON_EVERY_S:
            self._last[path] = now
            self.emit("progress", **self.tracker.snapshot())

    def file_done(self, path: str, fetched: int, status: str) -> None:
        super().file_done(path, fetched, status)
        self.emit("file_done", path=path, fetched=fetched, status=status, **self.tracker.snapshot())

    def note(self, message: str) -> None:
        self.emit("note", message=message)


class RichSink(_TrackingSink):
    """A rich bar per file (bytes, rate, ETA) and one for the whole pull."""

    def __init__(self, tracker: Tracker, console) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        super().__init__(tracker)
        self.console = console
        self.bars = Progress(TextColumn("{task.description}", justify="left"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.total_task = self.bars.add_task(f"[bold]total[/] {tracker.label}", total=tracker.total)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> RichSink:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def file_start(self, path: str, size: int, have: int) -> None:
        super().file_start(path, size, have)
        name = path if len(path) <= 48 else "…" + path[-47:]
        self.tasks[path] = self.bars.add_task(name, total=size, completed=have)
        self.bars.update(self.total_task, completed=self.tracker.done)

    def advance(self, path: str, n: int) -> None:
        super().advance(path, n)
        self.bars.advance(self.tasks[path], n)
        self.bars.update(self.total_task, completed=self.tracker.done)

    def file_done(self, path: str, fetched: int, status: str) -> None:
        super().file_done(path, fetched, status)
        task = self.tasks.get(path)
        if task is not None:
            what = {"present": "already here, verified", "resumed": "resumed", "refetched": "re-fetched (was corrupt)"}
            if status in what:
                self.bars.update(task, description=f"{path} ({what[status]})")

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/] {message}", highlight=False)
