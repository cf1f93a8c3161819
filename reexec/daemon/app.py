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
from reexec.daemon.config import Config, SchedulerConfig, parse_size
from reexec.daemon.grpc_server import GrpcServer, make_ssl_context
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

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]


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
            OperationsService(scheduler),
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
        ByteStreamService(cas, instances=s.instances, uploads=uploads),
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
                daemon = Daemon(config, cas, ac, server, services, scheduler, agent)
                if handle_signals:
                    nursery.start_soon(_watch_signals, daemon, nursery)
                log.info("reexecd ready", extra={"pid": os.getpid(), "data_dir": config.data_dir})
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


async def _watch_signals(daemon: Daemon, nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: draining", signal.Signals(signum).name)
            break
    # Client RPCs first (Execute streams keep waiting for their actions, which the local
    # worker still runs), then the worker itself.
    await daemon.server.drain(daemon.config.server.grace_period_s, close=False)
    if daemon.agent is not None:
        await daemon.agent.drain()
    await daemon.server.close()
    nursery.cancel_scope.cancel()
