"""Execution and Operations services: the gRPC edge of the scheduler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import trio

from reexec import fastpb
from reexec.cas.store import Store
from reexec.cas.tree_size import SizeCache
from reexec.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from reexec.rpc import Cardinality, Service, Stream, aio, parse_page_token, streaming, unary
from reexec.sched.messages import operation_message
from reexec.sched.scheduler import Scheduler
from reexec.sched.state import Operation, Stage
from reexec.sched.validation import validate_execute

log = logging.getLogger(__name__)

# An Execute stream with nothing new re-sends the current state this often, so idle
# connections stay alive through proxies and clients see the operation is still there.
RESEND_INTERVAL_S = 30.0
# Detaching a waiter writes the record; bounded, as it runs shielded from cancellation.
DETACH_TIMEOUT_S = 10.0


class ExecutionService(Service):
    SERVICE = "build.bazel.remote.execution.v2.Execution"

    def __init__(
        self,
        scheduler: Scheduler,
        cas: Store,
        *,
        instances: Sequence[str] = (),
        message_suffix: Callable[[Operation], str] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.cas = cas
        self.instances = tuple(instances)
        # Text appended to a completed operation's message (the web UI's link to a failed
        # action's page, which Bazel prints).
        self.message_suffix = message_suffix
        # Expanded sizes of input trees by Directory digest, kept across Executes.
        self.tree_sizes = SizeCache()

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "Execute": streaming(
                self.execute, Cardinality.UNARY_STREAM, fastpb.ExecuteRequest, fastpb.Operation
            ),
            "WaitExecution": streaming(
                self.wait_execution,
                Cardinality.UNARY_STREAM,
                fastpb.message_class("build.bazel.remote.execution.v2.WaitExecutionRequest"),
                fastpb.Operation,
            ),
        }

    async def execute(self, stream: Stream) -> None:
        request = await aio(stream.recv_message)
        spec = await validate_execute(
            request,
            self.cas,
            self.scheduler.settings,
            self.instances,
            self.tree_sizes,
            self.scheduler.action_blobs,
        )
        op, _ = await self.scheduler.submit(spec)  # a new operation's cache check starts there
        try:
            await stream_operation(self.scheduler, stream, op, self.message_suffix)
        finally:
            await _detach(self.scheduler, op.name)

    async def wait_execution(self, stream: Stream) -> None:
        request = await aio(stream.recv_message)
        op = await self.scheduler.attach(request.name)
        if op is None:
            raise NotFound(f"operation {request.name!r} is unknown or expired")
        try:
            await stream_operation(self.scheduler, stream, op, self.message_suffix)
        finally:
            await _detach(self.scheduler, op.name)


async def _detach(scheduler: Scheduler, name: str) -> None:
    """Count the waiter out even when the handler is being cancelled (client went away)."""
    with trio.CancelScope(shield=True), trio.move_on_after(DETACH_TIMEOUT_S):
        try:
            await scheduler.detach(name)
        except Unavailable as e:
            # The waiter stays counted: the operation is not cancelled as unwatched.
            log.warning("could not detach from %s: %s", name, e.message)


async def stream_operation(
    scheduler: Scheduler,
    stream: Stream,
    op: Operation,
    message_suffix: Callable[[Operation], str] | None = None,
) -> None:
    """Send the operation at every stage change until it completes."""
    sent_stage: Stage | None = None
    while True:
        if op.stage is not sent_stage:
            await aio(stream.send_message, operation_message(_with_suffix(op, message_suffix)))
            sent_stage = op.stage
        if op.done:
            return
        with trio.move_on_after(RESEND_INTERVAL_S) as idle:
            changed = await scheduler.store.wait_changed(op)
        if idle.cancelled_caught:
            sent_stage = None
            continue
        if changed is None:
            raise NotFound(f"operation {op.name} disappeared")
        op = changed


def _with_suffix(op: Operation, suffix: Callable[[Operation], str] | None) -> Operation:
    if suffix is None or op.outcome is None or not (text := suffix(op)):
        return op
    message = f"{op.outcome.message}\n{text}" if op.outcome.message else text
    return replace(op, outcome=replace(op.outcome, message=message))


class OperationsService(Service):
    """google.longrunning.Operations over the scheduler's operations.

    An operation's name (a random UUID4, 122 random bits) is the capability to watch, cancel or
    delete it: only the clients that submitted or merged into the operation learn it. Listing
    would hand every name to every client, so ListOperations is refused unless `allow_list`
    (operators see operations on the status socket instead).
    """

    SERVICE = "google.longrunning.Operations"

    def __init__(self, scheduler: Scheduler, *, allow_list: bool = False) -> None:
        self.scheduler = scheduler
        self.allow_list = allow_list

    def rpcs(self):  # type: ignore[no-untyped-def]
        m = fastpb.message_class
        empty = m("google.protobuf.Empty")
        return {
            "GetOperation": unary(
                self.get_operation, m("google.longrunning.GetOperationRequest"), fastpb.Operation
            ),
            "ListOperations": unary(
                self.list_operations,
                m("google.longrunning.ListOperationsRequest"),
                m("google.longrunning.ListOperationsResponse"),
            ),
            "CancelOperation": unary(
                self.cancel_operation, m("google.longrunning.CancelOperationRequest"), empty
            ),
            "DeleteOperation": unary(
                self.delete_operation, m("google.longrunning.DeleteOperationRequest"), empty
            ),
            "WaitOperation": unary(
                self.wait_operation, m("google.longrunning.WaitOperationRequest"), fastpb.Operation
            ),
        }

    async def _get(self, name: str) -> Operation:
        op = await self.scheduler.store.get(name)
        if op is None:
            raise NotFound(f"operation {name!r} is unknown or expired")
        return op

    async def get_operation(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        return operation_message(await self._get(request.name))

    async def list_operations(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        if not self.allow_list:
            raise PermissionDenied(
                "ListOperations is disabled on this server: operation names are private to the "
                "clients that started them (operators: `reexecd status`; "
                "server.allow_list_operations = true enables it)"
            )
        if request.filter:
            raise InvalidArgument("ListOperations filters are not supported")
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        ops = sorted(
            [op async for op in self.scheduler.store.operations()],
            key=lambda o: (o.created_at, o.name),
        )
        start = parse_page_token(request.page_token)
        # The server may cut pages shorter than asked (AIP-158): at most 1000 per page.
        size = min(request.page_size or 1000, 1000)
        resp = fastpb.message_class("google.longrunning.ListOperationsResponse")()
        for op in ops[start : start + size]:
            resp.operations.append(operation_message(op))
        if start + size < len(ops):
            resp.next_page_token = str(start + size)
        return resp

    async def cancel_operation(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        op = await self._get(request.name)
        if op.waiters > 1:
            raise FailedPrecondition(
                f"operation {op.name} is shared by {op.waiters} waiting clients; it is not "
                "cancelled while others wait for it"
            )
        await self.scheduler.cancel(op.name)
        return fastpb.message_class("google.protobuf.Empty")()

    async def delete_operation(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        op = await self._get(request.name)
        if not op.done:
            raise FailedPrecondition(f"operation {op.name} is still running; cancel it first")
        await self.scheduler.store.delete(op)
        return fastpb.message_class("google.protobuf.Empty")()

    async def wait_operation(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        timeout = (
            request.timeout.seconds + request.timeout.nanos / 1e9
            if request.HasField("timeout")
            else 60.0
        )
        if timeout < 0:
            raise InvalidArgument(f"WaitOperation timeout {timeout:g}s is negative")
        op = await self._get(request.name)
        with trio.move_on_after(timeout):
            while not op.done:
                changed = await self.scheduler.store.wait_changed(op)
                if changed is None:
                    break
                op = changed
        return operation_message(op)
