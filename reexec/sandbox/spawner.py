"""Start processes from one long-lived thread, and wait for them by pidfd.

bwrap's `--die-with-parent` (PR_SET_PDEATHSIG) kills the action when the *thread* that forked
bwrap exits, not the process. Trio's `open_process` forks in one of its cached worker threads,
which exit after 10 s idle: every confined action then died at about 10 s with SIGKILL. Forking
from a thread that lives as long as the worker keeps `--die-with-parent` meaning what it says
(the action dies with the worker, and only then).

A process started here is reaped by `SpawnedProcess.wait` (waitpid after its pidfd became
readable); nothing else may reap it.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import trio


class SpawnedProcess:
    """A child started by `spawn`: its pid, and an async wait that reaps it."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None

    async def wait(self) -> int:
        """Wait for the process to exit and reap it; the return code as Popen gives it (-N for
        a signal)."""
        if self.returncode is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            # The child has exited: Popen.wait reaps it at once and keeps its bookkeeping right.
            self.returncode = self._popen.wait()
        return self.returncode


class _SpawnThread:
    """One daemon thread that runs Popen calls handed to it, in order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]
        ]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="reexec-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, reply = self._jobs.get()
            try:
                result: Any = fn()
            except BaseException as e:  # handed back to the caller, never lost
                reply(None, e)
            else:
                reply(result, None)

    async def run(self, fn: Callable[[], Any]) -> Any:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[Any] = []

        def reply(result: Any, error: BaseException | None) -> None:
            outcome[:] = [result, error]
            trio.from_thread.run_sync(done.set, trio_token=token)

        self._jobs.put((fn, reply))
        # Not cancellable: a process once started must be handed to its supervisor.
        with trio.CancelScope(shield=True):
            await done.wait()
        result, error = outcome
        if error is not None:
            raise error
        return result


_spawn_thread: _SpawnThread | None = None
_lock = threading.Lock()


async def spawn(argv: list[str], **popen_kwargs: Any) -> SpawnedProcess:
    """`subprocess.Popen(argv, **popen_kwargs)` from the long-lived spawner thread."""
    global _spawn_thread
    with _lock:
        if _spawn_thread is None:
            _spawn_thread = _SpawnThread()
        thread = _spawn_thread
    popen = await thread.run(lambda: subprocess.Popen(argv, **popen_kwargs))
    return SpawnedProcess(popen)
