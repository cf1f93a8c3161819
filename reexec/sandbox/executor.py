"""Runs one StartExecute: inputs, command, outputs, and the Finished report.

    fetch inputs -> materialise -> run (cancel scope = action timeout) -> tamper check
        -> collect outputs -> upload -> Finished
The work directory is removed afterwards whatever happened. User errors (missing inputs,
invalid trees, non-zero exit, timeout) are final; infrastructure errors are reported retryable
so the scheduler tries another worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from google.protobuf.message import DecodeError
from grpclib.const import Status

from reexec import fastpb
from reexec.cas.digest import DigestFunction, make_digest
from reexec.errors import InvalidArgument, ReexecError, missing_blobs_error
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.local_cas import LocalCas, MissingInputs
from reexec.sandbox.materialize import (
    DirectoryCache,
    InputTree,
    load_directories,
    materialize_sync,
    plan_tree,
    prepare_outputs_sync,
)
from reexec.sandbox.outputs import CollectedOutputs, collect_outputs_sync, log_blob_sync
from reexec.sandbox.runner import NamespaceOptions, RunRequest, run_command

log = logging.getLogger(__name__)

WorkerMessage = fastpb.message_class("reexec.worker.v1.WorkerMessage")

FETCHING, EXECUTING, UPLOADING = 1, 2, 3


@dataclass
class ExecutorSettings:
    work_directory: Path
    worker_id: str
    allow_absolute_symlinks: bool = False
    run_as: str | None = None
    namespaces: NamespaceOptions = field(default_factory=NamespaceOptions)
    kill_grace_s: float = 5.0
    upload_timeout_s: float = 600.0


@dataclass
class ExecutorStats:
    actions: int = 0
    materialize_seconds: float = 0.0
    links: int = 0
    copies: int = 0
    upload_bytes: int = 0
    upload_seconds: float = 0.0
    tampered: int = 0


class _Retryable(Exception):
    pass


def _ts(msg: fastpb.Message, seconds: float) -> None:
    msg.FromNanoseconds(int(seconds * 1e9))


class ActionExecutor:
    def __init__(
        self, settings: ExecutorSettings, cache: LocalCas, access: CasAccess, dirs: DirectoryCache
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.access = access
        self.dirs = dirs
        self.stats = ExecutorStats()

    async def start(self) -> None:
        """Remove work directories left by an earlier run of this worker."""
        wd = self.settings.work_directory

        def clean() -> None:
            if wd.exists():
                for child in wd.iterdir():
                    _force_remove(child)
            wd.mkdir(parents=True, exist_ok=True)

        await trio.to_thread.run_sync(clean)

    async def execute(
        self, start: fastpb.Message, progress: Callable[[int], Awaitable[None]]
    ) -> fastpb.Message:
        """Run the action; returns the WorkerMessage carrying its Finished report."""
        msg = WorkerMessage()
        finished = msg.finished
        finished.operation_name = start.operation_name
        finished.attempt = start.attempt
        result = finished.result
        meta = result.execution_metadata
        meta.worker = self.settings.worker_id
        meta.queued_timestamp.CopyFrom(start.queued_timestamp)
        _ts(meta.worker_start_timestamp, time.time())
        base = self.settings.work_directory / f"{start.operation_name}-{start.attempt}"
        self.stats.actions += 1
        try:
            await self._run(start, base, result, progress, finished)
        except ReexecError as e:
            finished.status.code = e.status.value
            finished.status.message = e.message
            if e.violations:
                pf = fastpb.PreconditionFailure()
                for v in e.violations:
                    pf.violations.add(type=v.type, subject=v.subject, description=v.description)
                finished.status.details.add().Pack(pf)
        except _Retryable as e:
            finished.retryable = True
            finished.status.code = Status.UNAVAILABLE.value
            finished.status.message = str(e)
        except (OSError, DecodeError) as e:
            log.exception("action %s failed on the worker", start.operation_name)
            finished.retryable = True
            finished.status.code = Status.INTERNAL.value
            finished.status.message = f"worker {self.settings.worker_id}: {e}"
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_force_remove, base)
        _ts(meta.worker_completed_timestamp, time.time())
        return msg

    async def _run(
        self,
        start: fastpb.Message,
        base: Path,
        result: fastpb.Message,
        progress: Callable[[int], Awaitable[None]],
        finished: fastpb.Message,
    ) -> None:
        function = DigestFunction(start.digest_function or 1)
        try:
            action = fastpb.Action.FromString(start.action)
            command = fastpb.Command.FromString(start.command)
        except DecodeError:
            raise InvalidArgument("the Action or Command is not a valid message") from None
        meta = result.execution_metadata

        # Inputs.
        await progress(FETCHING)
        _ts(meta.input_fetch_start_timestamp, time.time())
        root_digest = make_digest(
            action.input_root_digest.hash, action.input_root_digest.size_bytes, int(function)
        )
        key = (root_digest, self.settings.allow_absolute_symlinks)
        tree = self.dirs.plan(key)
        if tree is None:
            directories = await load_directories(root_digest, self.access, self.dirs)
            tree = plan_tree(root_digest, directories, self.settings.allow_absolute_symlinks)
            self.dirs.put_plan(key, tree)
        entries = tree.entries()
        with self.cache.lease(entries):
            try:
                await self.cache.ensure(entries)
            except MissingInputs as e:
                raise missing_blobs_error(
                    "inputs of the action", [d.blob_path for d in e.missing]
                ) from None
            exec_root = base / "root"
            t0 = trio.current_time()
            await trio.to_thread.run_sync(self._materialize, tree, base, exec_root, command)
            self.stats.materialize_seconds += trio.current_time() - t0
            _ts(meta.input_fetch_completed_timestamp, time.time())

            # The command.
            await progress(EXECUTING)
            cwd = exec_root / command.working_directory if command.working_directory else exec_root
            env = {v.name: v.value for v in command.environment_variables}
            request = RunRequest(
                argv=list(command.arguments),
                env=env,
                cwd=cwd,
                stdout_path=base / "stdout",
                stderr_path=base / "stderr",
                timeout_s=start.timeout.ToNanoseconds() / 1e9 if start.HasField("timeout") else 0,
                kill_grace_s=self.settings.kill_grace_s,
                run_as=self.settings.run_as,
                namespaces=self._namespaces(action, command),
                tmp_dir=base / "tmp",
            )
            run = await run_command(request)
            _ts(meta.execution_start_timestamp, run.started_at)
            _ts(meta.execution_completed_timestamp, run.finished_at)
            broken = await trio.to_thread.run_sync(self.cache.check_intact_sync, entries)
        if broken:
            self.cache.forget(broken)
            self.stats.tampered += len(broken)
            log.warning(
                "action %s modified %d linked input file(s); removed them from the cache",
                start.operation_name,
                len(broken),
            )

        # Outputs.
        await progress(UPLOADING)
        _ts(meta.output_upload_start_timestamp, time.time())
        collected: CollectedOutputs = await trio.to_thread.run_sync(
            self._collect, exec_root, command, function, base
        )
        result.MergeFrom(collected.result)
        result.exit_code = run.exit_code
        self.cache.register_adopted(collected.entries)
        t0 = trio.current_time()
        with self.cache.lease(collected.entries):
            with trio.move_on_after(self.settings.upload_timeout_s) as upload_scope:
                try:
                    await self.access.upload(collected.uploads)
                except ReexecError as e:
                    raise _Retryable(f"uploading outputs failed: {e.message}") from None
            if upload_scope.cancelled_caught:
                raise _Retryable(f"uploading outputs took over {self.settings.upload_timeout_s:g}s")
        self.stats.upload_seconds += trio.current_time() - t0
        self.stats.upload_bytes += collected.bytes_total
        _ts(meta.output_upload_completed_timestamp, time.time())
        if run.timed_out:
            finished.status.code = Status.DEADLINE_EXCEEDED.value
            finished.status.message = (
                f"the action did not finish within its timeout of "
                f"{request.timeout_s:g}s; it was killed"
            )
        elif run.error:
            finished.message = run.error

    def _materialize(
        self, tree: InputTree, base: Path, exec_root: Path, command: fastpb.Message
    ) -> None:
        base.mkdir()
        (base / "tmp").mkdir()
        exec_root.mkdir()
        stats = materialize_sync(tree, exec_root, self.cache)
        self.stats.links += stats.links
        self.stats.copies += stats.copies
        prepare_outputs_sync(exec_root, command)

    def _collect(
        self, exec_root: Path, command: fastpb.Message, function: DigestFunction, base: Path
    ) -> CollectedOutputs:
        out = collect_outputs_sync(exec_root, command, function, self.cache)
        result = out.result
        for name, field_name in (("stdout", "stdout_digest"), ("stderr", "stderr_digest")):
            path = base / name
            if path.exists():
                d = log_blob_sync(path, function, self.cache, out)
                target = getattr(result, field_name)
                target.hash, target.size_bytes = d.hash, d.size
        return out

    def _namespaces(self, action: fastpb.Message, command: fastpb.Message) -> NamespaceOptions:
        ns = self.settings.namespaces
        platform = action.platform if action.HasField("platform") else command.platform
        props = {p.name: p.value for p in platform.properties}
        if props.get("network") == "off" and not ns.network:
            return NamespaceOptions(network=True, pid=ns.pid, private_tmp=ns.private_tmp)
        return ns


def _force_remove(path: Path) -> None:
    """Remove a work directory even where the action left read-only directories."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return

    def onerror(func, p, exc):  # type: ignore[no-untyped-def]
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o755)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
