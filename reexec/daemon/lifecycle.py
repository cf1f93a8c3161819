"""One lifecycle for every role (`serve`, `scheduler`, `worker`): signals, drain, reload,
sd_notify and the status endpoint.

    Lifecycle.run(role)
    └─ nursery
       ├─ _watch_signals           SIGHUP -> reload; SIGINT/SIGTERM -> request_drain()
       ├─ _run_role                role.run(): the role's own tree (see app.py, worker_role.py);
       │                           when it returns by itself (a worker drained at its
       │                           scheduler's request) the lifecycle ends
       ├─ run_status_server        hypercorn: /status, /metrics, /healthz, /readyz, /drain
       ├─ Notifier.run_watchdog    sd_notify WATCHDOG=1
       └─ _drain_when_requested    waits for request_drain() (a signal or POST /drain), then
                                   role.drain(), then cancels the nursery

Signals are caught from before the role starts, so a SIGTERM during start-up is a drain once the
role is up, never the default (fatal) action.
"""

from __future__ import annotations

import logging
import signal
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import trio

from reexec.daemon import tuning
from reexec.daemon.config import Config, ConfigError, load_config
from reexec.daemon.logs import setup_logging
from reexec.daemon.sdnotify import Notifier
from reexec.daemon.status import StatusSources, run_status_server

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Role(Protocol):
    """What a daemon role gives its lifecycle."""

    status: StatusSources

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Start, call `task_status.started()` once serving, then run until cancelled or done."""

    async def drain(self) -> None:
        """Finish in-flight work gracefully (bounded by the role's own grace periods)."""

    def ready_message(self) -> str: ...

    def stopping_message(self) -> str: ...

    def apply_reload(self, new: Config) -> list[str]:
        """Apply what can change at run time; return the keys that changed but need a restart."""


class Lifecycle:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        *,
        handle_signals: bool = True,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.handle_signals = handle_signals
        self.notifier = notifier or Notifier.from_environment()
        self._drain_requested = trio.Event()
        self._ready = trio.Event()

    def request_drain(self) -> None:
        """Ask for a graceful stop; returns at once (the drain runs in the lifecycle's tree)."""
        self._drain_requested.set()

    async def run(
        self, role: Role, *, task_status: trio.TaskStatus[Role] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `role` under signals, status endpoint and watchdog until it is drained or ends."""
        receiver: AbstractContextManager[trio.abc.ReceiveChannel[int] | None] = (
            trio.open_signal_receiver(*_SIGNALS) if self.handle_signals else nullcontext()
        )
        with receiver as signals:
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(self._watch_signals, signals, role)
                await nursery.start(self._run_role, role, nursery.cancel_scope)
                role.status.drain_self = self.request_drain
                await self._start_status_endpoint(nursery, role.status)
                nursery.start_soon(self.notifier.run_watchdog)
                nursery.start_soon(self._drain_when_requested, role, nursery.cancel_scope)
                self._ready.set()
                tuning.freeze_startup_objects()
                self.notifier.ready(role.ready_message())
                task_status.started(role)

    async def _run_role(
        self,
        role: Role,
        lifecycle_scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await role.run(task_status=task_status)
        # The role finished by itself: nothing is left to serve.
        lifecycle_scope.cancel()

    async def _drain_when_requested(self, role: Role, lifecycle_scope: trio.CancelScope) -> None:
        await self._drain_requested.wait()
        role.status.draining = True
        self.notifier.stopping(role.stopping_message())
        await role.drain()
        lifecycle_scope.cancel()

    async def _watch_signals(self, signals: trio.abc.ReceiveChannel[int], role: Role) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self._ready.is_set():
                    self.reload(role)
                else:
                    log.info("SIGHUP while starting: ignored")
                continue
            if not self._drain_requested.is_set():
                log.info("received %s: draining", signal.Signals(signum).name)
            self.request_drain()

    def reload(self, role: Role) -> None:
        """SIGHUP: re-read the file, apply what can change at run time (log settings, and what
        the role applies) and say plainly which changes need a restart."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            self.notifier.ready("reload failed; running configuration unchanged")
            return
        setup_logging(new.log.level, new.log.format)
        self.config.log = new.log
        needs_restart = role.apply_reload(new)
        if needs_restart:
            log.warning(
                "reloaded the log settings and what applies at run time; "
                "these changes need a restart: %s",
                ", ".join(needs_restart),
            )
        else:
            log.info("configuration reloaded")
        self.notifier.ready("configuration reloaded")

    async def _start_status_endpoint(self, nursery: trio.Nursery, sources: StatusSources) -> None:
        sc = self.config.status
        sources.settings = sc
        socket_path = None
        if sc.socket:
            p = Path(sc.socket)
            socket_path = str(p if p.is_absolute() else Path(self.config.data_dir) / p)
            if len(socket_path) > 100:  # AF_UNIX paths are limited to about 108 bytes
                log.warning(
                    "status socket path %s is too long for AF_UNIX; not serving it", socket_path
                )
                socket_path = None
        if socket_path or sc.listen:
            await nursery.start(
                run_status_server, sources, socket_path, int(sc.socket_mode, 8), sc.listen
            )


def changed_keys(old: object, new: object, fields: tuple[str, ...], prefix: str = "") -> list[str]:
    """The names of `fields` whose values differ between two config sections."""
    return [prefix + f for f in fields if getattr(new, f) != getattr(old, f)]
