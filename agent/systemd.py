"""systemd's notify protocol: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 over ``$NOTIFY_SOCKET``.

Written here rather than taken from a library: the protocol is one datagram per message to a
Unix socket (a leading ``@`` names an abstract socket), and the choices on PyPI are either
unmaintained since 2017 (``sdnotify``) or need libsystemd's headers to build
(``systemd-python``, ``cysystemd``), which a CPU-only container or a user install may lack.
Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages; a no-op when the service manager did not ask for them."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET") or None
        self.address: str | bytes | None = None
        if path:
            self.address = b"\0" + path[1:].encode() if path.startswith("@") else path
        self._sock: socket.socket | None = None
        self.last_status: str | None = None
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one message (lines joined by newlines); False when it could not be delivered."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                # Non-blocking: a full receive queue (a manager that does not read) must never
                # stall the event loop that serves requests; the message is dropped instead.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:  # the manager went away or is not reading: keep serving
            log.warning("systemd notify %r failed: %s", lines[0] if lines else "", exc)
            return False

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS= only when it changed (systemctl status shows the latest)."""
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str = "draining requests") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog interval from the event loop itself, so a wedged loop stops
        the pings and systemd restarts the service. Returns at once when no watchdog is set."""
        if not self.enabled or self.watchdog_s is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC in seconds, when it is meant for this process (WATCHDOG_PID, if set, is ours)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return value / 1e6 if value > 0 else None
