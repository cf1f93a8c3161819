"""The server roles (`reexecd serve`, `scheduler` and `storage`): stores, gRPC services, the
scheduler (not in `storage`) and, in `serve`, a local worker.

    trio.run(run_daemon)
    └─ trio-asyncio loop                 grpclib's servers and clients run on it
       └─ Lifecycle.run                  reexec/daemon/lifecycle.py: signals, drain, reload,
          │                              sd_notify, status endpoint
          └─ Daemon.run
             ├─ Scheduler.run            reexec/sched/scheduler.py (when the scheduler is on)
             ├─ UploadTable.run_expiry   discards idle resumable ByteStream uploads
             ├─ LocalLink.run            serve only: the local worker's in-process Connect
             │                           streams, each served by WorkerService.serve
             └─ WorkerAgent.run          reexec/sandbox/agent.py (serve only)

The grpclib servers are not tasks of this tree: their handlers are asyncio tasks on the
trio-asyncio loop that cross into Trio once per RPC. `RpcGate` counts them, so a drain can wait
for them, and `GrpcServer.close()` cancels what is left.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio_asyncio
import xxhash

from reexec.cas.ac_service import ActionCacheService
from reexec.cas.action_cache import ActionCache
from reexec.cas.asset_service import AssetService
from reexec.cas.bytestream_service import ByteStreamService, UploadTable
from reexec.cas.capabilities_service import CapabilitiesService
from reexec.cas.cas_service import CasService
from reexec.cas.factory import build_action_cache, build_store
from reexec.cas.grpc_store import ChannelFactory
from reexec.cas.store import Store
from reexec.daemon.channels import default_worker_id, read_token, unix_channel_factory
from reexec.daemon.config import Config, ConfigError, WorkerConfig, parse_size
from reexec.daemon.grpc_server import GrpcServer, make_ssl_context
from reexec.daemon.lifecycle import Lifecycle, changed_keys
from reexec.daemon.status import StatusSources
from reexec.daemon.web.links import failure_link
from reexec.rpc import RpcGate, Servable, Service
from reexec.sandbox.agent import WorkerAgent
from reexec.sandbox.cas_access import LocalStoreAccess
from reexec.sandbox.factory import WorkerSetupError, build_worker
from reexec.sched.journal import Journal
from reexec.sched.scheduler import Scheduler
from reexec.sched.service import ExecutionService, OperationsService
from reexec.sched.state_factory import build_state_store
from reexec.sched.worker_service import WorkerService
from reexec.worker_protocol import LocalLink

log = logging.getLogger(__name__)

# Closing stores flushes indexes and removes temp files; bounded so a stuck disk cannot keep a
# stopping daemon alive forever (systemd would SIGKILL it anyway).
CLOSE_TIMEOUT_S = 30.0


async def open_stores(config: Config) -> tuple[Store, ActionCache]:
    data_dir = Path(config.data_dir)
    await trio.to_thread.run_sync(lambda: data_dir.mkdir(parents=True, exist_ok=True))
    cas = await build_store(config.cas, data_dir)
    ac = await build_action_cache(config.action_cache, data_dir, cas)
    return cas, ac


def build_services(
    config: Config,
    cas: Store,
    ac: ActionCache,
    uploads: UploadTable,
    scheduler: Scheduler | None = None,
    worker_token: str | None = None,
) -> list[Service]:
    s = config.server
    max_batch = parse_size(s.max_batch_total_size_bytes)
    scheduling: list[Service] = []
    if scheduler is not None:
        scheduling = [
            ExecutionService(
                scheduler,
                cas,
                instances=s.instances,
                message_suffix=failure_link(config.status.base_url),
            ),
            OperationsService(scheduler, allow_list=s.allow_list_operations),
            WorkerService(scheduler, cas, token=worker_token),
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
        # Remote Asset API (BuildStream's artifact and source caches); pushes follow the AC's
        # update policy, since both let a client name content for others.
        *AssetService(cas, instances=s.instances, allow_push=s.ac_allow_updates).services(),
        *scheduling,
    ]


def _worker_socket_path(data_dir: Path) -> str:
    path = str(data_dir.resolve() / "worker.sock")
    if len(path) > 100:  # AF_UNIX paths are limited to about 108 bytes
        tag = xxhash.xxh64_hexdigest(path)
        path = os.path.join(tempfile.gettempdir(), f"reexec-{tag}.sock")
    return path


class Daemon:
    """The server role. Its parts exist once `run` has started (tests read them)."""

    # How `serve`'s worker reaches the scheduler: "memory" (a LocalLink, no gRPC) or "unix"
    # (gRPC over a private unix socket, as before the link; kept for the tests comparing the
    # two).
    worker_link = "memory"

    def __init__(self, config: Config, *, local_worker: bool, role: str | None = None) -> None:
        self.config = config
        self.with_scheduler = config.scheduler.enabled
        self.with_worker = local_worker and self.with_scheduler and config.worker.enabled
        self.status = StatusSources(role=role or ("serve" if local_worker else "scheduler"))
        self.cas: Store
        self.ac: ActionCache
        self.server: GrpcServer | None = None
        self.services: list[Service] = []
        self.scheduler: Scheduler | None = None
        self.agent: WorkerAgent | None = None

    @property
    def port(self) -> int:
        assert self.server is not None, "Daemon.run has not started"
        return self.server.addresses[0][1]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the stores, serve, and run the scheduler and local worker until cancelled."""
        config = self.config
        self.cas, self.ac = await open_stores(config)
        uploads = UploadTable(config.server.upload_idle_timeout_s)
        try:
            await self._serve(uploads, task_status)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                if self.server is not None:
                    await self.server.close()
                await uploads.abort_all()
                await self.cas.aclose()
                await self.ac.aclose()

    async def _serve(self, uploads: UploadTable, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        if self.with_scheduler:
            self.scheduler = Scheduler(
                config.scheduler, self.ac, build_state_store(config.scheduler.state)
            )
            # The web UI's memory of recent operations, fed by every transition.
            self.status.journal = Journal(
                max_operations=config.status.journal_operations, wall=self.scheduler.wall
            )
            self.scheduler.observers.append(self.status.journal.observe)
        worker_token = await self._worker_token()
        self.services = build_services(
            config, self.cas, self.ac, uploads, self.scheduler, worker_token
        )
        tls = config.server.tls
        use_unix = self.with_worker and self.worker_link == "unix"
        unix_path = _worker_socket_path(Path(config.data_dir)) if use_unix else None
        self.server = server = GrpcServer(
            Servable(self.services, RpcGate()),
            config.server.listen,
            ssl_context=make_ssl_context(tls) if tls else None,
            unix_path=unix_path,
            settings=config.server,
        )
        async with trio.open_nursery() as nursery:
            if self.scheduler is not None:
                await nursery.start(self.scheduler.run)
            await server.start()
            nursery.start_soon(uploads.run_expiry)
            if self.with_worker:
                link: LocalLink | ChannelFactory
                if unix_path is not None:
                    link = unix_channel_factory(unix_path)
                else:
                    link = LocalLink()
                    workers = next(s for s in self.services if isinstance(s, WorkerService))
                    await nursery.start(link.run, workers.serve)
                self.agent = await self._build_local_worker(link)
                self.agent.settings.token = worker_token
                await nursery.start(self.agent.run)
            self._describe_status()
            log.info("reexecd ready", extra={"pid": os.getpid(), "data_dir": config.data_dir})
            task_status.started()

    async def _worker_token(self) -> str | None:
        """The secret workers must present to register, or None if any worker may."""
        if not self.with_scheduler:
            return None
        path = self.config.scheduler.worker_token_file
        if path:
            return await read_token(path, "scheduler.worker_token_file")
        if self.with_worker:
            return secrets.token_urlsafe(32)  # only the local worker knows it
        log.warning(
            "any client can register as a worker (WorkerApi.Connect): set "
            "scheduler.worker_token_file, and worker.token_file on the workers"
        )
        return None

    async def _build_local_worker(self, link: LocalLink | ChannelFactory) -> WorkerAgent:
        try:
            return await build_worker(
                self.config.worker,
                Path(self.config.data_dir),
                LocalStoreAccess(self.cas),
                link,
                default_worker_id("-local"),
            )
        except WorkerSetupError as e:
            raise ConfigError(str(e)) from None

    def _describe_status(self) -> None:
        s = self.status
        s.listen = [f"{h}:{p}" for h, p in self.server.addresses]
        s.cas, s.ac, s.services = self.cas, self.ac, self.services
        s.scheduler, s.agent = self.scheduler, self.agent
        s.gate = self.server.gate if self.server is not None else None

    async def drain(self) -> None:
        """Refuse new client RPCs, let in-flight ones (and the actions they wait for) finish
        within the grace period, drain the local worker, then close the servers."""
        assert self.server is not None
        await self.server.drain(self.config.server.grace_period_s, close=False)
        if self.agent is not None:
            await self.agent.drain()
        await self.server.close()

    def ready_message(self) -> str:
        slots = (
            f" with a local worker ({self.agent.settings.max_inflight} slots)" if self.agent else ""
        )
        return f"serving on {', '.join(self.status.listen)}{slots}"

    def stopping_message(self) -> str:
        inflight = self.server.gate.inflight if self.server is not None else 0
        return f"draining {inflight} RPCs"

    def apply_reload(self, new: Config) -> list[str]:
        """Live: the local worker's precondition script. Everything else needs a restart."""
        old = self.config
        if self.agent is not None:
            self.agent.settings.precondition_script = new.worker.precondition_script
        old.worker.precondition_script = new.worker.precondition_script
        sections = ("server", "cas", "action_cache", "scheduler", "status", "data_dir")
        worker_fields = tuple(
            f for f in WorkerConfig.__struct_fields__ if f != "precondition_script"
        )
        return changed_keys(old, new, sections) + changed_keys(
            old.worker, new.worker, worker_fields, "worker."
        )


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    local_worker: bool = True,
    config_path: str | None = None,
    role: str | None = None,
) -> None:
    """Run the server role until cancelled or, with `handle_signals`, until SIGINT/SIGTERM (or
    POST /drain) has drained it.

    `local_worker` (the `serve` role) also runs a worker in this process, connected to the
    scheduler through an in-process link (the worker protocol's messages over memory channels,
    no gRPC) and to the CAS in process (hardlinks, no copies).
    `role` names the role in status and logs (`storage`: a node with the scheduler off).
    """
    async with _asyncio_loop():
        daemon = Daemon(config, local_worker=local_worker, role=role)
        lifecycle = Lifecycle(config, config_path, handle_signals=handle_signals)
        await lifecycle.run(daemon, task_status=task_status)  # type: ignore[arg-type]
    log.info("reexecd stopped")


@asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop grpclib runs on: the caller's if it has one (tests), else ours."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield
