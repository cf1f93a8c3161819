"""The gRPC edge shared by every service: handlers, error mapping, drain gate.

Services are grpclib `IServable`s whose `__mapping__` we build here rather than through the
name-mangled handlers of betterproto2's generated `*Base` classes: that lets each RPC pick its
codec (Google's upb classes from `reexec.fastpb` on hot and bulk paths, betterproto2 elsewhere)
and cross from grpclib's asyncio world into Trio exactly once per RPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpclib.const
import grpclib.server
import trio
import trio_asyncio
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.errors import InvalidArgument, ReexecError
from reexec.metrics import RPC_DURATION

log = logging.getLogger(__name__)

T = TypeVar("T")

Stream = grpclib.server.Stream
Handler = grpclib.const.Handler
Cardinality = grpclib.const.Cardinality

_TYPE_URL_PREFIX = "type.googleapis.com/"
# Sent by workers on their CAS calls (value: the worker id).
WORKER_HEADER = "x-reexec-worker"
# gRPC's customary 4 MiB plus our default max_batch_total_size_bytes (4032 KiB): the largest
# message a server accepts unless configured otherwise.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = (4 << 20) + 4032 * 1024
# Large request messages received at once by one server, in units of the largest message:
# 32 x 8128 KiB, about 254 MiB by default.
RECEIVE_BUDGET_MESSAGES = 32


class StatusDetailsCodec(StatusDetailsCodecBase):
    """Encodes error details as google.rpc.Status in `grpc-status-details-bin`.

    Ours instead of grpclib's, which needs googleapis-common-protos in the default descriptor pool.
    Details are protobuf messages from `reexec.fastpb` (PreconditionFailure, BadRequest, ...).
    """

    def encode(self, status: grpclib.const.Status, message: str | None, details: Any) -> bytes:
        st = fastpb.Status(code=status.value, message=message or "")
        for detail in details or ():
            any_ = st.details.add()
            any_.type_url = _TYPE_URL_PREFIX + detail.DESCRIPTOR.full_name
            any_.value = detail.SerializeToString()
        return st.SerializeToString()

    def decode(self, status: grpclib.const.Status, message: str | None, data: bytes) -> Any:
        st = fastpb.Status.FromString(data)
        out = []
        for any_ in st.details:
            name = any_.type_url.rpartition("/")[2]
            try:
                cls = fastpb.message_class(name)
            except KeyError:
                out.append(any_)
                continue
            out.append(cls.FromString(any_.value))
        return out


def grpc_error(e: ReexecError) -> GRPCError:
    details = None
    if e.violations:
        pf = fastpb.PreconditionFailure()
        for v in e.violations:
            pf.violations.add(type=v.type, subject=v.subject, description=v.description)
        details = [pf]
    return GRPCError(e.status, e.message, details)


class RpcGate:
    """Counts in-flight RPCs and refuses new ones once draining starts."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.last_left = -math.inf  # time.monotonic() when an RPC last finished

    def enter(self, method: str, stream: Stream | None = None) -> None:
        # Workers finishing their actions still need the CAS while we drain.
        if self.draining and not (stream is not None and stream.metadata.get(WORKER_HEADER)):
            raise GRPCError(grpclib.const.Status.UNAVAILABLE, "server is shutting down")
        if self.inflight == 0:
            self._idle = trio.Event()
        self.inflight += 1

    def leave(self, method: str, status: str, seconds: float) -> None:
        self.inflight -= 1
        self.last_left = time.monotonic()
        RPC_DURATION.observe(seconds, method, status)
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


# Long-lived streams that must outlive a drain (workers finish the actions clients wait for):
# neither refused nor waited for by the gate.
UNGATED = frozenset({"/reexec.worker.v1.WorkerApi/Connect"})


# Message bodies larger than this reserve their size in the server's ReceiveBudget (Bazel's
# 16 KiB ByteStream chunks and small unary requests do not pay for it).
LARGE_MESSAGE_BYTES = 64 << 10


class ReceiveBudget:
    """Bytes of large request messages being received at once, across every RPC of a server.

    One message of up to max_receive_message_bytes is cheap; one on each of 100 streams of each
    of hundreds of connections at once is not. A body over LARGE_MESSAGE_BYTES reserves its
    length here before it is received, waiting up to `wait_s` for room (then
    RESOURCE_EXHAUSTED), and must then arrive within `body_timeout_s`, so a client trickling
    bytes cannot hold the budget for long. Used only on the asyncio loop's thread.
    """

    def __init__(self, limit_bytes: int, wait_s: float = 30.0, body_timeout_s: float = 120.0):
        self.limit = limit_bytes
        self.wait_s = wait_s
        self.body_timeout_s = body_timeout_s
        self.used = 0
        self._freed: asyncio.Future[None] | None = None

    async def reserve(self, n: int) -> int:
        """Reserve `n` bytes (at most the whole budget); returns what to `release`."""
        n = min(n, self.limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.used + n > self.limit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GRPCError(
                    grpclib.const.Status.RESOURCE_EXHAUSTED,
                    f"the server is receiving {self.used} bytes of large requests already "
                    f"(budget {self.limit}); retry later",
                )
            if self._freed is None or self._freed.done():
                self._freed = loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._freed), remaining)
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)


@dataclass(frozen=True)
class ReceiveLimits:
    """How request messages are received: the size limit and the shared budget."""

    max_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    budget: ReceiveBudget | None = None


async def _recv_body(stream: Stream, length: int, budget: ReceiveBudget | None) -> bytes:
    h2_stream = stream._stream
    if budget is None or length <= LARGE_MESSAGE_BYTES:
        return await h2_stream.recv_data(length)
    reserved = await budget.reserve(length)
    try:
        async with asyncio.timeout(budget.body_timeout_s):
            return await h2_stream.recv_data(length)
    except TimeoutError:
        raise GRPCError(
            grpclib.const.Status.DEADLINE_EXCEEDED,
            f"a {length}-byte request message did not arrive within {budget.body_timeout_s:g}s",
        ) from None
    finally:
        budget.release(reserved)


async def _recv_bounded(stream: Stream, limits: ReceiveLimits) -> Any:
    """grpclib's `Stream.recv_message`, refusing a message longer than `max_bytes` from its
    5-byte length prefix (RESOURCE_EXHAUSTED), before its body is received or decoded.

    grpclib itself buffers a message of any declared length (up to 4 GiB) before decoding it;
    HTTP/2 flow control only paces that. Mirrors grpclib 0.4's `Stream.recv_message` and
    `grpclib.stream.recv_message`, which it replaces per stream (see `limit_receive`).
    """
    h2_stream = stream._stream
    max_bytes = limits.max_message_bytes
    meta = await h2_stream.recv_data(5)
    if not meta:
        return None
    if meta[0]:
        raise GRPCError(
            grpclib.const.Status.UNIMPLEMENTED, "compressed gRPC messages are not supported"
        )
    length = int.from_bytes(meta[1:5], "big")
    if length > max_bytes:
        raise GRPCError(
            grpclib.const.Status.RESOURCE_EXHAUSTED,
            f"the request message is {length} bytes, over this server's limit of {max_bytes} "
            "bytes (server.max_receive_message_bytes); split the request (large blobs go "
            "through ByteStream)",
        )
    try:
        data = await _recv_body(stream, length, limits.budget)
    except AssertionError:  # grpclib's way of saying the stream ended early
        raise GRPCError(
            grpclib.const.Status.INVALID_ARGUMENT,
            f"the request stream ended inside a {length}-byte message",
        ) from None
    try:
        message = stream._codec.decode(data, stream._recv_type)
    except Exception as e:  # upb raises DecodeError; betterproto2 codecs other errors
        raise GRPCError(
            grpclib.const.Status.INVALID_ARGUMENT,
            f"the request is not a valid {stream._recv_type.__name__} message: {e}",
        ) from None
    (message,) = await stream._dispatch.recv_message(message)
    stream._messages_received += 1
    h2_stream.connection.messages_received += 1
    h2_stream.connection.last_message_received = time.monotonic()
    return message


def limit_receive(stream: Stream, limits: ReceiveLimits) -> None:
    """Make every `stream.recv_message()` (whoever calls it) enforce `limits`."""
    stream.recv_message = functools.partial(_recv_bounded, stream, limits)  # type: ignore[method-assign]


def guard(
    gate: RpcGate,
    name: str,
    func: Callable[[Stream], Awaitable[None]],
    receive: ReceiveLimits | None = None,
):
    """Wrap a grpclib handler: request size limits, drain gate, ReexecError -> status,
    accounting, logging."""
    receive = receive or ReceiveLimits()
    if name in UNGATED:
        return _ungated(name, func, receive)

    async def handle(stream: Stream) -> None:
        limit_receive(stream, receive)
        gate.enter(name, stream)
        started = time.monotonic()
        status = "OK"
        try:
            await func(stream)
            # grpclib sends the OK trailers after this handler returns; sent here instead, so
            # a drain that waits on the gate closes connections only once the client has the
            # whole answer (closing between the two lost a stream's last message).
            if not getattr(stream, "_send_trailing_metadata_done", True):
                await stream.send_trailing_metadata()
        except ReexecError as e:
            status = e.status.name
            raise grpc_error(e) from None
        except GRPCError as e:
            status = e.status.name
            raise
        except (asyncio.CancelledError, trio.Cancelled):
            status = "CANCELLED"
            raise
        except OSError as e:
            error = resource_error(e, name)
            status = error.status.name
            raise error from None
        except Exception:
            status = "INTERNAL"
            log.exception("internal error in %s", name)
            raise GRPCError(grpclib.const.Status.INTERNAL, f"internal error in {name}") from None
        finally:
            gate.leave(name, status, time.monotonic() - started)

    return handle


# Running out of these is the server's trouble, not the request's, and it passes: UNAVAILABLE
# (clients retry). A full disk is RESOURCE_EXHAUSTED.
_TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_error_status(e: OSError, name: str) -> tuple[grpclib.const.Status, str]:
    """Status and message for an OSError met while serving `name` (logged here): UNAVAILABLE
    when the server ran out of descriptors or memory, RESOURCE_EXHAUSTED when its disk is full,
    else INTERNAL naming the failure (an I/O error of the server's storage, never the client's
    fault). Server paths are left out of the message."""
    if e.errno in _TRANSIENT_ERRNOS:
        log.warning("%s: %s", name, e)
        return (
            grpclib.const.Status.UNAVAILABLE,
            f"the server is out of resources ({e.strerror}); retry later",
        )
    if e.errno in _FULL_ERRNOS:
        log.warning("%s: %s", name, e)
        return (
            grpclib.const.Status.RESOURCE_EXHAUSTED,
            f"the server's storage is full ({e.strerror})",
        )
    log.error("%s: %s", name, e, exc_info=e)
    what = e.strerror or type(e).__name__
    return grpclib.const.Status.INTERNAL, f"{name}: server I/O error ({what})"


def resource_error(e: OSError, name: str) -> GRPCError:
    """`os_error_status` as the GRPCError a handler raises."""
    return GRPCError(*os_error_status(e, name))


def _ungated(name: str, func: Callable[[Stream], Awaitable[None]], receive: ReceiveLimits):
    async def handle(stream: Stream) -> None:
        limit_receive(stream, receive)
        try:
            await func(stream)
        except ReexecError as e:
            raise grpc_error(e) from None
        except (GRPCError, asyncio.CancelledError):
            raise
        except OSError as e:
            raise resource_error(e, name) from None
        except Exception:
            log.exception("internal error in %s", name)
            raise GRPCError(grpclib.const.Status.INTERNAL, f"internal error in {name}") from None

    return handle


def in_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> Awaitable[T]:
    """Run a Trio coroutine function from grpclib's asyncio side (one crossing)."""
    return trio_asyncio.trio_as_aio(fn)(*args)


class Slow(enum.Enum):
    """A fast path's answer when only the Trio path can serve the request."""

    SLOW = "slow"


SLOW = Slow.SLOW

# Whether handlers try their fast paths (answers computed on grpclib's side without a Trio
# crossing). Always on in production; tests turn it off to check both paths give the same
# answers.
FAST_PATHS = True


def unary(
    fn: Callable[[Any, Stream], Awaitable[Any]],
    request_type: type,
    response_type: type,
    nowait: Callable[[Any], Any] | None = None,
) -> tuple[Callable[[Stream], Awaitable[None]], Cardinality, type, type]:
    """A unary handler whose logic `fn(request, stream)` runs in Trio.

    `nowait(request)`, if given, is tried first on grpclib's side: it returns the response (or
    raises, as `fn` would) when it can answer without waiting, else SLOW. A crossing into Trio
    costs more than most of these RPCs' work (bench/RESULTS.md)."""

    async def handle(stream: Stream) -> None:
        request = await stream.recv_message()
        response = nowait(request) if nowait is not None and FAST_PATHS else SLOW
        if response is SLOW:
            response = await in_trio(fn, request, stream)
        await stream.send_message(response)

    return handle, Cardinality.UNARY_UNARY, request_type, response_type


def streaming(
    fn: Callable[[Stream], Awaitable[None]],
    cardinality: Cardinality,
    request_type: type,
    response_type: type,
) -> tuple[Callable[[Stream], Awaitable[None]], Cardinality, type, type]:
    """A streaming handler that runs wholly in Trio; it talks to the stream with `aio`."""

    async def handle(stream: Stream) -> None:
        await in_trio(fn, stream)

    return handle, cardinality, request_type, response_type


def aio(coro_fn: Callable[..., Awaitable[T]], *args: Any) -> Awaitable[T]:
    """Await an asyncio coroutine function (e.g. stream.send_message) from Trio."""
    return trio_asyncio.aio_as_trio(coro_fn)(*args)


class Service:
    """Base for our servicers: subclasses map method names to handlers in `rpcs()`."""

    SERVICE: str = ""

    def rpcs(
        self,
    ) -> dict[str, tuple[Callable[[Stream], Awaitable[None]], Cardinality, type, type]]:
        raise NotImplementedError


class Servable:
    """All services as one grpclib IServable, every handler wrapped by `guard` with one gate.

    `max_receive_message_bytes` applies to every request message of every RPC; it is read when
    a grpclib Server is built from this servable. All servers built from it share one
    ReceiveBudget of RECEIVE_BUDGET_MESSAGES such messages.
    """

    def __init__(
        self,
        services: Sequence[Service],
        gate: RpcGate,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    ) -> None:
        self._services = services
        self.gate = gate
        self.max_receive_message_bytes = max_receive_message_bytes
        self._receive: ReceiveLimits | None = None

    def receive_limits(self) -> ReceiveLimits:
        if self._receive is None or self._receive.max_message_bytes != (
            self.max_receive_message_bytes
        ):
            budget = ReceiveBudget(RECEIVE_BUDGET_MESSAGES * self.max_receive_message_bytes)
            self._receive = ReceiveLimits(self.max_receive_message_bytes, budget)
        return self._receive

    def __mapping__(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {}
        for service in self._services:
            for method, (func, cardinality, req, resp) in service.rpcs().items():
                path = f"/{service.SERVICE}/{method}"
                handler = guard(self.gate, path, func, self.receive_limits())
                out[path] = Handler(handler, cardinality, req, resp)
        return out


def check_instance(allowed: Sequence[str], instance: str) -> None:
    """Raise unless `instance` is configured (an empty list accepts every name)."""
    if allowed and instance not in allowed:
        raise InvalidArgument(
            f"unknown instance name {instance!r}; this server serves: "
            + ", ".join(repr(a) for a in allowed)
        )


_PAGE_TOKEN = re.compile(r"[0-9]{1,18}")


def parse_page_token(token: str) -> int:
    """The offset our page tokens encode (decimal ASCII); 0 for an empty token.

    Strict: `str.isdigit` also accepts characters such as '²' that `int` refuses, and a
    5,000-digit token exceeds Python's int conversion limit; both were INTERNAL errors."""
    if not token:
        return 0
    if not _PAGE_TOKEN.fullmatch(token):
        raise InvalidArgument(f"invalid page_token {token[:40]!r}")
    return int(token)
