"""The daemon's nursery tree: stores, gRPC services, background tasks, signal handling.

trio.run(serve)
└─ trio_asyncio loop (grpclib runs on it)
   └─ nursery
      ├─ GrpcServer (grpclib servers; handlers cross into Trio once per RPC)
      ├─ UploadTable.run_expiry (discards idle resumable uploads)
      └─ signal watcher: SIGINT/SIGTERM -> drain -> cancel the nursery
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio_asyncio
import xxhash

from reexec.cas.ac_service import ActionCacheService
from reexec.cas.action_cache import ActionCache
from reexec.cas.bytestream_service import ByteStreamService, UploadTable
from reexec.cas.capabilities_service import CapabilitiesService
from reexec.cas.cas_service import CasService
from reexec.cas.factory import build_action_cache, build_store
from reexec.cas.store import Store
from reexec.daemon.config import (
    Config,
    ConfigError,
    SchedulerConfig,
    WorkerConfig,
    load_config,
    parse_size,
)
from reexec.daemon.grpc_server import GrpcServer, make_ssl_context
from reexec.daemon.logs import setup_logging
from reexec.daemon.sdnotify import Notifier
from reexec.daemon.status import StatusSources, run_status_server
from reexec.daemon.worker_role import build_worker, default_worker_id, unix_channel_factory
from reexec.rpc import RpcGate, Servable, Service
from reexec.sandbox.agent import WorkerAgent
from reexec.sandbox.cas_access import LocalStoreAccess
from reexec.sched.matching import PropertyModifier
from reexec.sched.scheduler import Scheduler, SchedulerSettings
from reexec.sched.service import ExecutionService, OperationsService
from reexec.sched.worker_service import WorkerService

log = logging.getLogger(__name__)


@dataclass
class Daemon:
    """What a running daemon exposes to its caller (tests, the status endpoint)."""

    config: Config
    cas: Store
    ac: ActionCache
    server: GrpcServer
    services: list[Service] = field(default_factory=list)
    scheduler: Scheduler | None = None
    agent: WorkerAgent | None = None
    status: StatusSources | None = None
    notifier: Notifier = field(default_factory=Notifier.from_environment)
    nursery: trio.Nursery | None = None
    _drained: trio.Event = field(default_factory=trio.Event)
    _draining: bool = False

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    async def drain(self) -> None:
        """Graceful stop: refuse new client RPCs, let in-flight ones (and the actions they wait
        for) finish within the grace period, drain the local worker, then stop."""
        if self._draining:
            await self._drained.wait()
            return
        self._draining = True
        if self.status is not None:
            self.status.draining = True
        self.notifier.stopping(f"draining {self.server.gate.inflight} RPCs")
        await self.server.drain(self.config.server.grace_period_s, close=False)
        if self.agent is not None:
            await self.agent.drain()
        await self.server.close()
        self._drained.set()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()


async def open_stores(config: Config) -> tuple[Store, ActionCache]:
    data_dir = Path(config.data_dir)
    await trio.to_thread.run_sync(lambda: data_dir.mkdir(parents=True, exist_ok=True))
    cas = await build_store(config.cas, data_dir)
    ac = await build_action_cache(config.action_cache, data_dir, cas)
    return cas, ac


def scheduler_settings(c: SchedulerConfig) -> SchedulerSettings:
    modifiers = []
    for m in c.property_modifier:
        if m.add is not None:
            modifiers.append(PropertyModifier("add", m.add.name, m.add.value))
        elif m.replace is not None:
            modifiers.append(PropertyModifier("replace", m.replace.name, m.replace.value))
        elif m.remove is not None:
            modifiers.append(PropertyModifier("remove", m.remove))
    return SchedulerSettings(
        rules=dict(c.supported_platform_properties),
        modifiers=tuple(modifiers),
        allocation=c.allocation_strategy,
        worker_timeout_s=c.worker_timeout_s,
        client_action_timeout_s=c.client_action_timeout_s,
        max_action_executing_timeout_s=c.max_action_executing_timeout_s,
        retain_completed_for_s=c.retain_completed_for_s,
        max_job_retries=c.max_job_retries,
        max_action_timeout_s=c.max_action_timeout_s,
        default_action_timeout_s=c.default_action_timeout_s,
    )


def build_services(
    config: Config,
    cas: Store,
    ac: ActionCache,
    uploads: UploadTable,
    scheduler: Scheduler | None = None,
) -> list[Service]:
    s = config.server
    max_batch = parse_size(s.max_batch_total_size_bytes)
    scheduling: list[Service] = []
    if scheduler is not None:
        scheduling = [
            ExecutionService(scheduler, cas, instances=s.instances),
            OperationsService(scheduler, allow_list=s.allow_list_operations),
            WorkerService(scheduler, cas),
        ]
    return [
        CapabilitiesService(
            instances=s.instances,
            max_batch_total_size_bytes=max_batch,
            exec_enabled=scheduler is not None,
            ac_update_enabled=s.ac_allow_updates,
        ),
        CasService(cas, instances=s.instances, max_batch_total_size_bytes=max_batch),
        ByteStreamService(
            cas, instances=s.instances, uploads=uploads, max_open_uploads=s.max_open_uploads
        ),
        ActionCacheService(
            ac,
            cas,
            instances=s.instances,
            max_inline_bytes=parse_size(s.max_inline_bytes),
            allow_updates=s.ac_allow_updates,
        ),
        *scheduling,
    ]


def _worker_socket_path(data_dir: Path) -> str:
    path = str(data_dir.resolve() / "worker.sock")
    if len(path) > 100:  # AF_UNIX paths are limited to about 108 bytes
        tag = xxhash.xxh64_hexdigest(path)
        path = os.path.join(tempfile.gettempdir(), f"reexec-{tag}.sock")
    return path


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    local_worker: bool = True,
    config_path: str | None = None,
) -> None:
    """Run until cancelled or, with `handle_signals`, until SIGINT/SIGTERM has drained us.

    `local_worker` (the `serve` role) also runs a worker in this process, connected to the
    scheduler through a private unix socket and to the CAS in process (hardlinks, no copies).
    """
    async with _asyncio_loop():
        cas, ac = await open_stores(config)
        uploads = UploadTable(config.server.upload_idle_timeout_s)
        scheduler = (
            Scheduler(scheduler_settings(config.scheduler), ac)
            if config.scheduler.enabled
            else None
        )
        services = build_services(config, cas, ac, uploads, scheduler)
        tls = config.server.tls
        with_worker = local_worker and scheduler is not None and config.worker.enabled
        unix_path = _worker_socket_path(Path(config.data_dir)) if with_worker else None
        server = GrpcServer(
            Servable(services, RpcGate()),
            config.server.listen,
            ssl_context=make_ssl_context(tls) if tls else None,
            unix_path=unix_path,
        )
        agent: WorkerAgent | None = None
        try:
            async with trio.open_nursery() as nursery:
                # Signals are caught from before the port is bound: a SIGTERM that arrives while
                # we start is a drain once we are up, never the default (fatal) action.
                started: trio.Event = trio.Event()
                handle: dict[str, Daemon] = {}
                if handle_signals:
                    await nursery.start(_watch_signals, handle, started, config_path)
                if scheduler is not None:
                    await nursery.start(scheduler.run)
                await server.start()
                nursery.start_soon(uploads.run_expiry)
                if with_worker:
                    assert unix_path is not None
                    agent = await build_worker(
                        config,
                        LocalStoreAccess(cas),
                        unix_channel_factory(unix_path),
                        default_worker_id("-local"),
                    )
                    await nursery.start(agent.run)
                daemon = Daemon(
                    config, cas, ac, server, services, scheduler, agent, nursery=nursery
                )
                daemon.status = StatusSources(
                    role="serve" if local_worker else "scheduler",
                    listen=[f"{h}:{p}" for h, p in server.addresses],
                    cas=cas,
                    ac=ac,
                    services=services,
                    scheduler=scheduler,
                    agent=agent,
                    gate=server.gate,
                    drain_self=lambda: nursery.start_soon(daemon.drain),
                )
                await start_status_endpoint(nursery, config, daemon.status)
                handle["daemon"] = daemon
                started.set()
                nursery.start_soon(daemon.notifier.run_watchdog)
                log.info("reexecd ready", extra={"pid": os.getpid(), "data_dir": config.data_dir})
                daemon.notifier.ready(
                    f"serving on {', '.join(daemon.status.listen)}"
                    + (
                        f" with a local worker ({agent.settings.max_inflight} slots)"
                        if agent
                        else ""
                    )
                )
                task_status.started(daemon)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await server.close()
                await uploads.abort_all()
                await cas.aclose()
                await ac.aclose()
    log.info("reexecd stopped")


@asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop grpclib runs on: the caller's if it has one (tests), else ours."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield


async def start_status_endpoint(
    nursery: trio.Nursery, config: Config, sources: StatusSources
) -> None:
    sc = config.status
    socket_path = None
    if sc.socket:
        p = Path(sc.socket)
        socket_path = str(p if p.is_absolute() else Path(config.data_dir) / p)
        if len(socket_path) > 100:
            log.warning(
                "status socket path %s is too long for AF_UNIX; not serving it", socket_path
            )
            socket_path = None
    if socket_path or sc.listen:
        await nursery.start(
            run_status_server, sources, socket_path, int(sc.socket_mode, 8), sc.listen
        )


async def _watch_signals(
    handle: dict[str, Daemon],
    started: trio.Event,
    config_path: str | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                if started.is_set():
                    reload_config(handle["daemon"], config_path)
                continue
            log.info("received %s: draining", signal.Signals(signum).name)
            break
    await started.wait()
    await handle["daemon"].drain()


def reload_config(daemon: Daemon, config_path: str | None) -> None:
    """SIGHUP: apply what can change at run time (log level and format, the worker's
    precondition script); say clearly that everything else needs a restart."""
    daemon.notifier.reloading()
    try:
        new = load_config(config_path)
    except ConfigError as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        daemon.notifier.ready("reload failed; running configuration unchanged")
        return
    old = daemon.config
    setup_logging(new.log.level, new.log.format)
    if daemon.agent is not None:
        daemon.agent.settings.precondition_script = new.worker.precondition_script
    changed = [
        key
        for key in ("server", "cas", "action_cache", "scheduler", "status", "data_dir")
        if getattr(new, key) != getattr(old, key)
    ]
    worker_changed = [
        k
        for k in WorkerConfig.__struct_fields__
        if k != "precondition_script" and getattr(new.worker, k) != getattr(old.worker, k)
    ]
    if worker_changed:
        changed.append("worker." + "/".join(worker_changed))
    old.log = new.log
    old.worker.precondition_script = new.worker.precondition_script
    if changed:
        log.warning(
            "reloaded log settings and the precondition script; these changes need a restart: %s",
            ", ".join(changed),
        )
    else:
        log.info("configuration reloaded")
    daemon.notifier.ready("configuration reloaded")
