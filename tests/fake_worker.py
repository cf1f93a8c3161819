"""A scriptable worker speaking reexec.worker.v1 over gRPC, and helpers to build actions.

Used by the scheduler's integration tests and benchmarks: it registers, then hands every
StartExecute to the test, which decides what to report back.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import trio
import trio_asyncio
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError

from reexec import fastpb
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.worker_protocol import WORKER_TOKEN_HEADER
from tests.conftest import call

WorkerMessage = fastpb.message_class("reexec.worker.v1.WorkerMessage")
SchedulerMessage = fastpb.message_class("reexec.worker.v1.SchedulerMessage")


def sha(data: bytes) -> re.Digest:
    return re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


async def upload_action(
    channel: Channel,
    args: list[str],
    *,
    platform: dict[str, str] | None = None,
    do_not_cache: bool = False,
    timeout_s: int = 0,
    instance: str = "",
    salt: str = "",
) -> re.Digest:
    """Upload an Action, its Command and an empty input root; returns the Action digest."""
    props = [re.PlatformProperty(name=k, value=v) for k, v in sorted((platform or {}).items())]
    command = re.Command(
        arguments=args,
        environment_variables=[re.CommandEnvironmentVariable(name="SALT", value=salt)]
        if salt
        else [],
        platform=re.Platform(properties=props) if props else None,
    )
    root = re.Directory()
    action = re.Action(
        command_digest=sha(bytes(command)),
        input_root_digest=sha(bytes(root)),
        do_not_cache=do_not_cache,
        timeout=__import__("datetime").timedelta(seconds=timeout_s) if timeout_s else None,
        platform=re.Platform(properties=props) if props else None,
    )
    blobs = [bytes(command), bytes(root), bytes(action)]
    cas = re.ContentAddressableStorageStub(channel)
    await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            instance_name=instance,
            requests=[re.BatchUpdateBlobsRequestRequest(digest=sha(b), data=b) for b in blobs],
        ),
    )
    return sha(bytes(action))


class ExecuteCall:
    """One Execute stream, collected in the background: `.operations`, `.done`, `.response`."""

    def __init__(self, channel: Channel, request: fastpb.Message) -> None:
        self.channel = channel
        self.request = request
        self.operations: list[Any] = []
        self.error: BaseException | None = None
        self.finished = trio.Event()
        self.first = trio.Event()
        self.cancel_scope = trio.CancelScope()

    async def run(self) -> None:
        with self.cancel_scope:
            await self._run()

    async def _run(self) -> None:
        stream_cm = self.channel.request(
            "/build.bazel.remote.execution.v2.Execution/Execute",
            Cardinality.UNARY_STREAM,
            fastpb.ExecuteRequest,
            fastpb.Operation,
        )
        try:
            stream: Stream = await trio_asyncio.aio_as_trio(stream_cm.__aenter__)()
            failure: BaseException | None = None
            try:
                await call(stream.send_message, self.request, end=True)
                while True:
                    op = await call(stream.recv_message)
                    if op is None:
                        break
                    self.operations.append(op)
                    self.first.set()
            except BaseException as e:
                failure = e
                raise
            finally:
                with trio.CancelScope(shield=True):
                    # Exiting with the exception resets an unfinished stream: the server sees
                    # the client leave.
                    await trio_asyncio.aio_as_trio(stream_cm.__aexit__)(
                        type(failure) if failure else None, failure, None
                    )
        except Exception as e:
            self.error = e
        finally:
            self.first.set()
            self.finished.set()

    @property
    def stages(self) -> list[int]:
        out = []
        for op in self.operations:
            meta = fastpb.ExecuteOperationMetadata()
            op.metadata.Unpack(meta)
            out.append(meta.stage)
        return out

    @property
    def response(self) -> Any:
        last = self.operations[-1]
        assert last.done, self.stages
        resp = fastpb.ExecuteResponse()
        last.response.Unpack(resp)
        return resp


def execute_request(digest: re.Digest, **kw: Any) -> Any:
    req = fastpb.ExecuteRequest(**{k: v for k, v in kw.items() if k != "priority"})
    req.action_digest.hash = digest.hash
    req.action_digest.size_bytes = digest.size_bytes
    if "priority" in kw:
        req.execution_policy.priority = kw["priority"]
    return req


class FakeWorker:
    def __init__(
        self,
        channel: Channel,
        worker_id: str,
        *,
        platform: dict[str, str] | None = None,
        slots: int = 1,
        running: list[str] = (),  # type: ignore[assignment]
        token: str | None = None,
    ) -> None:
        self.channel = channel
        self.worker_id = worker_id
        self.platform = platform or {}
        self.slots = slots
        self.running = list(running)
        self.token = token
        self.starts: list[Any] = []
        self.cancels: list[Any] = []
        self._send, self._receive = trio.open_memory_channel[Any](math.inf)
        self.closed = trio.Event()
        self.registered: Any = None
        # How the scheduler ended the stream when it dropped us (None: ended normally).
        self.ended_with: BaseException | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._cm = self.channel.request(
            "/reexec.worker.v1.WorkerApi/Connect",
            Cardinality.STREAM_STREAM,
            WorkerMessage,
            SchedulerMessage,
            metadata={WORKER_TOKEN_HEADER: self.token} if self.token else None,
        )
        self.stream = await trio_asyncio.aio_as_trio(self._cm.__aenter__)()
        try:
            msg = WorkerMessage()
            msg.register.worker_id = self.worker_id
            msg.register.max_inflight_tasks = self.slots
            msg.register.running_operations.extend(self.running)
            for k, v in sorted(self.platform.items()):
                msg.register.platform.properties.add(name=k, value=v)
            await call(self.stream.send_message, msg)
            self.registered = await call(self.stream.recv_message)
            task_status.started()
            while True:
                m = await call(self.stream.recv_message)
                if m is None:
                    break
                kind = m.WhichOneof("kind")
                if kind == "start_execute":
                    self.starts.append(m.start_execute)
                    self._send.send_nowait(m.start_execute)
                elif kind == "cancel_execute":
                    self.cancels.append(m.cancel_execute)
        except (GRPCError, StreamTerminatedError) as e:
            # A dropped worker's stream ends with UNAVAILABLE in the trailers, followed by a
            # reset; grpclib reports whichever it sees first.
            self.ended_with = e
        finally:
            self.closed.set()

    async def next_start(self, timeout: float = 5) -> Any:
        with trio.fail_after(timeout):
            return await self._receive.receive()

    def pending(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def send(self, msg: Any) -> None:
        await call(self.stream.send_message, msg)

    async def finish(
        self,
        start: Any,
        *,
        exit_code: int = 0,
        stdout: bytes = b"",
        status: int = 0,
        message: str = "",
        retryable: bool = False,
        channel_for_upload: Channel | None = None,
    ) -> None:
        msg = WorkerMessage()
        f = msg.finished
        f.operation_name = start.operation_name
        f.attempt = start.attempt
        f.result.exit_code = exit_code
        if stdout:
            f.result.stdout_raw = stdout
        f.status.code = status
        f.status.message = message
        f.retryable = retryable
        await self.send(msg)

    async def progress(self, start: Any, phase: int = 2) -> None:
        msg = WorkerMessage()
        msg.progress.operation_name = start.operation_name
        msg.progress.attempt = start.attempt
        msg.progress.phase = phase
        await self.send(msg)

    async def decline(self, start: Any, reason: str = "busy") -> None:
        msg = WorkerMessage()
        msg.declined.operation_name = start.operation_name
        msg.declined.attempt = start.attempt
        msg.declined.reason = reason
        await self.send(msg)

    async def keepalive(self) -> None:
        msg = WorkerMessage()
        msg.keepalive.SetInParent()
        await self.send(msg)

    async def going_away(self) -> None:
        msg = WorkerMessage()
        msg.going_away.SetInParent()
        await self.send(msg)

    async def disconnect(self) -> None:
        await call(self.stream.end)
        await trio_asyncio.aio_as_trio(self._cm.__aexit__)(None, None, None)
