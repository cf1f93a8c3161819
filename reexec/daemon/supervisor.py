"""`[server] processes = N`: one supervisor process owns N serving processes.

    trio.run(run_supervisor)
    └─ Lifecycle.run(Supervisor)          reexec/daemon/lifecycle.py: signals, drain, reload,
       │                                  sd_notify and the watchdog, for the N processes as one
       └─ Supervisor.run
          └─ nursery
             ├─ _listen(child) x N        READY=1 from the child's private notify socket
             └─ _keep_serving(child) x N  start the child; if it dies while not draining,
                                          restart it after a backoff (0.5 s doubling to 30 s)

Each child is `reexecd <the same arguments>` with `REEXEC_PROCESS_SLOT` / `REEXEC_PROCESS_RUN`
(`reexec.cas.fs_shared.ProcessShare`) in its environment. The children bind the same listen
addresses with SO_REUSEPORT, so the kernel spreads connections among them, and share the
filesystem stores (reexec/cas/fs_shared.py).

sd_notify: a child's `$NOTIFY_SOCKET` is a datagram socket of this supervisor, never systemd's,
and `$WATCHDOG_USEC` is removed. The children's own READY=1 tells the supervisor each one is
serving; the supervisor tells systemd READY=1 once all N are, STOPPING=1 when it drains, and
pings the watchdog itself.

Signals: SIGTERM/SIGINT (or a drain of the supervisor) -> SIGTERM to every child, each drains
within `server.grace_period_s`; the supervisor waits that long plus DRAIN_MARGIN_S, then kills
what is left. SIGHUP -> each child reloads its configuration; a changed `server.processes`
needs a restart of the supervisor. A child that exits by itself (crash, SIGKILL, or its own
POST /drain) is restarted: `reexecd drain --self` on one child's status socket restarts that
child.

Status endpoint: child 0 serves the configured `status.socket` (so `reexecd status` works as
with one process) and `status.listen`; child i > 0 serves `<status.socket>.<i>` and no TCP
status. The supervisor serves none.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import trio

from reexec.cas.fs_shared import ProcessShare
from reexec.daemon.config import Config
from reexec.daemon.lifecycle import Lifecycle
from reexec.daemon.status import StatusSources

log = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# A child that served this long before dying is restarted after RESTART_MIN_S again.
STABLE_S = 60.0
# Beyond the children's own grace period: their stores close and the interpreter exits.
DRAIN_MARGIN_S = 15.0
# Set in each child: it asks to be sent SIGTERM if the supervisor dies (see `as_child`).
SUPERVISOR_PID_ENV = "REEXEC_SUPERVISOR_PID"

_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ChildFailed(Exception):
    """A child exited before it was ready, while the supervisor was starting."""


@dataclass
class _Child:
    slot: int
    notify_path: str
    process: subprocess.Popen[bytes] | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    restarts: int = 0


class Supervisor:
    """The role Lifecycle runs in the supervisor process (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        argv: Sequence[str],
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.argv = list(argv)
        self.processes = config.server.processes
        self.status = StatusSources(role="supervisor", listen=list(config.server.listen))
        self.run_id = f"{os.getpid()}-{time.time_ns()}"
        self._environ = dict(os.environ if environ is None else environ)
        self._children: list[_Child] = []
        self._draining = False
        self._drain_started = trio.Event()

    @property
    def pids(self) -> list[int | None]:
        return [c.process.pid if c.process else None for c in self._children]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start N children, report started once all are ready, keep them serving until
        drained."""
        with tempfile.TemporaryDirectory(prefix="reexec-supervisor-") as private:
            os.chmod(private, 0o700)
            self._children = [
                _Child(slot, os.path.join(private, f"notify-{slot}"))
                for slot in range(self.processes)
            ]
            async with trio.open_nursery() as nursery:
                for child in self._children:
                    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
                    await sock.bind(child.notify_path)
                    nursery.start_soon(self._listen, child, sock)
                    nursery.start_soon(self._keep_serving, child)
                for child in self._children:
                    await child.ready.wait()
                log.info(
                    "%d processes serving on %s (pids %s)",
                    self.processes,
                    ", ".join(self.config.server.listen),
                    ", ".join(str(p) for p in self.pids),
                )
                task_status.started()

    async def _listen(self, child: _Child, sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                data = await sock.recv(4096)
                if b"READY=1" in data.split(b"\n") and not child.ready.is_set():
                    child.ready.set()
                    if child.restarts:
                        log.info("process %d ready again (restart %d)", child.slot, child.restarts)

    def _child_environment(self, child: _Child) -> dict[str, str]:
        env = {k: v for k, v in self._environ.items() if k not in _SYSTEMD_ENV}
        env["NOTIFY_SOCKET"] = child.notify_path
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        env.update(ProcessShare(child.slot, self.run_id).environment())
        return env

    async def _keep_serving(self, child: _Child) -> None:
        backoff = RESTART_MIN_S
        while not self._draining:
            if child.restarts:
                child.ready = trio.Event()  # the first one is what `run` waits for
            started = trio.current_time()
            # Forked on this thread, the main one, never on a Trio worker thread: the child's
            # parent-death signal (`_die_with_parent`) fires when the forking *thread* exits,
            # and Trio's worker threads exit after 10 s idle.
            child.process = subprocess.Popen(  # noqa: ASYNC220 - a few ms, rarely; see above
                [sys.executable, "-m", "reexec.daemon", *self.argv],
                env=self._child_environment(child),
                stdin=subprocess.DEVNULL,
            )
            log.info("process %d started (pid %d)", child.slot, child.process.pid)
            if self._draining:  # the drain began while it was being started
                _signal(child.process, signal.SIGTERM)
            try:
                code = await _wait(child.process)
            except BaseException:
                # Cancelled without a drain (another child failed to start): do not leave
                # this one serving on its own.
                _signal(child.process, signal.SIGTERM)
                raise
            if self._draining:
                return
            if not child.ready.is_set() and child.restarts == 0:
                raise ChildFailed(
                    f"process {child.slot} (pid {child.process.pid}) exited with "
                    f"{_describe(code)} before it was ready; see its log above"
                )
            if trio.current_time() - started >= STABLE_S:
                backoff = RESTART_MIN_S
            log.warning(
                "process %d (pid %d) exited unexpectedly with %s; restarting it in %.1f s",
                child.slot,
                child.process.pid,
                _describe(code),
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._drain_started.wait()
            backoff = min(backoff * 2, RESTART_MAX_S)
            child.restarts += 1

    async def drain(self) -> None:
        """SIGTERM to every child (each drains gracefully); wait, bounded, then kill the rest."""
        self._draining = True
        self._drain_started.set()
        live = [c.process for c in self._children if c.process and c.process.returncode is None]
        for proc in live:
            _signal(proc, signal.SIGTERM)
        limit = self.config.server.grace_period_s + DRAIN_MARGIN_S
        with trio.move_on_after(limit):
            for child in self._children:
                if child.process is not None:
                    await _wait(child.process)
        left = [c.process for c in self._children if c.process and c.process.returncode is None]
        if left:
            log.warning(
                "%d processes still running %.0f s after SIGTERM: killing them", len(left), limit
            )
            for proc in left:
                _signal(proc, signal.SIGKILL)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for proc in left:
                    await _wait(proc)
        for child in self._children:
            if child.process is not None and child.process.returncode not in (0, None):
                log.warning(
                    "process %d exited with %s while draining",
                    child.slot,
                    _describe(child.process.returncode),
                )

    def ready_message(self) -> str:
        return f"{self.processes} processes serving on {', '.join(self.config.server.listen)}"

    def stopping_message(self) -> str:
        return f"draining {self.processes} processes"

    def apply_reload(self, new: Config) -> list[str]:
        """SIGHUP to every child (each applies what it can and logs what needs a restart)."""
        for child in self._children:
            if child.process is not None and child.process.returncode is None:
                _signal(child.process, signal.SIGHUP)
        return ["server.processes"] if new.server.processes != self.processes else []


async def _wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc` to exit (its pidfd turns readable) and reap it; its exit status."""
    if proc.returncode is not None:
        return proc.returncode
    pidfd = os.pidfd_open(proc.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    if proc.returncode is None:
        # Popen.send_signal does nothing once the child is reaped, so never a reused pid.
        proc.send_signal(signum)


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


async def run_supervisor(config: Config, argv: Sequence[str], config_path: str | None) -> None:
    """Run N serving processes until SIGTERM/SIGINT has drained them all."""
    # The supervisor serves no status endpoint: child 0 serves the configured one.
    own = msgspec.structs.replace(
        config, status=msgspec.structs.replace(config.status, socket="", listen="")
    )
    supervisor = Supervisor(config, argv)
    await Lifecycle(own, config_path).run(supervisor)  # type: ignore[arg-type]
    log.info("reexecd supervisor stopped")


def as_child(config: Config, share: ProcessShare) -> None:
    """Adjust a child's configuration to its slot and make it follow its supervisor out."""
    if share.slot > 0:
        if config.status.socket:
            config.status.socket = f"{config.status.socket}.{share.slot}"
        config.status.listen = ""
    _die_with_parent()


def _die_with_parent() -> None:
    """SIGTERM this process when the supervisor dies (Linux prctl(PR_SET_PDEATHSIG)): an
    orphaned child would keep the port and the store without anyone to stop it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before prctl took effect
