"""Hosts grpclib servers inside the Trio nursery (through trio-asyncio) with graceful drain.

grpclib's `Server.close()` cancels handlers at once, so draining is built above it: stop
accepting connections, refuse new RPCs on live ones (UNAVAILABLE, via the RpcGate), wait for
in-flight RPCs up to the grace period, and only then close and cancel what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Sequence

import trio
import trio_asyncio
from grpclib.server import Server

from reexec.daemon.config import TlsConfig, parse_listen
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


class GrpcServer:
    def __init__(
        self,
        servable: Servable,
        listen: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        unix_path: str | None = None,
    ) -> None:
        self.servable = servable
        self.gate: RpcGate = servable.gate
        self.listen = list(listen)
        self.ssl_context = ssl_context
        self.unix_path = unix_path
        self.addresses: list[tuple[str, int]] = []
        self._servers: list[Server] = []

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listen address; returns the bound (host, port) pairs."""
        await trio_asyncio.aio_as_trio(self._start_all)()
        return self.addresses

    async def _start_all(self) -> None:
        for addr in self.listen:
            host, port = parse_listen(addr)
            # Constructed here, inside asyncio: grpclib's Server looks up the running loop.
            server = Server([self.servable], status_details_codec=StatusDetailsCodec())
            await server.start(host, port, ssl=self.ssl_context, reuse_address=True)
            self._servers.append(server)
            for sock in server._server.sockets:  # type: ignore[union-attr]
                bound = sock.getsockname()
                self.addresses.append((bound[0], bound[1]))
        if self.unix_path:
            # A private socket for the in-process worker: no TLS, file mode 0600.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            server = Server([self.servable], status_details_codec=StatusDetailsCodec())
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
        if close:
            await self.close()

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio_asyncio.aio_as_trio(self._close_all)()

    async def _close_all(self) -> None:
        for server in self._servers:
            server.close()
        waits = [asyncio.ensure_future(s.wait_closed()) for s in self._servers]
        if waits:
            await asyncio.wait(waits, timeout=5)
        self._servers.clear()
