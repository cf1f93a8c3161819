"""Builds a worker (local cache, executor, agent) from its configuration."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from grpclib.client import Channel

from reexec.configtypes import parse_size
from reexec.sandbox.agent import AgentSettings, WorkerAgent
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.config import WorkerConfig, platform_pairs
from reexec.sandbox.executor import ActionExecutor, ExecutorSettings
from reexec.sandbox.local_cas import LocalCas
from reexec.sandbox.materialize import DirectoryCache
from reexec.sandbox.runner import NamespaceOptions, check_namespace_support


class WorkerSetupError(Exception):
    """The worker cannot run as configured (phrased for the user, naming the key)."""


def _under(data_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


async def build_worker(
    wc: WorkerConfig,
    data_dir: Path,
    access: CasAccess,
    channel_factory: Callable[[], Awaitable[Channel]],
    default_id: str,
) -> WorkerAgent:
    """A ready worker agent (its local cache scanned); `agent.run()` connects and works."""
    namespaces = NamespaceOptions(
        network=wc.sandbox.network, pid=wc.sandbox.pid, private_tmp=wc.sandbox.private_tmp
    )
    problem = check_namespace_support(namespaces)
    if problem:
        raise WorkerSetupError(
            f"worker.sandbox: the requested namespaces are not available: {problem}"
        )
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
            max_output_bytes=parse_size(wc.max_output_bytes),
            max_stdio_bytes=parse_size(wc.max_stdio_bytes),
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
