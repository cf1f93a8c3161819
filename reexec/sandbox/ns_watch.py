"""Wait until a confined action's PID namespace is empty, not only until bwrap has exited.

bwrap's PID 1 reports the command's exit status to the outer bwrap and only then exits, and the
kernel kills the rest of the namespace as part of that exit. So the outer bwrap can be gone
while a left-over process (one that called `setsid`, holding an output open) still runs for a
moment. The host PID of that PID 1 comes from bwrap's `--json-status-fd` (first line, written
right after the namespace is created); a pidfd on it becomes readable only once the process has
finished exiting, and a PID namespace's init finishes exiting only after every other process in
the namespace has been reaped. Waiting for that pidfd is therefore "every process the action
started is dead".

The pidfd is opened as soon as the PID is known, while bwrap (its parent, not yet reaped by us)
keeps the PID from being reaped and reused. If the PID 1 is already gone when the status is
read, there is nothing left to wait for.
"""

from __future__ import annotations

import errno
import os

import trio

from reexec.sandbox.confine import child_pid_from_status

__all__ = ["NamespaceWatch"]

_MAX_STATUS_BYTES = 64 * 1024


class NamespaceWatch:
    """Owns the read end of bwrap's status pipe; `write_fd` goes to bwrap (`pass_fds`).

    Use: create, start bwrap with `write_fd`, call `close_write_end()`, run `watch()` in a
    nursery while the action runs, then `await wait_gone(timeout)` after bwrap has exited.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.child_pid: int | None = None
        self._pidfd: int | None = None
        self._known = trio.Event()
        self._data = b""

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def watch(self) -> None:
        """Read the status until the PID 1 is known (then open its pidfd) or the pipe ends."""
        try:
            while self.child_pid is None and len(self._data) < _MAX_STATUS_BYTES:
                await trio.lowlevel.wait_readable(self.read_fd)
                try:
                    chunk = os.read(self.read_fd, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                self._data += chunk
                if b"\n" in self._data:
                    self._take_pid()
        finally:
            self._known.set()

    def _take_pid(self) -> None:
        pid = child_pid_from_status(self._data)
        if pid is None:
            return
        self.child_pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
            # Already gone and reaped: the namespace was emptied before it could be.

    async def wait_gone(self, timeout_s: float) -> bool:
        """After bwrap has exited: wait until its PID 1 (and so the namespace) is gone.

        Returns False if that did not happen within `timeout_s` (the caller should then not
        trust outputs that a straggler could still write).
        """
        with trio.move_on_after(timeout_s):
            await self._known.wait()
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            return True
        return False

    def close(self) -> None:
        self.close_write_end()
        for fd in (self.read_fd, self._pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.read_fd = -1
        self._pidfd = None
