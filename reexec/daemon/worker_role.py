"""The worker role (`reexecd worker`): runs actions for a remote scheduler.

trio.run(run_worker)
└─ trio-asyncio loop
   └─ Lifecycle.run                  reexec/daemon/lifecycle.py
      └─ WorkerRole.run
         └─ WorkerAgent.run          reexec/sandbox/agent.py: the scheduler stream and
                                     the action tasks; returns once drained

`worker.scheduler` may name several schedulers; the agent holds a stream to one at a time.
Without `worker.cas` the worker reads and writes blobs through the CAS of the scheduler it is
registered with: one channel per scheduler, switched when the agent connects elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio
import trio_asyncio
from grpclib.client import Channel

from reexec.cas.factory import build_store
from reexec.cas.store import Store
from reexec.daemon.channels import default_worker_id, read_token, scheduler_endpoints
from reexec.daemon.config import Config, ConfigError
from reexec.daemon.lifecycle import Lifecycle, changed_keys
from reexec.daemon.status import StatusSources
from reexec.sandbox.agent import SchedulerEndpoint, WorkerAgent
from reexec.sandbox.cas_access import CasAccess, GrpcAccess, LocalStoreAccess
from reexec.sandbox.factory import WorkerSetupError, build_worker

log = logging.getLogger(__name__)

# Set from the command line as well as the file, so a reload never reports them as changed.
_COMMAND_LINE_FIELDS = ("scheduler", "worker_id", "precondition_script")


class WorkerRole:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.status = StatusSources(role="worker")
        self.agent: WorkerAgent | None = None
        self._store: Store | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect to the scheduler and run actions; returns once the agent has drained."""
        config = self.config
        endpoints = scheduler_endpoints(config)
        cas_channels: dict[str, Channel] = {}
        try:
            for endpoint in endpoints:
                cas_channels[endpoint.url] = await endpoint.connect()
            worker_id = config.worker.worker_id or default_worker_id()
            access = await self._cas_access(cas_channels[endpoints[0].url], worker_id)
            try:
                self.agent = await build_worker(
                    config.worker, Path(config.data_dir), access, endpoints, worker_id
                )
            except WorkerSetupError as e:
                raise ConfigError(str(e)) from None
            if isinstance(access, GrpcAccess):

                def follow(endpoint: SchedulerEndpoint) -> None:
                    # Calls already under way finish (or fail) on the old channel.
                    access.channel = cas_channels[endpoint.url]

                self.agent.on_connected = follow
            if config.worker.token_file:
                self.agent.settings.token = await read_token(
                    config.worker.token_file, "worker.token_file"
                )
            self.status.agent = self.agent
            await self.agent.run(task_status=task_status)
        finally:
            for channel in cas_channels.values():
                channel.close()
            if self._store is not None:
                with trio.move_on_after(10, shield=True):
                    await self._store.aclose()

    async def _cas_access(self, cas_channel: Channel, worker_id: str) -> CasAccess:
        """The scheduler's CAS, or the store `worker.cas` names (storage nodes directly)."""
        wc = self.config.worker
        if wc.cas is None:
            return GrpcAccess(cas_channel, wc.instance_name, worker_id)
        self._store = await build_store(wc.cas, Path(self.config.data_dir))
        return LocalStoreAccess(self._store)

    async def drain(self) -> None:
        if self.agent is not None:
            await self.agent.drain()

    def ready_message(self) -> str:
        worker_id = self.agent.settings.worker_id if self.agent else "?"
        scheduler = self.config.worker.scheduler
        urls = scheduler if isinstance(scheduler, str) else ", ".join(scheduler)
        return f"worker {worker_id} for {urls}"

    def stopping_message(self) -> str:
        running = len(self.agent.running) if self.agent else 0
        return f"draining {running} running action(s)"

    def apply_reload(self, new: Config) -> list[str]:
        """Live: the precondition script. Other worker settings need a restart."""
        if self.agent is not None:
            self.agent.settings.precondition_script = new.worker.precondition_script
        old = self.config.worker
        old.precondition_script = new.worker.precondition_script
        fields = tuple(f for f in type(old).__struct_fields__ if f not in _COMMAND_LINE_FIELDS)
        return changed_keys(old, new.worker, fields, "worker.")


async def run_worker(config: Config, config_path: str | None = None) -> None:
    """`reexecd worker`: run actions for a remote scheduler until SIGINT/SIGTERM drains us."""
    async with trio_asyncio.open_loop():
        await Lifecycle(config, config_path).run(WorkerRole(config))  # type: ignore[arg-type]
    log.info("worker stopped")
