"""GrpcStore: another REAPI endpoint used as a store (a storage host, a shard of a cluster).

FindMissingBlobs in requests of at most FIND_MISSING_CHUNK digests (so each stays far below a
server's message limit), BatchReadBlobs / BatchUpdateBlobs for small blobs, ByteStream for the
rest, one channel reused by every call. Every call has a deadline (`timeout_s`; ByteStream calls
per message, so a large blob can take as long as it streams). An endpoint that cannot be reached
is `Unavailable` (a `shard` store above turns that into "missing"); statuses it answers keep
their meaning (`remote_errors.py`). Reads are checked against their digest, so a faulty or
hostile endpoint cannot hand us wrong bytes.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.cas.digest import Digest, hex_length, is_empty, new_hasher
from reexec.cas.remote_errors import UNREACHABLE, from_status, remote_errors
from reexec.cas.resource import ResourceName
from reexec.cas.store import (
    READ_CHUNK,
    BlobNotFound,
    BlobReader,
    BlobWriter,
    Store,
    check_offset,
    dedupe,
)
from reexec.errors import Internal, InvalidArgument, NotFound, Unavailable
from reexec.grpc_client import aio, open_stream, unary
from reexec.rpc import StatusDetailsCodec

FIND_MISSING_CHUNK = 10_000
# Blobs up to this size go through the batch RPCs, in batches up to BATCH_BYTES.
SMALL_BLOB = 256 * 1024
BATCH_BYTES = 2 * 1024 * 1024

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_READ = "/google.bytestream.ByteStream/Read"
_WRITE = "/google.bytestream.ByteStream/Write"

ChannelFactory = Callable[[], Awaitable[Channel]]


class GrpcStore(Store):
    def __init__(
        self,
        channel_factory: ChannelFactory,
        *,
        instance: str = "",
        timeout_s: float = 60.0,
        endpoint: str = "",
    ) -> None:
        self._factory = channel_factory
        self._channel: Channel | None = None
        self._lock = trio.Lock()
        self.instance = instance
        self.timeout_s = timeout_s
        self.endpoint = endpoint
        self.calls = 0

    async def _ch(self) -> Channel:
        # One channel for every call (grpclib multiplexes streams on its connection and
        # reconnects by itself after a failure).
        if self._channel is None:
            async with self._lock:
                if self._channel is None:
                    self._channel = await self._factory()
        return self._channel

    async def _unary(self, method: str, request: Any, response_type: type) -> Any:
        self.calls += 1
        channel = await self._ch()
        with remote_errors(f"{self.endpoint} {method}"):
            return await unary(
                channel, _CAS + method, request, response_type, deadline_s=self.timeout_s
            )

    # -- the three verbs ----------------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        digests = [d for d in dedupe(digests) if not is_empty(d)]
        # A hash of the wrong length for its function names nothing a CAS can hold: missing,
        # without asking (the endpoint would refuse the whole request).
        malformed = {d for d in digests if len(d.hash) != hex_length(d.function)}
        missing: set[tuple[str, int, int]] = {(d.hash, d.size, int(d.function)) for d in malformed}
        by_function: dict[int, list[Digest]] = {}
        for d in digests:
            if d not in malformed:
                by_function.setdefault(int(d.function), []).append(d)
        for function, group in by_function.items():
            for start in range(0, len(group), FIND_MISSING_CHUNK):
                req = fastpb.FindMissingBlobsRequest(instance_name=self.instance)
                req.digest_function = function
                for d in group[start : start + FIND_MISSING_CHUNK]:
                    req.blob_digests.add(hash=d.hash, size_bytes=d.size)
                resp = await self._unary("FindMissingBlobs", req, fastpb.FindMissingBlobsResponse)
                missing.update((m.hash, m.size_bytes, function) for m in resp.missing_blob_digests)
        return [d for d in digests if (d.hash, d.size, int(d.function)) in missing]

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        check_offset(digest, offset)
        if is_empty(digest) or offset == digest.size:
            yield _Reader(digest.size, None)
            return
        channel = await self._ch()
        name = ResourceName(self.instance, digest).format()
        async with AsyncExitStack() as stack:
            with remote_errors(f"{self.endpoint} ByteStream.Read of {digest.blob_path}"):
                stream = await stack.enter_async_context(
                    open_stream(
                        channel,
                        _READ,
                        Cardinality.UNARY_STREAM,
                        fastpb.ReadRequest,
                        fastpb.ReadResponse,
                    )
                )
                request = fastpb.ReadRequest(resource_name=name, read_offset=offset)
                await aio(stream.send_message, request, end=True)
            reader = _Reader(digest.size, stream, self.timeout_s, digest, self.endpoint)
            await reader.prime()
            yield reader

    async def get_bytes(self, digest: Digest) -> bytes:
        if is_empty(digest):
            return b""
        if digest.size > SMALL_BLOB:
            data = await super().get_bytes(digest)
        else:
            req = fastpb.BatchReadBlobsRequest(instance_name=self.instance)
            req.digest_function = int(digest.function)
            req.digests.add(hash=digest.hash, size_bytes=digest.size)
            resp = await self._unary("BatchReadBlobs", req, fastpb.BatchReadBlobsResponse)
            if len(resp.responses) != 1:
                raise Internal(f"{self.endpoint}: BatchReadBlobs answered {len(resp.responses)}")
            r = resp.responses[0]
            if r.status.code == Status.NOT_FOUND.value:
                raise BlobNotFound(digest)
            if r.status.code:
                raise from_status(r.status.code, f"{self.endpoint}: {r.status.message}")
            data = r.data
        _verify(digest, data, self.endpoint)
        return data

    async def open_write(self, digest: Digest) -> BlobWriter:
        return _Writer(self, digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        if is_empty(digest) and not data:
            return
        if len(data) != digest.size:
            raise InvalidArgument(f"size mismatch for {digest.blob_path}: got {len(data)} bytes")
        if digest.size > SMALL_BLOB:
            await super().put_bytes(digest, data)
            return
        req = fastpb.BatchUpdateBlobsRequest(instance_name=self.instance)
        req.digest_function = int(digest.function)
        r = req.requests.add(data=data)
        r.digest.hash, r.digest.size_bytes = digest.hash, digest.size
        resp = await self._unary("BatchUpdateBlobs", req, fastpb.BatchUpdateBlobsResponse)
        for r in resp.responses:
            if r.status.code:
                raise from_status(r.status.code, f"{self.endpoint}: {r.status.message}")

    async def aclose(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stats(self) -> dict[str, int]:
        return {"remote_calls": self.calls}


def _verify(digest: Digest, data: bytes, endpoint: str) -> None:
    h = new_hasher(digest.function)
    h.update(data)
    if len(data) != digest.size or h.hexdigest() != digest.hash:
        raise Internal(f"{endpoint} returned bytes that do not match {digest.blob_path}")


class _Reader:
    """Chunks of a ByteStream Read, re-cut to the sizes the caller asks for."""

    def __init__(
        self,
        size: int,
        stream: Stream | None,
        timeout_s: float = 60.0,
        digest: Digest | None = None,
        endpoint: str = "",
    ) -> None:
        self.size = size
        self._stream = stream
        self._timeout_s = timeout_s
        self._digest = digest
        self._endpoint = endpoint
        self._buf = b""
        self._done = stream is None

    async def _next(self) -> bytes | None:
        assert self._stream is not None and self._digest is not None
        what = f"{self._endpoint} ByteStream.Read of {self._digest.blob_path}"
        try:
            with trio.fail_after(self._timeout_s), remote_errors(what):
                resp = await aio(self._stream.recv_message)
        except trio.TooSlowError:
            raise Unavailable(f"{what}: no data for {self._timeout_s:g}s") from None
        return None if resp is None else bytes(resp.data)

    async def prime(self) -> None:
        """Read the first chunk, so a missing blob fails in `open_read`, not in `read`."""
        try:
            first = await self._next()
        except Exception as e:
            if isinstance(e, NotFound):
                assert self._digest is not None
                raise BlobNotFound(self._digest) from None
            raise
        if first is None:
            self._done = True
        else:
            self._buf = first

    async def read(self, n: int = READ_CHUNK) -> bytes:
        while len(self._buf) < n and not self._done:
            chunk = await self._next()
            if chunk is None:
                self._done = True
            else:
                self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class _Writer:
    """A ByteStream Write opened on the first chunk and finished by `commit`."""

    def __init__(self, store: GrpcStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self.committed_size = 0  # accepted by `write` (sent, or pending for the next message)
        self._sent = 0
        self._stack = AsyncExitStack()
        self._stream: Stream | None = None
        self._name = ResourceName(store.instance, digest, upload_id=str(uuid.uuid4())).format()
        self._pending = b""

    def _what(self) -> str:
        return f"{self._store.endpoint} ByteStream.Write of {self.digest.blob_path}"

    async def _send(self, data: bytes, last: bool) -> None:
        if self._stream is None:
            channel = await self._store._ch()
            with remote_errors(self._what()):
                self._stream = await self._stack.enter_async_context(
                    open_stream(
                        channel,
                        _WRITE,
                        Cardinality.STREAM_UNARY,
                        fastpb.WriteRequest,
                        fastpb.WriteResponse,
                    )
                )
        request = fastpb.WriteRequest(
            resource_name=self._name if self._sent == 0 else "",
            write_offset=self._sent,
            data=data,
            finish_write=last,
        )
        try:
            with trio.fail_after(self._store.timeout_s), remote_errors(self._what()):
                await aio(self._stream.send_message, request, end=last)
        except trio.TooSlowError:
            raise Unavailable(f"{self._what()}: stalled for {self._store.timeout_s:g}s") from None
        self._sent += len(data)

    async def write(self, data: bytes) -> None:
        if self.committed_size + len(data) > self.digest.size:
            raise InvalidArgument(f"more than {self.digest.size} bytes for {self.digest.blob_path}")
        # Whole chunks go out as they fill; the last one waits for `commit` (finish_write).
        self._pending += data
        self.committed_size += len(data)
        while len(self._pending) > READ_CHUNK:
            chunk, self._pending = self._pending[:READ_CHUNK], self._pending[READ_CHUNK:]
            await self._send(chunk, last=False)

    async def commit(self) -> None:
        if is_empty(self.digest):
            return
        if self.committed_size != self.digest.size:
            raise InvalidArgument(
                f"size mismatch for {self.digest.blob_path}: got {self.committed_size} bytes"
            )
        try:
            await self._send(self._pending, last=True)
            self._pending = b""
            assert self._stream is not None
            with trio.fail_after(self._store.timeout_s), remote_errors(self._what()):
                await aio(self._stream.recv_message)
        except trio.TooSlowError:
            raise Unavailable(f"{self._what()}: no answer in {self._store.timeout_s:g}s") from None
        finally:
            await self._close()

    async def abort(self) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            await self._stack.aclose()
        except (GRPCError, *UNREACHABLE):
            pass  # the stream is gone either way


def channel_factory(
    url: str, *, tls_ca: str | None = None, config: Configuration | None = None
) -> ChannelFactory:
    """Channels to `grpc://host:port` or `grpcs://host:port` (TLS, verified with `tls_ca` or
    the system's CAs), with grpclib's `config` (e.g. HTTP/2 keepalive pings) if given."""
    scheme, sep, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    if not sep or scheme not in ("grpc", "grpcs") or not host or not port.isdigit():
        raise ValueError(f"{url!r} is not grpc://HOST:PORT or grpcs://HOST:PORT")
    ctx = None
    if scheme == "grpcs":
        ctx = ssl.create_default_context(cafile=tls_ca)
        ctx.set_alpn_protocols(["h2"])

    async def make() -> Channel:
        async def inner() -> Channel:
            return Channel(
                host.strip("[]"),
                int(port),
                ssl=ctx,
                status_details_codec=StatusDetailsCodec(),
                config=config,
            )

        return await trio_asyncio.aio_as_trio(inner)()

    return make
