"""ByteStream service: chunked reads and resumable writes of CAS blobs.

Uploads in progress live in `UploadTable`, keyed by their full resource name (which includes
the client's upload uuid), so a client whose stream broke can ask QueryWriteStatus and resume
at `committed_size`. Idle uploads are aborted after `upload_idle_timeout_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_asyncio
import zstandard

from reexec import fastpb, rpc
from reexec.cas.limits import check_blob_size
from reexec.cas.resource import Compressor, ResourceName, parse_read_name, parse_write_name
from reexec.cas.store import READ_CHUNK, BlobWriter, Store
from reexec.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from reexec.gen.google import bytestream as bs
from reexec.metrics import CAS_BYTES
from reexec.rpc import (
    SLOW,
    Cardinality,
    Service,
    Slow,
    Stream,
    aio,
    check_instance,
    in_trio,
    unary,
)

log = logging.getLogger(__name__)

# Write messages are received on the asyncio side until this much data (or finish_write, or the
# end of the stream) and then cross into Trio together: one crossing per batch instead of two
# per message (Bazel sends 16 KiB chunks).
WRITE_BATCH = 1 << 20
# Decompressed output of a zstd upload reaches the writer in pieces of at most this size.
ZSTD_OUTPUT_CHUNK = 1 << 20
# zstd input handed to the decompressor at a time; output is checked against the limit between
# slices (at most a few tens of MiB of decompression work past it, then the upload is refused).
ZSTD_INPUT_SLICE = 4096
# Resumable uploads open at once in one server unless configured otherwise.
DEFAULT_MAX_OPEN_UPLOADS = 512


async def recv_batch(stream: Stream, into: list[Any], max_bytes: int = WRITE_BATCH) -> None:
    """asyncio side: append messages to `into` until >= `max_bytes` of data, finish_write,
    or the end of the stream (appended as None); always at least one message.

    Appends as it goes, so a caller whose stream breaks mid-batch still has what arrived.
    """
    n = 0
    while True:
        m = await stream.recv_message()
        into.append(m)
        if m is None or m.finish_write:
            return
        n += len(m.data)
        if n >= max_bytes:
            return


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class ReadResponseWire:
    """A google.bytestream.ReadResponse in wire form, built with one copy of its data.

    The Read handler's response type: grpclib only calls `SerializeToString`. Building a upb
    ReadResponse copies the data in, serializing copies it out again; a 1 MiB chunk of a bulk
    Read paid both. Field 10 (`data`), length-delimited; omitted when empty, as proto3 does."""

    __slots__ = ("_wire",)

    def __init__(self, data: bytes) -> None:
        self._wire = b"".join((b"\x52", _varint(len(data)), data)) if data else b""

    def SerializeToString(self) -> bytes:
        return self._wire


def _continues(batch: Sequence[Any]) -> bool:
    """Whether more messages may follow a batch (it ended with neither the stream's end nor
    finish_write)."""
    last = batch[-1]
    return last is not None and not last.finish_write


class _ReceiveAhead:
    """The next batch of Write messages, received by an asyncio task on grpclib's side while
    the Trio side works on the current one. Owned by one Write handler, which takes `result`
    or calls `cancel`."""

    def __init__(self, stream: Stream) -> None:
        self.batch: list[Any] = []
        self._task = trio_asyncio.current_loop.get().create_task(recv_batch(stream, self.batch))

    async def result(self) -> tuple[list[Any], BaseException | None]:
        """The batch, and the error that broke the stream if it broke after some of it
        arrived (a break before any message is raised)."""
        try:
            await trio_asyncio.run_aio_future(self._task)
        except BaseException as e:
            if not self.batch:
                raise
            return self.batch, e
        return self.batch, None

    def cancel(self) -> None:
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # retrieved: asyncio would log it as never retrieved
        else:
            self._task.cancel()


@dataclass
class BatchCheck:
    """What a batch of Write messages amounts to: the data of its valid prefix, and why it
    stopped (finish_write, or an error to raise once that prefix has been fed)."""

    parts: list[bytes]
    finished: bool = False
    error: InvalidArgument | None = None


def check_batch(batch: Sequence[Any], key: str, offset: int) -> BatchCheck:
    """Validate each message of a batch in order, as if fed one by one from `offset`."""
    out = BatchCheck([])
    for request in batch:
        if request is None:
            # The upload stays in the table so the client can resume it.
            out.error = InvalidArgument(
                f"Write stream for {key} ended without finish_write at {offset} bytes"
            )
            return out
        if request.resource_name and request.resource_name != key:
            out.error = InvalidArgument(
                f"resource_name changed within one Write stream: {request.resource_name!r}"
            )
            return out
        if request.write_offset != offset:
            out.error = InvalidArgument(
                f"write_offset {request.write_offset} does not match the "
                f"{offset} bytes committed for {key}"
            )
            return out
        data = request.data  # once: every read of a upb bytes field copies it
        if data:
            out.parts.append(data)
            offset += len(data)
        if request.finish_write:
            out.finished = True
            return out
    return out


def max_compressed_size(size: int) -> int:
    """A generous bound on the zstd encoding of `size` bytes: ZSTD_compressBound (size plus
    size/256 plus a little) with room for several frames and their headers."""
    return size + (size >> 7) + (64 << 10)


class _BoundedSink:
    """Collects decompressed output up to `limit` bytes in total; past it, drops the output and
    sets `overflow` (raising from here would leak: python-zstandard's stream_writer does not
    free its output buffer when the sink's write raises)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.overflow = False
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.total += len(data)
        if self.total > self.limit:
            self.overflow = True
        else:
            self.parts.append(data)
        return len(data)


class BoundedZstd:
    """Streaming zstd decompression whose total output may not exceed the blob's declared size.

    A few KiB of zstd can expand to gigabytes; output is produced in `ZSTD_OUTPUT_CHUNK` pieces
    and counted as it appears, so at most the declared size (plus one chunk) is ever held.
    """

    def __init__(self, declared_size: int) -> None:
        self._sink = _BoundedSink(declared_size)
        self._writer: Any = zstandard.ZstdDecompressor().stream_writer(
            self._sink, write_size=ZSTD_OUTPUT_CHUNK, write_return_read=True, closefd=False
        )

    def release(self) -> None:
        """Free the decompression context and its buffers (several MiB for a large window) now:
        a failed upload's error and its traceback may be kept a while by whoever reports it."""
        self._writer = None
        self._sink.parts.clear()

    def decompress(self, data: bytes) -> bytes:
        """The plain bytes `data` completes. Raises InvalidArgument for corrupt data or output
        beyond the declared size. Thread-safe only in the sense that one upload is fed by one
        stream at a time (the upload's `busy` flag)."""
        if self._writer is None:
            raise InvalidArgument("this zstd upload already failed")
        # No local reference to the writer: an error's traceback keeps this frame's locals,
        # and whoever reports the error may keep it (with several MiB of zstd window) a while.
        view = memoryview(data)
        try:
            # Fed in slices, checking between them: one slice can expand to at most ~30,000
            # times its size, so a bomb is stopped after a bounded amount of work.
            for start in range(0, len(view), ZSTD_INPUT_SLICE):
                self._writer.write(view[start : start + ZSTD_INPUT_SLICE])
                if self._sink.overflow:
                    self.release()
                    raise InvalidArgument(
                        f"zstd data decompresses to more than the declared {self._sink.limit} bytes"
                    )
        except zstandard.ZstdError as e:
            self.release()
            raise InvalidArgument(f"invalid zstd data: {e}") from None
        finally:
            view.release()
        out = b"".join(self._sink.parts)
        self._sink.parts.clear()
        return out


@dataclass
class Upload:
    """One resumable upload. `received` counts wire bytes (compressed ones for zstd uploads)."""

    name: ResourceName
    writer: BlobWriter
    decompressor: BoundedZstd | None
    received: int = 0
    last_active: float = field(default_factory=time.monotonic)
    busy: bool = False

    @property
    def committed_size(self) -> int:
        return self.received if self.decompressor is not None else self.writer.committed_size


class UploadTable:
    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.uploads: dict[str, Upload] = {}

    async def expire(self) -> None:
        """Abort uploads idle for longer than the timeout (run periodically)."""
        now = time.monotonic()
        for key, up in list(self.uploads.items()):
            if not up.busy and now - up.last_active > self.idle_timeout_s:
                del self.uploads[key]
                await up.writer.abort()

    async def run_expiry(self) -> None:
        while True:
            await trio.sleep(max(self.idle_timeout_s / 4, 1.0))
            await self.expire()

    async def abort_all(self) -> None:
        for up in self.uploads.values():
            await up.writer.abort()
        self.uploads.clear()


class ByteStreamService(Service):
    SERVICE = "google.bytestream.ByteStream"

    def __init__(
        self,
        cas: Store,
        *,
        instances: Sequence[str] = (),
        uploads: UploadTable | None = None,
        read_chunk_bytes: int = READ_CHUNK,
        max_open_uploads: int = DEFAULT_MAX_OPEN_UPLOADS,
    ) -> None:
        self.cas = cas
        self.instances = tuple(instances)
        self.uploads = uploads or UploadTable(600.0)
        self.read_chunk = read_chunk_bytes
        self.max_open_uploads = max_open_uploads

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "Read": (
                self._handle_read,
                Cardinality.UNARY_STREAM,
                fastpb.ReadRequest,
                ReadResponseWire,
            ),
            "Write": (
                self._handle_write,
                Cardinality.STREAM_UNARY,
                fastpb.WriteRequest,
                fastpb.WriteResponse,
            ),
            "QueryWriteStatus": unary(
                self.query_write_status, bs.QueryWriteStatusRequest, bs.QueryWriteStatusResponse
            ),
        }

    # -- Read -------------------------------------------------------------------------------

    async def _handle_read(self, stream: Stream) -> None:
        # asyncio side: one crossing per Read; a small blob comes back whole and is sent from
        # here, larger ones are streamed from Trio.
        request = await stream.recv_message()
        data = self._read_nowait(request) if rpc.FAST_PATHS else SLOW
        if data is SLOW:
            data = await in_trio(self._read, stream, request)
        if data is not None:
            await stream.send_message(ReadResponseWire(data))

    def _read_request(self, request: Any) -> ResourceName:
        """The blob a Read request names, once the request is checked."""
        name = parse_read_name(request.resource_name)
        check_instance(self.instances, name.instance)
        offset, limit = request.read_offset, request.read_limit
        if offset < 0:
            raise OutOfRange(f"read_offset {offset} is negative")
        if limit < 0:
            raise InvalidArgument(f"read_limit {limit} is negative")
        if offset > name.digest.size:
            raise OutOfRange(
                f"read_offset {offset} is past the end of {name.digest.blob_path} ({name.digest.size} bytes)"
            )
        return name

    def _is_whole_small_read(self, request: Any, name: ResourceName) -> bool:
        return (
            name.compressor is Compressor.IDENTITY
            and not request.read_offset
            and not request.read_limit
            and 0 < name.digest.size <= self.read_chunk
        )

    def _read_nowait(self, request: Any) -> bytes | Slow:
        """A small blob read whole, if the store has it at hand; else SLOW."""
        name = self._read_request(request)
        if not self._is_whole_small_read(request, name):
            return SLOW
        data = self.cas.get_bytes_nowait(name.digest)
        if data is None:
            return SLOW
        CAS_BYTES.inc(len(data), "read")
        return data

    async def _read(self, stream: Stream, request: Any) -> bytes | None:
        """Serve a Read: returns the whole blob when it fits in one response (the caller sends
        it), else streams the responses itself and returns None."""
        name = self._read_request(request)
        offset, limit = request.read_offset, request.read_limit
        if name.compressor is Compressor.ZSTD:
            if limit:
                raise InvalidArgument("read_limit must be 0 when reading compressed-blobs")
            await self._read_zstd(stream, name, offset)
            return None
        if self._is_whole_small_read(request, name):
            data = await self.cas.get_bytes(name.digest)
            CAS_BYTES.inc(len(data), "read")
            return data
        remaining = (
            (name.digest.size - offset) if not limit else min(limit, name.digest.size - offset)
        )
        async with self.cas.open_read(name.digest, offset) as reader:
            while remaining > 0:
                chunk = await reader.read(min(self.read_chunk, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                CAS_BYTES.inc(len(chunk), "read")
                await aio(stream.send_message, ReadResponseWire(chunk))
        return None

    async def _read_zstd(self, stream: Stream, name: ResourceName, offset: int) -> None:
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        async with self.cas.open_read(name.digest, offset) as reader:
            sent_any = False
            while chunk := await reader.read(self.read_chunk):
                out = await trio.to_thread.run_sync(compressor.compress, chunk)
                if out:
                    sent_any = True
                    await aio(stream.send_message, ReadResponseWire(out))
            tail = compressor.flush()
            if tail or not sent_any:
                await aio(stream.send_message, ReadResponseWire(tail))

    # -- Write ------------------------------------------------------------------------------

    async def _handle_write(self, stream: Stream) -> None:
        # asyncio side. The first message alone, as before batching: the upload is answered
        # early if the blob exists, and is listed for QueryWriteStatus as soon as it starts.
        first = await stream.recv_message()
        response = self._write_nowait(first) if rpc.FAST_PATHS else SLOW
        if response is SLOW:
            await in_trio(self.write, stream, first)
        else:
            await stream.send_message(response)

    def _write_nowait(self, first: Any) -> Any:
        """A whole small blob in one message, stored without waiting; else SLOW. Answers as
        `write` does: an existing blob is not written (nor its data checked) again."""
        if first is None or not first.finish_write or first.write_offset:
            return SLOW
        key = first.resource_name
        name = parse_write_name(key)
        check_instance(self.instances, name.instance)
        digest = name.digest
        data = first.data
        if (
            name.compressor is not Compressor.IDENTITY
            or len(data) != digest.size
            or key in self.uploads.uploads
        ):
            return SLOW
        check_blob_size(self.cas, digest.size, digest.blob_path)
        missing = self.cas.find_missing_nowait([digest])
        if missing is None:
            return SLOW
        if missing:
            if not self.cas.put_bytes_nowait(digest, data):
                return SLOW
            CAS_BYTES.inc(len(data), "write")
        return fastpb.WriteResponse(committed_size=digest.size)

    async def write(self, stream: Stream, first: Any) -> None:
        """Serve a Write whose first message (or None: no message) the handler received."""
        batch: list[Any] = [first]
        broken: BaseException | None = None
        if first is None:
            raise InvalidArgument("Write stream closed before its first message")
        key = first.resource_name
        name = parse_write_name(key)
        check_instance(self.instances, name.instance)
        digest = name.digest
        compressed = name.compressor is Compressor.ZSTD
        check_blob_size(self.cas, digest.size, digest.blob_path)

        # After a break the task is being cancelled: what arrived is still kept (shielded), so
        # a resumed upload continues from there, as when messages were fed one at a time.
        with trio.CancelScope(shield=broken is not None):
            if await self.cas.has(digest):
                await self._abandon(key)
                if broken is not None:
                    raise broken
                await aio(
                    stream.send_message,
                    fastpb.WriteResponse(committed_size=-1 if compressed else digest.size),
                )
                return
            if (
                len(batch) == 1
                and first.finish_write
                and not first.write_offset
                and not compressed
                and len(data := first.data) == digest.size
                and key not in self.uploads.uploads
            ):
                # The whole blob in one message (small blobs): store it in one go, without an
                # UploadTable entry or a streaming writer and its temp file.
                CAS_BYTES.inc(len(data), "write")
                await self.cas.put_bytes(digest, data)
                await aio(stream.send_message, fastpb.WriteResponse(committed_size=digest.size))
                return
            upload = await self._resume_or_start(key, name, first.write_offset)

        upload.busy = True
        try:
            while True:
                # The next batch is received while this one is hashed and written (threads):
                # on two cores an upload then costs about the larger of the two, not their sum.
                ahead = _ReceiveAhead(stream) if broken is None and _continues(batch) else None
                try:
                    with trio.CancelScope(shield=broken is not None):
                        finished = await self._apply(upload, key, batch)
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                    raise
                if broken is not None:
                    raise broken
                if finished:
                    self.uploads.uploads.pop(key, None)
                    # Compressed uploads report the wire bytes they received.
                    size = upload.committed_size if compressed else digest.size
                    await aio(stream.send_message, fastpb.WriteResponse(committed_size=size))
                    return
                # Not finished: the batch ended with a data message, so `ahead` was started.
                assert ahead is not None
                batch, broken = await ahead.result()
        finally:
            upload.busy = False

    async def _apply(self, upload: Upload, key: str, batch: list[Any]) -> bool:
        """Feed a batch's data to the upload; commit on finish_write. Returns whether it did."""
        check = check_batch(batch, key, upload.committed_size)
        try:
            if check.parts:
                await self._feed(upload, b"".join(check.parts))
            if check.finished:
                await upload.writer.commit()
        except (InvalidArgument, OSError):
            # Wrong size, bad hash or corrupt zstd data: the upload cannot be resumed. A storage
            # failure (a full disk) must not keep its partial data around for the idle timeout.
            await self._abandon(key)
            raise
        upload.last_active = time.monotonic()
        if check.error is not None:
            raise check.error
        return check.finished

    async def _resume_or_start(self, key: str, name: ResourceName, offset: int) -> Upload:
        existing = self.uploads.uploads.get(key)
        if existing is not None:
            if existing.busy:
                raise InvalidArgument(f"another Write stream is already uploading {key}")
            if offset == existing.committed_size:
                return existing
            if offset != 0:
                raise InvalidArgument(
                    f"write_offset {offset} does not match the {existing.committed_size} bytes committed for {key}"
                )
            await self._abandon(key)
        elif offset != 0:
            raise InvalidArgument(
                f"write_offset {offset} for {key}, which has no upload in progress"
            )
        if len(self.uploads.uploads) >= self.max_open_uploads:
            await self.uploads.expire()
            if len(self.uploads.uploads) >= self.max_open_uploads:
                raise ResourceExhausted(
                    f"{len(self.uploads.uploads)} uploads are already open on this server "
                    f"(max_open_uploads {self.max_open_uploads}); finish or retry later"
                )
        writer = await self.cas.open_write(name.digest)
        decompressor = BoundedZstd(name.digest.size) if name.compressor is Compressor.ZSTD else None
        upload = Upload(name, writer, decompressor)
        self.uploads.uploads[key] = upload
        return upload

    async def _feed(self, upload: Upload, data: bytes) -> None:
        if not data:
            return
        upload.received += len(data)
        CAS_BYTES.inc(len(data), "write")
        if upload.decompressor is None:
            await upload.writer.write(data)
            return
        bound = max_compressed_size(upload.name.digest.size)
        if upload.received > bound:
            # Skippable frames or empty blocks decompress to nothing and could stream forever.
            raise InvalidArgument(
                f"{upload.name.format()}: {upload.received} bytes of zstd data, more than any "
                f"encoding of {upload.name.digest.size} bytes needs ({bound})"
            )
        try:
            plain = await trio.to_thread.run_sync(upload.decompressor.decompress, data)
        except InvalidArgument as e:
            raise InvalidArgument(f"{upload.name.format()}: {e.message}") from None
        if plain:
            await upload.writer.write(plain)

    async def _abandon(self, key: str) -> None:
        up = self.uploads.uploads.pop(key, None)
        if up is not None:
            if up.decompressor is not None:
                up.decompressor.release()
            await up.writer.abort()

    # -- QueryWriteStatus -------------------------------------------------------------------

    async def query_write_status(
        self, request: bs.QueryWriteStatusRequest, stream: Stream | None = None
    ) -> bs.QueryWriteStatusResponse:
        name = parse_write_name(request.resource_name)
        check_instance(self.instances, name.instance)
        if await self.cas.has(name.digest):
            return bs.QueryWriteStatusResponse(committed_size=name.digest.size, complete=True)
        upload = self.uploads.uploads.get(request.resource_name)
        if upload is None:
            raise NotFound(f"no upload in progress for {request.resource_name}")
        return bs.QueryWriteStatusResponse(committed_size=upload.committed_size, complete=False)
