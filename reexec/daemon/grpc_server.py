"""Hosts grpclib servers inside the Trio nursery (through trio-asyncio) with graceful drain.

grpclib's `Server.close()` cancels handlers at once, so draining is built above it: stop
accepting connections, refuse new RPCs on live ones (UNAVAILABLE, via the RpcGate), wait for
in-flight RPCs up to the grace period, and only then close and cancel what is left.

Connections are bounded, so clients cannot exhaust the process's file descriptors:
- at most `max_connections` client connections at once over TCP; one more is closed as soon
  as it is accepted (the client sees UNAVAILABLE and retries);
- a connection with no RPC in flight for `idle_timeout_s` is closed with a GOAWAY;
- when accept() itself fails for lack of descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM),
  asyncio stops accepting for a second and tries again; we only log it. trio-asyncio's default
  would turn that report, like any per-connection error asyncio reports, into an exception in
  the loop's nursery that stops the whole daemon (`_tolerate_connection_errors`).
The private unix socket of the local worker is exempt from both limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
import trio_asyncio
from grpclib.protocol import Connection, EventsProcessor, H2Protocol, _set_nodelay
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Handler, Server
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

from reexec.daemon.config import ServerConfig, TlsConfig, parse_listen, parse_size
from reexec.rpc import RpcGate, Servable, StatusDetailsCodec

log = logging.getLogger(__name__)


def make_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(tls.client_ca)
    ctx.set_alpn_protocols(["h2"])
    return ctx


# Even with a huge descriptor limit: each connection costs grpclib tens of KiB and may carry
# 100 concurrent streams.
MAX_DEFAULT_CONNECTIONS = 10_000


def default_max_connections() -> int:
    """Half of the file-descriptor limit (the rest is for store files, the worker, threads),
    at least 16 and at most MAX_DEFAULT_CONNECTIONS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return min(MAX_DEFAULT_CONNECTIONS, max(16, soft // 2))


def max_receive_message_bytes(server: ServerConfig) -> int:
    """`server.max_receive_message_bytes`, or by default 4 MiB plus the advertised batch size."""
    configured = parse_size(server.max_receive_message_bytes)
    return configured or (4 << 20) + parse_size(server.max_batch_total_size_bytes)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    """Client connections open at once over TCP (all listen addresses together)."""
    idle_timeout_s: float
    """Close a connection with no RPC in flight for this long; 0: never."""

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            max_connections=server.max_connections or default_max_connections(),
            idle_timeout_s=server.connection_idle_timeout_s,
        )


# Warnings about refused connections or accept() failures: at most one per this many seconds.
_WARN_INTERVAL_S = 10.0
_ACCEPT_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


# How long a closing server lets clients read what it sent last before it closes their
# connections.
CLOSE_GRACE_S = 0.5


class ConnectionTracker:
    """Counts the client connections of one GrpcServer and enforces its ConnectionLimits.

    Touched only from the asyncio loop's thread (protocol callbacks), so plain counters do.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.closed_idle = 0
        self._warned_at = -_WARN_INTERVAL_S
        # Admitted connections, so a closing server can end them: grpclib's Server.close()
        # stops listening and cancels running handlers but keeps serving live connections.
        self.live: set[_LimitedH2Protocol] = set()
        # Set when the last live connection is gone (while close_all waits for that).
        self.all_gone: asyncio.Event | None = None

    async def close_all(self, reason: str, grace_s: float = CLOSE_GRACE_S) -> None:
        """GOAWAY to every live connection, a moment for clients to read what was sent last (a
        stream's final message and trailers) and hang up, then close what is left. Closing at
        once lost the last message of a stream that had just finished: a client that sees its
        connection drop discards what it has received but not yet read."""
        if self.live:
            self.all_gone = asyncio.Event()
            for protocol in list(self.live):
                protocol.send_goaway()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.all_gone.wait(), grace_s)
        for protocol in list(self.live):
            protocol.close_connection(reason)

    def admit(self) -> bool:
        if self.open >= self.limits.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._warned_at >= _WARN_INTERVAL_S:
                self._warned_at = now
                log.warning(
                    "refusing connections: %d open, max_connections is %d (%d refused so far)",
                    self.open,
                    self.limits.max_connections,
                    self.refused,
                )
            return False
        self.open += 1
        return True


# The largest HTTP/2 frame a client may send us. h2's default (the protocol's minimum, 16 KiB)
# makes a client cut each MiB of upload into 64 DATA frames, each parsed, flow-controlled and
# acknowledged in Python here; with 1 MiB frames the per-frame work all but disappears
# (bench/RESULTS.md). Clients use at most what they negotiate; all we measured send larger frames.
MAX_INBOUND_FRAME_BYTES = 1 << 20


class _LargeFrameH2Connection(H2Connection):
    """h2's connection whose *initial* SETTINGS allow MAX_INBOUND_FRAME_BYTES.

    Initial, not a later update_settings: h2 raises its inbound limit only when the client
    acknowledges, at its next receive_data, so a client that sends the ACK and a large frame in
    one TCP read would have its connection reset."""

    def __init__(self, config: H2Configuration | None = None) -> None:
        super().__init__(config=config)
        self.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.DEFAULT_MAX_HEADER_LIST_SIZE,
                SettingCodes.MAX_FRAME_SIZE: MAX_INBOUND_FRAME_BYTES,
            },
        )
        self.max_inbound_frame_size = MAX_INBOUND_FRAME_BYTES


# Writes at least this large go out at once (after what is buffered): joining them with small
# ones would only copy them.
_COALESCE_MAX_BYTES = 64 << 10


class _CoalescingTransport:
    """The connection's transport, with the writes of one event-loop turn sent together.

    grpclib flushes after each HEADERS, DATA and trailers frame of a response: three send(2)
    calls per unary RPC, the largest single cost in a profile of small RPCs. Buffered here and
    flushed by a callback at the end of the turn, a unary response - and the responses of
    other streams that finished in the same turn - leave in one send. Order is kept; a large
    write flushes what is buffered first and goes straight through."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._buffer: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        if len(data) >= _COALESCE_MAX_BYTES:
            self.flush()
            self._transport.write(data)
            return
        self._buffer.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._buffer:
            return
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class _H2Stream(H2Stream):
    """grpclib's HTTP/2 stream, sending DATA frames as slices of a memoryview.

    grpclib's `send_data` copies a message into a BytesIO and each frame out of it again: two
    copies of every MiB a bulk Read sends. Otherwise the same (flow control, end of stream)."""

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        assert self.id is not None
        view = memoryview(data)
        pos, last = 0, len(data)
        while True:
            await self.connection.write_ready.wait()
            window = self._h2_connection.local_flow_control_window(self.id)
            if not window > 0:  # the window can become negative
                self.window_updated.clear()
                await self.window_updated.wait()
                continue  # other streams may have sent meanwhile: look again
            n = min(window, self._h2_connection.max_outbound_frame_size, last - pos)
            chunk = view[pos : pos + n]
            pos += n
            done = pos == last
            self._h2_connection.send_data(self.id, chunk, end_stream=end_stream and done)
            self._transport.write(self._h2_connection.data_to_send())
            self.data_sent += n
            self.connection.data_sent += n
            self.connection.data_send_process()
            if done:
                return


class _Connection(Connection):
    """grpclib's connection, creating `_H2Stream`s."""

    def create_stream(self, *, stream_id: int | None = None, wrapper: Any = None) -> H2Stream:
        return _H2Stream(
            self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper
        )


class _ServerH2Protocol(H2Protocol):
    """grpclib's HTTP/2 server protocol on a `_LargeFrameH2Connection`.

    Mirrors grpclib 0.4's `H2Protocol.connection_made`, which hard-codes h2's H2Connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_nodelay(sock)
        h2_conn = _LargeFrameH2Connection(config=self.h2_config)
        h2_conn.initiate_connection()
        initial = h2_conn.local_settings.initial_window_size
        conn_delta = self.config.http2_connection_window_size - initial
        if conn_delta:
            h2_conn.increment_flow_control_window(conn_delta)
        if self.config.http2_stream_window_size != initial:
            h2_conn.update_settings(
                {SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size}
            )
        self.connection = _Connection(
            h2_conn,
            _CoalescingTransport(transport),  # type: ignore[arg-type]
            config=self.config,
        )
        self.connection.flush()
        self.connection.initialize()
        self.processor = EventsProcessor(self.handler, self.connection)


class _LimitedH2Protocol(_ServerH2Protocol):
    """grpclib's HTTP/2 server protocol, counted against a ConnectionTracker and closed once
    idle (no stream open, no stream started and no message for `idle_timeout_s`)."""

    def __init__(self, *args: Any, tracker: ConnectionTracker) -> None:
        super().__init__(*args)
        self._tracker = tracker
        self._admitted = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._made_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._tracker.admit():
            transport.close()
            return
        self._admitted = True
        self._tracker.live.add(self)
        self._made_at = time.monotonic()
        super().connection_made(transport)
        if self._tracker.limits.idle_timeout_s > 0:
            self._check_idle_in(self._tracker.limits.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            super().data_received(data)

    def pause_writing(self) -> None:
        if self._admitted:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._tracker.open -= 1
        self._tracker.live.discard(self)
        if not self._tracker.live and self._tracker.all_gone is not None:
            self._tracker.all_gone.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        super().connection_lost(exc)

    def _check_idle_in(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self._tracker.limits.idle_timeout_s
        now = time.monotonic()
        if self.processor.streams:
            self._check_idle_in(timeout)
            return
        c = self.connection
        last = max(
            self._made_at,
            c.last_stream_created or 0.0,
            c.last_message_received or 0.0,
            c.last_message_sent or 0.0,
        )
        if now - last < timeout:
            self._check_idle_in(timeout - (now - last))
            return
        self._tracker.closed_idle += 1
        log.debug("closing a connection idle for %.0fs", now - last)
        self.close_connection("Connection idle")

    def send_goaway(self) -> None:
        with contextlib.suppress(Exception):
            self.connection._connection.close_connection()
            self.connection.flush()

    def close_connection(self, reason: str) -> None:
        # GOAWAY first: well-behaved clients then reconnect for their next call without error.
        with contextlib.suppress(Exception):
            self.connection._connection.close_connection()
            self.connection.flush()
        self.processor.close(reason)


class _Server(Server):
    """grpclib's Server on large-frame connections, counted and closed when idle (TCP
    listeners; with `tracker=None`, the private unix socket, neither)."""

    def __init__(self, *args: Any, tracker: ConnectionTracker | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._tracker = tracker

    def _protocol_factory(self) -> H2Protocol:
        # As grpclib's own factory, with our protocol classes.
        self.__gc_step__()
        handler = Handler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        if self._tracker is None:
            return _ServerH2Protocol(handler, self._config, self._h2_config)
        return _LimitedH2Protocol(handler, self._config, self._h2_config, tracker=self._tracker)


def _tolerate_connection_errors(loop: asyncio.AbstractEventLoop) -> Any:
    """Install a loop exception handler that logs, and never propagates, what asyncio reports
    about one connection or listener (accept() out of descriptors, a transport or protocol
    failing). Everything else goes to the previous handler (trio-asyncio's: raise in the
    nursery). Returns the previous handler, for `close` to restore."""
    previous = loop.get_exception_handler()
    warned_at = [-_WARN_INTERVAL_S]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_RESOURCE_ERRNOS:
            now = time.monotonic()
            if now - warned_at[0] >= _WARN_INTERVAL_S:
                warned_at[0] = now
                log.warning(
                    "accept() failed (%s); asyncio retries in a second. Raise the file "
                    "descriptor limit or lower server.max_connections",
                    os.strerror(exc.errno or 0),
                )
            return
        if any(k in context for k in ("transport", "protocol", "socket")):
            log.warning("connection error: %s", context.get("message"), exc_info=exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return previous


class GrpcServer:
    def __init__(
        self,
        servable: Servable,
        listen: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        unix_path: str | None = None,
        settings: ServerConfig | None = None,
    ) -> None:
        """`settings` gives the message size and connection limits (defaults: ServerConfig's)."""
        settings = settings or ServerConfig()
        self.servable = servable
        # Read by Servable.__mapping__ when each grpclib Server is built, in `start`.
        servable.max_receive_message_bytes = max_receive_message_bytes(settings)
        self.gate: RpcGate = servable.gate
        self.listen = list(listen)
        self.ssl_context = ssl_context
        self.unix_path = unix_path
        self.connections = ConnectionTracker(ConnectionLimits.from_config(settings))
        # With `processes = N` every process binds the same addresses and the kernel spreads
        # connections among them (SO_REUSEPORT; all must run as the same user).
        self.reuse_port = settings.processes > 1
        self.addresses: list[tuple[str, int]] = []
        self._servers: list[Server] = []
        self._previous_handler: Any = None
        self._handler_installed = False

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listen address; returns the bound (host, port) pairs."""
        await trio_asyncio.aio_as_trio(self._start_all)()
        return self.addresses

    async def _start_all(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._handler_installed:
            self._previous_handler = _tolerate_connection_errors(loop)
            self._handler_installed = True
        for addr in self.listen:
            host, port = parse_listen(addr)
            # Constructed here, inside asyncio: grpclib's Server looks up the running loop.
            server = _Server(
                [self.servable], status_details_codec=StatusDetailsCodec(), tracker=self.connections
            )
            await server.start(
                host,
                port,
                ssl=self.ssl_context,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            self._servers.append(server)
            for sock in server._server.sockets:  # type: ignore[union-attr]
                bound = sock.getsockname()
                self.addresses.append((bound[0], bound[1]))
        if self.unix_path:
            # A private socket for the in-process worker: no TLS, file mode 0600.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            server = _Server(
                [self.servable], status_details_codec=StatusDetailsCodec(), tracker=None
            )
            old = os.umask(0o077)
            try:
                await server.start(path=self.unix_path)
            finally:
                os.umask(old)
            self._servers.append(server)
        log.info(
            "gRPC listening on %s%s",
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            " (TLS)" if self.ssl_context else "",
        )

    async def drain(self, grace_period_s: float, *, close: bool = True) -> None:
        """Refuse new RPCs, wait up to the grace period for in-flight ones, then close."""
        self.gate.draining = True
        for server in self._servers:
            if server._server is not None:
                server._server.close()  # stop accepting new connections
        if self.gate.inflight:
            log.info(
                "draining: waiting up to %.1fs for %d RPCs", grace_period_s, self.gate.inflight
            )
        with trio.move_on_after(grace_period_s) as scope:
            await self.gate.wait_idle()
        if scope.cancelled_caught:
            log.warning("grace period over: cancelling %d RPCs", self.gate.inflight)
        else:
            # An RPC that just finished has sent its last message, but its client may not have
            # read it yet: grpclib's client drops unread messages of every stream when the
            # GOAWAY of the close arrives. A moment for them first.
            settle = CLOSE_GRACE_S - (time.monotonic() - self.gate.last_left)
            if settle > 0:
                await trio.sleep(settle)
        if close:
            await self.close()

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio_asyncio.aio_as_trio(self._close_all)()

    async def _close_all(self) -> None:
        for server in self._servers:
            server.close()
        # Live connections outlast Server.close(); end them so clients see the server go.
        await self.connections.close_all("Server closed")
        waits = [asyncio.ensure_future(s.wait_closed()) for s in self._servers]
        if waits:
            await asyncio.wait(waits, timeout=5)
        self._servers.clear()
        if self._handler_installed:
            asyncio.get_running_loop().set_exception_handler(self._previous_handler)
            self._handler_installed = False
