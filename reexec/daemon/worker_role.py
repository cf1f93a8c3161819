"""Builds and runs the worker side: local cache, executor, agent (from configuration)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio_asyncio
from grpclib.client import Channel

from reexec.daemon.config import Config, ConfigError, parse_size
from reexec.rpc import StatusDetailsCodec
from reexec.sandbox.agent import AgentSettings, WorkerAgent
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.executor import ActionExecutor, ExecutorSettings
from reexec.sandbox.local_cas import LocalCas
from reexec.sandbox.materialize import DirectoryCache
from reexec.sandbox.runner import NamespaceOptions, check_namespace_support

log = logging.getLogger(__name__)


def _under(data_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


def platform_pairs(platform: dict[str, str | list[str]]) -> list[tuple[str, str]]:
    out = []
    for name, value in sorted(platform.items()):
        for v in [value] if isinstance(value, str) else value:
            out.append((name, v))
    return out


async def build_worker(
    config: Config,
    access: CasAccess,
    channel_factory: Callable[[], Awaitable[Channel]],
    default_id: str,
) -> WorkerAgent:
    wc = config.worker
    data_dir = Path(config.data_dir)
    namespaces = NamespaceOptions(
        network=wc.sandbox.network, pid=wc.sandbox.pid, private_tmp=wc.sandbox.private_tmp
    )
    problem = check_namespace_support(namespaces)
    if problem:
        raise ConfigError(f"worker.sandbox: the requested namespaces are not available: {problem}")
    cache = LocalCas(_under(data_dir, wc.cache_directory), parse_size(wc.cache_max_bytes), access)
    await cache.start()
    worker_id = wc.worker_id or default_id
    executor = ActionExecutor(
        ExecutorSettings(
            work_directory=_under(data_dir, wc.work_directory),
            worker_id=worker_id,
            allow_absolute_symlinks=wc.sandbox.allow_absolute_symlinks,
            run_as=wc.sandbox.run_as,
            namespaces=namespaces,
            kill_grace_s=wc.sandbox.kill_grace_s,
            upload_timeout_s=wc.upload_timeout_s,
        ),
        cache,
        access,
        DirectoryCache(),
    )
    settings = AgentSettings(
        worker_id=worker_id,
        platform=platform_pairs(wc.platform),
        max_inflight=wc.max_inflight_tasks or max(1, os.cpu_count() or 1),
        precondition_script=wc.precondition_script,
        drain_timeout_s=wc.drain_timeout_s,
    )
    return WorkerAgent(settings, executor, channel_factory)


def scheduler_channel_factory(config: Config) -> Callable[[], Awaitable[Channel]]:
    """Connects to `worker.scheduler` (grpc:// or grpcs://)."""
    url = config.worker.scheduler
    if not url:
        raise ConfigError("worker.scheduler: required for `reexecd worker` (or pass --scheduler)")
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    ctx = None
    if scheme == "grpcs":
        ctx = ssl.create_default_context(cafile=config.worker.tls_ca)
        ctx.set_alpn_protocols(["h2"])

    async def make() -> Channel:
        async def inner() -> Channel:
            return Channel(
                host.strip("[]"), int(port), ssl=ctx, status_details_codec=StatusDetailsCodec()
            )

        return await trio_asyncio.aio_as_trio(inner)()

    return make


def unix_channel_factory(path: str) -> Callable[[], Awaitable[Channel]]:
    async def make() -> Channel:
        async def inner() -> Channel:
            return Channel(path=path, status_details_codec=StatusDetailsCodec())

        return await trio_asyncio.aio_as_trio(inner)()

    return make


def default_worker_id(suffix: str = "") -> str:
    return socket.gethostname() + suffix


async def run_worker(config: Config, config_path: str | None = None) -> None:
    """`reexecd worker`: run actions for a remote scheduler until SIGINT/SIGTERM drains us."""
    import signal

    import trio

    from reexec.daemon.app import start_status_endpoint
    from reexec.daemon.sdnotify import Notifier
    from reexec.daemon.status import StatusSources
    from reexec.sandbox.cas_access import GrpcAccess

    factory = scheduler_channel_factory(config)
    notifier = Notifier.from_environment()
    async with trio_asyncio.open_loop():
        cas_channel = await factory()
        try:
            # Signals are caught before anything else, so one that arrives while the worker
            # starts becomes a drain once it is up, never the default (fatal) action.
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                worker_id = config.worker.worker_id or default_worker_id()
                access = GrpcAccess(cas_channel, config.worker.instance_name, worker_id)
                agent = await build_worker(config, access, factory, worker_id)
                status = StatusSources(role="worker", agent=agent)

                async def drain() -> None:
                    status.draining = True
                    notifier.stopping(f"draining {len(agent.running)} running action(s)")
                    await agent.drain()

                async def watch() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            _reload_worker(agent, config, config_path, notifier)
                            continue
                        log.info("received %s: draining", signal.Signals(signum).name)
                        break
                    await drain()

                async with trio.open_nursery() as nursery:
                    status.drain_self = lambda: nursery.start_soon(drain)
                    await start_status_endpoint(nursery, config, status)
                    nursery.start_soon(watch)
                    nursery.start_soon(notifier.run_watchdog)
                    notifier.ready(
                        f"worker {agent.settings.worker_id} for {config.worker.scheduler}"
                    )
                    # Returns once drained, by a signal or at the scheduler's request.
                    await agent.run()
                    nursery.cancel_scope.cancel()
        finally:
            cas_channel.close()
    log.info("worker stopped")


def _reload_worker(agent: WorkerAgent, config: Config, config_path: str | None, notifier) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP on a worker: log settings and the precondition script change at run time."""
    from reexec.daemon.config import load_config
    from reexec.daemon.logs import setup_logging

    notifier.reloading()
    try:
        new = load_config(config_path)
    except ConfigError as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        notifier.ready("reload failed; running configuration unchanged")
        return
    setup_logging(new.log.level, new.log.format)
    agent.settings.precondition_script = new.worker.precondition_script
    others = [
        k
        for k in type(new.worker).__struct_fields__
        if k not in ("precondition_script", "scheduler", "worker_id")
        and getattr(new.worker, k) != getattr(config.worker, k)
    ]
    config.log = new.log
    config.worker.precondition_script = new.worker.precondition_script
    if others:
        log.warning("reloaded; these changes need a restart: worker.%s", ", worker.".join(others))
    else:
        log.info("configuration reloaded")
    notifier.ready("configuration reloaded")
