"""What the scheduler and its workers share besides the generated messages of
`proto/reexec/worker/v1/worker.proto`: the stream's path, the metadata a worker sends, the
stream as both ends use it (`WorkerStream`), and `LocalLink`, the in-process stream of
`reexecd serve`'s local worker."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import trio

from reexec import fastpb

CONNECT = "/reexec.worker.v1.WorkerApi/Connect"
WorkerMessage = fastpb.message_class("reexec.worker.v1.WorkerMessage")
SchedulerMessage = fastpb.message_class("reexec.worker.v1.SchedulerMessage")

# Metadata on Connect carrying the secret that lets a worker register
# (scheduler.worker_token_file, or the per-process token of `reexecd serve`'s local worker).
WORKER_TOKEN_HEADER = "x-reexec-worker-token"


class WorkerStream(Protocol):
    """One WorkerApi.Connect stream as either end uses it from Trio: a grpclib stream behind an
    adapter, or one end of a `LocalLink`. `recv_message` returns None once the peer has
    half-closed (ended its side) and raises once the stream failed."""

    metadata: Mapping[str, str]

    async def send_message(self, msg: Any) -> None: ...

    async def send_messages(self, msgs: Sequence[Any]) -> None:
        """Several messages in order, as one operation where the transport allows."""
        ...

    async def recv_message(self) -> Any: ...

    async def end(self) -> None: ...


class LinkClosed(ConnectionError):
    """The other end of an in-process stream failed, or the link stopped accepting."""


_END = object()


class LocalStream:
    """One end of an in-process WorkerApi.Connect stream (see `LocalLink`).

    Messages cross as their serialized bytes, exactly as over gRPC: neither end ever holds an
    object the other may change, and a message is parsed by the receiver's class."""

    def __init__(
        self,
        send: trio.MemorySendChannel[Any],
        receive: trio.MemoryReceiveChannel[Any],
        message_class: type,
        metadata: Mapping[str, str],
    ) -> None:
        self._send = send
        self._receive = receive
        self._class = message_class
        self.metadata = metadata
        self._ended = False

    async def send_message(self, msg: Any) -> None:
        if self._ended:
            raise LinkClosed("the stream was ended by this side")
        try:
            self._send.send_nowait(msg.SerializeToString())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkClosed("the other end of the stream is gone") from None
        await trio.lowlevel.checkpoint()

    async def send_messages(self, msgs: Sequence[Any]) -> None:
        for msg in msgs:
            await self.send_message(msg)

    async def recv_message(self) -> Any:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise LinkClosed("the other end of the stream went away without ending it") from None
        except trio.ClosedResourceError:
            raise LinkClosed("the stream is closed") from None
        if item is _END:
            return None
        if isinstance(item, LinkClosed):
            raise item
        return self._class.FromString(item)

    async def end(self) -> None:
        """Half-close: the peer's recv_message returns None once it has read what was sent."""
        if not self._ended:
            self._ended = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                self._send.send_nowait(_END)
        await trio.lowlevel.checkpoint()

    def reset(self, reason: str) -> None:
        """End the stream with an error: the peer's next recv_message raises LinkClosed."""
        if not self._ended:
            self._ended = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                self._send.send_nowait(LinkClosed(reason))
        self._send.close()
        self._receive.close()


class LocalLink:
    """WorkerApi.Connect between a scheduler and a worker of the same process (`reexecd
    serve`), without gRPC: the same worker-protocol messages over Trio memory channels.

    The worker opens streams with `connect` (one per session, like a gRPC stream); the owner of
    the scheduler's end runs `run(serve)`, which serves each stream in a task of its own nursery
    with `serve` (the scheduler's connection handler, which reads the token from `metadata`
    like the gRPC handler does). A handler that raises resets the stream with its message, as a
    gRPC handler's error ends the call; one that returns ends the scheduler's side. Once `run`
    has ended, `connect` raises LinkClosed (a worker sees a refused connection)."""

    def __init__(self) -> None:
        self._incoming_send, self._incoming = trio.open_memory_channel[LocalStream](math.inf)

    @contextlib.asynccontextmanager
    async def connect(
        self, metadata: Mapping[str, str] | None = None
    ) -> AsyncIterator[LocalStream]:
        """The worker's end of a new stream; leaving with an exception resets the stream."""
        to_scheduler_send, to_scheduler = trio.open_memory_channel[Any](math.inf)
        to_worker_send, to_worker = trio.open_memory_channel[Any](math.inf)
        meta = dict(metadata or {})
        worker_end = LocalStream(to_scheduler_send, to_worker, SchedulerMessage, meta)
        scheduler_end = LocalStream(to_worker_send, to_scheduler, WorkerMessage, meta)
        try:
            self._incoming_send.send_nowait(scheduler_end)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkClosed("the scheduler is not accepting workers") from None
        try:
            yield worker_end
        except BaseException as e:
            worker_end.reset(f"the worker reset the stream: {type(e).__name__}")
            raise
        worker_end.reset("the worker closed the stream")

    async def run(
        self,
        serve: Callable[[LocalStream], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve every stream a worker opens, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                async for end in self._incoming:
                    nursery.start_soon(self._serve_one, serve, end)
        finally:
            self._incoming_send.close()
            self._incoming.close()

    @staticmethod
    async def _serve_one(serve: Callable[[LocalStream], Awaitable[None]], end: LocalStream) -> None:
        try:
            await serve(end)
        except Exception as e:
            message = getattr(e, "message", None) or str(e) or type(e).__name__
            end.reset(f"{type(e).__name__}: {message}")
            return
        except BaseException:
            end.reset("the scheduler stopped")
            raise
        await end.end()
