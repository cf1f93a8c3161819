"""systemd's sd_notify protocol, written here (no libsystemd, no dependency).

A service of `Type=notify` tells systemd about its state by sending datagrams of newline-separated
`NAME=value` lines to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or an abstract socket
when it starts with '@'). With `WatchdogSec=`, systemd also sets `$WATCHDOG_USEC` (and
`$WATCHDOG_PID`) and kills the service unless `WATCHDOG=1` arrives at least that often.

Outside systemd (`$NOTIFY_SOCKET` unset) every method is a no-op, so callers never check.
Sending never raises and never blocks: a failure is logged once as a warning and the message is
dropped (the daemon must keep serving even if systemd cannot hear it).

    notifier = Notifier.from_environment()
    nursery.start_soon(notifier.run_watchdog)
    ...                                 # listening sockets open
    notifier.ready("serving on 0.0.0.0:8980")
    ...                                 # SIGTERM
    notifier.stopping("draining")
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to one socket address (or nothing when `address` is None)."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        # A path (str) or an abstract name (bytes starting with NUL); None: a no-op notifier.
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (from os.environ by default)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | bytes | None = None
        if raw.startswith("@"):
            address = b"\0" + raw[1:].encode()  # Linux abstract namespace
        elif raw.startswith("/"):
            address = raw
        elif raw:
            # e.g. "vsock:..." (systemd 253+ for VMs): not supported, so stay silent.
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", raw)
        watchdog: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            pid = env.get("WATCHDOG_PID", "")
            # The watchdog is ours unless WATCHDOG_PID names another process (e.g. a parent's).
            if usec > 0 and (not pid or int(pid) == os.getpid()):
                watchdog = usec
        except ValueError:
            pass
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Sends `NAME=value` lines as one datagram; True if the datagram was handed over."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)  # a full receive queue gives EAGAIN, never a wait
                self._sock = sock
            self._sock.sendto(data, self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %r: %s (not logged again)", self.address, e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Start-up (or a reload) is complete: systemd considers the service started."""
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """A one-line free-form status shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "") -> bool:
        """Shutdown (drain) has begun."""
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self, status: str = "") -> bool:
        """A reload has begun; send `ready()` when it is done. MONOTONIC_USEC is what
        `Type=notify-reload` (systemd 253+) needs to match the message to its reload request."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Asks systemd for `seconds` more of the current start/stop timeout."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the deadline, as systemd recommends); None
        when there is no watchdog for this process or nowhere to send to."""
        if self._watchdog_usec is None or self.address is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def run_watchdog(self) -> None:
        """Pings the watchdog until cancelled; returns at once when there is none. Run it in the
        daemon's main nursery: a ping proves the Trio loop still schedules tasks."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # One message line per assignment: a newline in the text would start a bogus assignment.
    return " ".join(text.splitlines())


def _status(text: str) -> list[str]:
    return [f"STATUS={_one_line(text)}"] if text else []
