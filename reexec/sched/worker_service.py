"""WorkerApi.Connect: the scheduler's end of a worker's bidirectional stream.

One Trio task receives the worker's messages and feeds them to the scheduler as events; a
second sends what the scheduler put in the worker's outbox. StartExecute messages are built by
the sender, with the Action and Command bytes Execute validation left in
`Scheduler.action_blobs`, or read from the CAS there when they are not (so no CAS read ever
holds up the dispatcher).
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Sequence
from typing import Any

import trio
from grpclib.const import Status

from reexec import fastpb
from reexec.cas.action_cache import ActionKey
from reexec.cas.digest import make_digest
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
    Violation,
)
from reexec.rpc import Cardinality, Service, Stream, aio, streaming
from reexec.sched.scheduler import Scheduler, action_key_of
from reexec.sched.state import Operation, Outcome, Stage
from reexec.sched.workers import WorkerState
from reexec.worker_protocol import (
    WORKER_TOKEN_HEADER,
    SchedulerMessage,
    WorkerMessage,
    WorkerStream,
)

log = logging.getLogger(__name__)

# Forgetting a lost worker writes its attempts' records; bounded, as it runs shielded.
LOST_TIMEOUT_S = 10.0
# At most this many outbox entries are sent together.
SEND_BATCH = 64


def _outcome_of(finished: fastpb.Message, worker_id: str) -> tuple[Outcome, int | None]:
    """The Outcome of a worker's Finished message, and the exit code if the command ran."""
    status = Status(finished.status.code) if finished.HasField("status") else Status.OK
    result = b""
    exit_code = None
    if finished.HasField("result"):
        r = finished.result
        if not r.execution_metadata.worker:
            r.execution_metadata.worker = worker_id
        result = r.SerializeToString()
        exit_code = r.exit_code
    return (
        Outcome(
            status=status,
            message=finished.status.message or finished.message,
            result=result,
            status_details=tuple((d.type_url, d.value) for d in finished.status.details),
            server_logs=tuple((k, v.SerializeToString()) for k, v in finished.server_logs.items()),
        ),
        exit_code,
    )


class WorkerService(Service):
    SERVICE = "reexec.worker.v1.WorkerApi"

    def __init__(self, scheduler: Scheduler, cas: Store, *, token: str | None = None) -> None:
        self.scheduler = scheduler
        self.cas = cas
        # Without it any client could register as a worker: receive other users' actions and
        # answer them with results of its choosing (which would then enter the action cache).
        self._token = token.encode() if token is not None else None

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "Connect": streaming(
                self.connect, Cardinality.STREAM_STREAM, WorkerMessage, SchedulerMessage
            )
        }

    async def connect(self, stream: Stream) -> None:
        """The gRPC handler of WorkerApi.Connect: `serve` over the grpclib stream."""
        await self.serve(_GrpcWorkerStream(stream))

    async def serve(self, stream: WorkerStream) -> None:
        """One worker's connection, in its own cancel scope: when the scheduler declares the
        worker lost (keepalive timeout), the scope is cancelled and the stream ends with
        UNAVAILABLE, so the worker reconnects and registers again. `stream` is a gRPC stream
        (`connect`) or the scheduler's end of a `LocalLink` (`reexecd serve`'s own worker)."""
        if self._token is not None:
            presented = (stream.metadata.get(WORKER_TOKEN_HEADER) or "").encode()
            if not hmac.compare_digest(presented, self._token):
                raise PermissionDenied(
                    "WorkerApi.Connect: a worker must present the scheduler's worker token "
                    f"({WORKER_TOKEN_HEADER}; scheduler.worker_token_file / worker.token_file)"
                )
        first = await stream.recv_message()
        if first is None or first.WhichOneof("kind") != "register":
            raise InvalidArgument("the first message on WorkerApi.Connect must be Register")
        reg = first.register
        if not reg.worker_id:
            raise InvalidArgument("Register.worker_id is empty")
        send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
        props = [(p.name, p.value) for p in reg.platform.properties]
        worker = self.scheduler.register_worker(reg.worker_id, props, reg.max_inflight_tasks, send)
        dropped: list[str] = []
        with trio.CancelScope() as connection:

            def disconnect(reason: str) -> None:
                dropped.append(reason)
                connection.cancel()

            worker.disconnect = disconnect
            try:
                await self._serve(stream, worker, reg, receive)
            finally:
                send.close()
                worker.disconnect = _already_disconnected
                # Shielded and bounded: this runs while the connection is being cancelled.
                with trio.CancelScope(shield=True), trio.move_on_after(LOST_TIMEOUT_S):
                    try:
                        await self.scheduler.worker_lost(worker, "disconnected")
                    except Unavailable as e:
                        log.warning("worker %s: %s", worker.worker_id, e.message)
        if connection.cancelled_caught:
            raise Unavailable(f"worker {worker.worker_id} was dropped: {dropped[0]}")

    async def _serve(
        self,
        stream: WorkerStream,
        worker: WorkerState,
        reg: fastpb.Message,
        outbox: trio.MemoryReceiveChannel[tuple[str, str, int]],
    ) -> None:
        # Attempts the worker still runs from before it (re)connected: the ones the state still
        # assigns to it are adopted (it moved from another scheduler, or came back within its
        # lease); the others were requeued or finished meanwhile, so the worker cancels them.
        # Those cancels are the first messages in the outbox, ahead of any new start.
        # Adopted *before* Registered is sent: the worker sends its held results right after
        # Registered and forgets each once it is on the stream, so a Registered sent while the
        # state store is unreachable (adopt then fails and the stream ends) made it drop them,
        # and their actions ran again (tests/e2e/test_scheduler_ha.py, Redis stopped while
        # actions queue). Without Registered the worker keeps them and tries again.
        attempts = [(r.operation_name, r.attempt) for r in reg.running] or [
            (name, 0) for name in reg.running_operations
        ]
        pending = [r.operation_name for r in reg.pending_results]
        for name in await self.scheduler.adopt(worker, attempts, pending):
            self.scheduler.cancel_stale_attempt(worker, name)
        hello = SchedulerMessage()
        interval = max(self.scheduler.settings.worker_timeout_s / 3, 0.05)
        hello.registered.keepalive_interval.FromNanoseconds(int(interval * 1e9))
        await stream.send_message(hello)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, stream, worker, outbox)
                await self._receiver(stream, worker)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The state store went away under the sender: end the stream with UNAVAILABLE
            # (the worker reconnects), not as an internal error with a traceback.
            unavailable, rest = group.split(Unavailable)
            if rest is None and unavailable is not None:
                raise _first_leaf(unavailable) from None
            raise

    async def _receiver(self, stream: WorkerStream, worker: WorkerState) -> None:
        scheduler = self.scheduler
        while True:
            msg = await stream.recv_message()
            if msg is None:
                return
            scheduler.worker_seen(worker)
            kind = msg.WhichOneof("kind")
            if kind == "keepalive":
                continue
            if kind == "progress":
                try:
                    await scheduler.progress(
                        worker, msg.progress.operation_name, msg.progress.attempt
                    )
                except Unavailable as e:
                    # Only a timestamp: not worth the worker's stream (ending it during a
                    # Redis outage churned reconnections, each failing again).
                    log.debug("progress of %s not recorded: %s", worker.worker_id, e.message)
            elif kind == "finished":
                await self._until_recorded(worker, self._finished, worker, msg.finished)
            elif kind == "declined":
                d = msg.declined
                await self._until_recorded(
                    worker, scheduler.declined, worker, d.operation_name, d.attempt, d.reason
                )
            elif kind == "going_away":
                scheduler.worker_going_away(worker)
            else:
                raise InvalidArgument(f"unexpected worker message {kind!r}")

    async def _until_recorded(self, worker: WorkerState, fn: Any, *args: Any) -> None:
        """Apply a worker's report, retrying while the state store is unavailable.

        The worker forgets a result once it is on the stream, so ending the stream on
        StateUnavailable lost it (the attempt was requeued and the action ran again once the
        store returned). Retried here instead, with the worker counted as seen (it is, its
        messages wait behind this one) so the keepalive check does not drop it, for at most
        the worker lease: past it the attempt would be requeued anyway."""
        scheduler = self.scheduler
        deadline = trio.current_time() + scheduler.settings.state.worker_lease_s
        delay = 0.1
        while True:
            try:
                await fn(*args)
                return
            except Unavailable as e:
                if trio.current_time() + delay > deadline:
                    raise
                log.warning(
                    "worker %s: report not recorded, retrying in %.1fs: %s",
                    worker.worker_id,
                    delay,
                    e.message,
                )
            await trio.sleep(delay)
            scheduler.worker_seen(worker)
            delay = min(delay * 2, 2.0)

    async def _finished(self, worker: WorkerState, finished: fastpb.Message) -> None:
        name, attempt = finished.operation_name, finished.attempt
        outcome, exit_code = _outcome_of(finished, worker.worker_id)
        op = await self.scheduler.store.get(name)
        current = (
            op is not None
            and op.stage is Stage.EXECUTING
            and op.worker_id == worker.worker_id
            and op.attempt == attempt
        )
        if (
            current
            and op is not None
            and not finished.retryable
            and outcome.status is Status.OK
            and exit_code == 0
            and not op.do_not_cache
        ):
            # Written before the operation completes, so an identical Execute arriving right
            # after the completion finds the result instead of running the action again.
            try:
                await self.scheduler.ac.put(action_key_of(op), outcome.result)
            except Exception:
                log.exception("could not write the action cache entry for %s", name)
        await self.scheduler.finished(worker, name, attempt, outcome, finished.retryable)

    async def _sender(
        self,
        stream: WorkerStream,
        worker: WorkerState,
        outbox: trio.MemoryReceiveChannel[tuple[str, str, int]],
    ) -> None:
        """Sends what the outbox holds, in order; everything waiting there at once (a dispatch
        fills a worker's free slots in one go) is sent together, one crossing into grpclib."""
        async for item in outbox:
            batch = [item]
            while len(batch) < SEND_BATCH:
                try:
                    batch.append(outbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            messages = []
            for kind, name, attempt in batch:
                msg = await self._message(worker, kind, name, attempt)
                if msg is not None:
                    messages.append(msg)
            if messages:
                await stream.send_messages(messages)

    async def _message(
        self, worker: WorkerState, kind: str, name: str, attempt: int
    ) -> fastpb.Message | None:
        """The message for one outbox entry, or None if there is nothing to send any more."""
        if kind == "drain":
            msg = SchedulerMessage()
            msg.drain.reason = name
            return msg
        if kind == "cancel":
            msg = SchedulerMessage()
            msg.cancel_execute.operation_name = name
            msg.cancel_execute.attempt = attempt
            return msg
        # As this scheduler last saw it (it dispatched it a moment ago); a cancel written
        # by another scheduler since reaches the worker as a cancel right after.
        op = self.scheduler.peek(name) or await self.scheduler.store.get(name)
        if op is None or op.stage is not Stage.EXECUTING or op.attempt != attempt:
            # Cancelled or requeued before it was sent: the worker will never report this
            # attempt, so its slot is freed here.
            self.scheduler.release(worker, name, attempt)
            return None
        try:
            return await self._start_message(op)
        except FailedPrecondition as e:
            outcome = Outcome(
                status=e.status,
                message=e.message,
                status_details=_precondition_details(e.violations),
            )
            await self.scheduler.finished(worker, name, attempt, outcome, retryable=False)
            return None

    async def _start_message(self, op: Operation) -> fastpb.Message:
        key: ActionKey = action_key_of(op)
        digest = key.digest
        blobs = self.scheduler.action_blobs.take(digest)
        try:
            if blobs is not None:
                action_bytes, command_bytes = blobs
            else:
                action_bytes = await self.cas.get_bytes(digest)
                action = fastpb.Action.FromString(action_bytes)
                cd = action.command_digest
                command_bytes = await self.cas.get_bytes(
                    make_digest(cd.hash, cd.size_bytes, int(digest.function))
                )
        except BlobNotFound as e:
            raise FailedPrecondition(
                f"{e.digest.blob_path} left the CAS before the action started",
                [Violation("MISSING", e.digest.blob_path, "evicted from the CAS")],
            ) from None
        msg = SchedulerMessage()
        start = msg.start_execute
        start.operation_name = op.name
        start.attempt = op.attempt
        start.instance_name = key.instance
        start.action_digest.hash = digest.hash
        start.action_digest.size_bytes = digest.size
        start.digest_function = int(digest.function)
        start.action = action_bytes
        start.command = command_bytes
        start.timeout.FromNanoseconds(int(op.timeout_s * 1e9))
        start.queued_timestamp.FromNanoseconds(int(self.scheduler.wall(op.queued_at) * 1e9))
        start.skip_cache_lookup = op.skip_cache_lookup
        return msg


class _GrpcWorkerStream:
    """A grpclib server stream as a WorkerStream: each call crosses into asyncio."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self.metadata = stream.metadata

    async def send_message(self, msg: Any) -> None:
        await aio(self._stream.send_message, msg)

    async def send_messages(self, msgs: Sequence[Any]) -> None:
        if len(msgs) == 1:
            await aio(self._stream.send_message, msgs[0])
            return
        send = self._stream.send_message

        async def send_all() -> None:
            for msg in msgs:
                await send(msg)

        await aio(send_all)

    async def recv_message(self) -> Any:
        return await aio(self._stream.recv_message)

    async def end(self) -> None:
        """The handler's return ends the stream (grpclib sends the trailers)."""


def _already_disconnected(reason: str) -> None:
    pass


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _precondition_details(violations: tuple[Violation, ...]) -> tuple[tuple[str, bytes], ...]:
    if not violations:
        return ()
    pf = fastpb.PreconditionFailure()
    for v in violations:
        pf.violations.add(type=v.type, subject=v.subject, description=v.description)
    return (("type.googleapis.com/google.rpc.PreconditionFailure", pf.SerializeToString()),)
