"""Builds a worker (local cache, executor, agent) from its configuration."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import trio

from reexec.configtypes import parse_size
from reexec.sandbox.action_confinement import (
    Confinement,
    outermost,
    own_platform,
    parse_ro_binds,
)
from reexec.sandbox.agent import AgentSettings, ChannelFactory, SchedulerEndpoint, WorkerAgent
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.config import WorkerConfig, platform_pairs
from reexec.sandbox.confine import ConfineMode
from reexec.sandbox.confine_setup import (
    become_subreaper,
    confinement_problem,
    find_bwrap,
    host_user,
    make_searchable,
)
from reexec.sandbox.executor import ActionExecutor, ExecutorSettings
from reexec.sandbox.local_cas import LocalCas
from reexec.sandbox.materialize import DirectoryCache
from reexec.sandbox.runner import NamespaceOptions, check_namespace_support
from reexec.worker_protocol import LocalLink


class WorkerSetupError(Exception):
    """The worker cannot run as configured (phrased for the user, naming the key)."""


def _under(data_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


async def build_worker(
    wc: WorkerConfig,
    data_dir: Path,
    access: CasAccess,
    schedulers: Sequence[SchedulerEndpoint] | ChannelFactory | LocalLink,
    default_id: str,
) -> WorkerAgent:
    """A ready worker agent (its local cache scanned); `agent.run()` connects and works, to
    `schedulers` in turn (or the one scheduler a bare channel factory or in-process link
    reaches)."""
    confinement = await trio.to_thread.run_sync(
        _confinement,
        wc,
        _under(data_dir, wc.work_directory),
        # Hidden from actions in host mode: the CAS, other actions' inputs, tokens.
        outermost(
            [
                str(data_dir),
                str(_under(data_dir, wc.work_directory)),
                str(_under(data_dir, wc.cache_directory)),
            ]
        ),
    )
    run_as = wc.sandbox.run_as
    if confinement is not None and confinement.user is not None:
        run_as = str(confinement.user.uid)  # the executor hands the input dirs to this user
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
            run_as=run_as,
            namespaces=namespaces,
            confinement=confinement,
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
        platform=platform_pairs(
            {**own_platform(ConfineMode(wc.sandbox.confinement)), **wc.platform}
        ),
        max_inflight=wc.max_inflight_tasks or max(1, os.cpu_count() or 1),
        precondition_script=wc.precondition_script,
        drain_timeout_s=wc.drain_timeout_s,
    )
    return WorkerAgent(settings, executor, schedulers)


def _confinement(
    wc: WorkerConfig, work_directory: Path, hidden: tuple[str, ...] = ()
) -> Confinement | None:
    """The confinement policy, checked for real (bwrap run once as the action user); blocking."""
    mode = ConfineMode(wc.sandbox.confinement)
    if mode is ConfineMode.OFF:
        return None
    key = f"worker.sandbox.confinement = {mode.value!r}"
    off = (
        '; set worker.sandbox.confinement = "off" to run actions unconfined (with the '
        "worker's privileges on the host's file system)"
    )
    try:
        user = host_user(wc.sandbox.run_as)
        ro_binds = parse_ro_binds(wc.sandbox.input_root_ro_binds)
    except ValueError as e:
        raise WorkerSetupError(f"{key}: worker.sandbox: {e}") from None
    bwrap = find_bwrap()
    become_subreaper()  # bwrap's PID 1 may outlive bwrap: this worker reaps it
    problem = confinement_problem(bwrap, user)
    if problem is not None or bwrap is None:
        raise WorkerSetupError(f"{key}: actions cannot be confined here: {problem}{off}")
    if user is not None:
        try:
            work_directory.mkdir(parents=True, exist_ok=True)
            make_searchable(work_directory.absolute())
        except PermissionError as e:
            raise WorkerSetupError(f"{key}: {e}") from None
    return Confinement(
        mode=mode,
        bwrap=bwrap,
        user=user,
        ro_binds=ro_binds,
        allow_network=not wc.sandbox.network,
        hidden=hidden,
    )
