"""How a worker reaches the CAS: over gRPC (a remote scheduler host) or in process (all-in-one).

Both offer the same small interface, used by the local cache to fetch inputs and by output
collection to upload results. The in-process variant uses the store's own capabilities
(`Store.local_files`, `adopt_file`, `discard_if_same_file`, `hold`): with a filesystem store on
the same file system, inputs and outputs are hardlinked, never copied, and outputs are hashed by
the store before they become blobs. Failures reaching the CAS surface as ReexecErrors: a missing
blob as BlobNotFound, an unreachable CAS as Unavailable (worth retrying elsewhere), a refused
blob as ResourceExhausted.
"""

from __future__ import annotations

import abc
import logging
import os
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import trio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.cas.digest import Digest, is_empty, new_hasher
from reexec.cas.remote_errors import UNREACHABLE, from_status, remote_errors
from reexec.cas.resource import ResourceName
from reexec.cas.store import READ_CHUNK, BlobNotFound, Store
from reexec.errors import (
    Internal,
    InvalidArgument,
    Unavailable,
)
from reexec.grpc_client import aio, open_stream, unary
from reexec.rpc import WORKER_HEADER

log = logging.getLogger(__name__)

# Blobs up to this size travel in BatchReadBlobs / BatchUpdateBlobs requests.
SMALL_BLOB = 256 * 1024
BATCH_BYTES = 3 * 1024 * 1024


class CasAccess(abc.ABC):
    # Whether small blobs are cheaper fetched in batches (over a network) than one by one.
    prefers_batches = False

    @abc.abstractmethod
    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]: ...

    @abc.abstractmethod
    async def read_small(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        """Contents of small blobs; raises BlobNotFound for the first one missing."""

    @abc.abstractmethod
    async def fetch_to(self, digest: Digest, path: Path) -> None:
        """Create `path` (a new file) holding the blob, verified against its digest."""

    async def local_sources(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        """Files on this file system holding some of the blobs, to hardlink from (default none)."""
        return {}

    @abc.abstractmethod
    async def upload(self, blobs: dict[Digest, Path | bytes]) -> None:
        """Make sure the CAS holds every blob (content from a file or bytes)."""

    async def discard_modified(self, files: Sequence[tuple[Digest, int, int]]) -> None:  # noqa: B027
        """The worker found these cache files (digest, st_dev, st_ino) modified by an action.

        A CAS that shares their inodes (hardlinks) holds the same corrupted bytes and must
        drop those blobs; a remote CAS has its own copies and ignores this.
        """

    def max_blob_bytes(self) -> int | None:
        """The largest blob the CAS accepts, if known (outputs beyond it fail the action early)."""
        return None

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        """Keep these blobs from eviction in the CAS while an action uses them (if it can)."""
        return nullcontext()


class LocalStoreAccess(CasAccess):
    """The daemon's own store, in process (all-in-one `reexecd serve`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.links = 0
        self.copies = 0
        self.discarded = 0

    def max_blob_bytes(self) -> int | None:
        return self.store.max_blob_bytes()

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self.store.hold(digests)

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return await self.store.find_missing(digests)

    async def local_sources(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        found = await self.store.local_files(digests)
        self.links += len(found)
        return found

    async def read_small(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        return {d: await self.store.get_bytes(d) for d in digests}

    async def fetch_to(self, digest: Digest, path: Path) -> None:
        source = None if is_empty(digest) else (await self.store.local_files([digest])).get(digest)
        if source is not None:
            try:
                await trio.to_thread.run_sync(os.link, source, path)
                self.links += 1
                return
            except FileNotFoundError:
                pass  # evicted meanwhile: fall through to a read, which reports NOT_FOUND
            except OSError:
                pass  # another file system, or too many links: copy instead
        self.copies += 1
        async with self.store.open_read(digest) as reader:
            f = await trio.to_thread.run_sync(lambda: open(path, "xb"))
            try:
                while chunk := await reader.read(READ_CHUNK):
                    await trio.to_thread.run_sync(f.write, chunk)
            finally:
                f.close()

    async def discard_modified(self, files: Sequence[tuple[Digest, int, int]]) -> None:
        for digest, dev, ino in files:
            if await self.store.discard_if_same_file(digest, dev, ino):
                self.discarded += 1
                log.warning(
                    "dropped %s from the CAS: an action modified the worker's hardlink to it",
                    digest.blob_path,
                )

    async def upload(self, blobs: dict[Digest, Path | bytes]) -> None:
        missing = set(await self.store.find_missing(list(blobs)))
        for digest in missing:
            source = blobs[digest]
            if isinstance(source, bytes):
                await self.store.put_bytes(digest, source)
            elif await self.store.adopt_file(digest, os.fspath(source)):
                pass  # taken (hashed, then hardlinked where it could be) by the store itself
            else:
                writer = await self.store.open_write(digest)
                try:
                    f = await trio.to_thread.run_sync(lambda p=source: open(p, "rb"))
                    try:
                        while chunk := await trio.to_thread.run_sync(f.read, READ_CHUNK):
                            await writer.write(chunk)
                    finally:
                        f.close()
                    await writer.commit()
                except BaseException:
                    await writer.abort()
                    raise


class GrpcAccess(CasAccess):
    """A remote CAS over gRPC (upb messages; ByteStream for large blobs)."""

    prefers_batches = True

    def __init__(self, channel: Channel, instance: str = "", worker_id: str = "") -> None:
        self.channel = channel
        self.instance = instance
        # Marks our calls as a worker's, so a draining scheduler still serves them.
        self.metadata = {WORKER_HEADER: worker_id} if worker_id else None

    async def _unary(
        self, method: str, request: fastpb.Message, response_type: type
    ) -> fastpb.Message:
        path = f"/build.bazel.remote.execution.v2.ContentAddressableStorage/{method}"
        with remote_errors(method):
            return await unary(self.channel, path, request, response_type, metadata=self.metadata)

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        by_key = {(d.hash, d.size): d for d in digests}
        missing: list[Digest] = []
        # In requests of FIND_MISSING_CHUNK digests: one request for a 200,000-file input tree
        # would pass the server's message size limit (about 8 MiB, ~75 bytes per digest).
        for start in range(0, len(digests), FIND_MISSING_CHUNK):
            chunk = digests[start : start + FIND_MISSING_CHUNK]
            req = fastpb.FindMissingBlobsRequest(instance_name=self.instance)
            req.digest_function = int(chunk[0].function)
            for d in chunk:
                req.blob_digests.add(hash=d.hash, size_bytes=d.size)
            resp = await self._unary("FindMissingBlobs", req, fastpb.FindMissingBlobsResponse)
            missing += [by_key[(m.hash, m.size_bytes)] for m in resp.missing_blob_digests]
        return missing

    async def read_small(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        out: dict[Digest, bytes] = {}
        for batch in _batches(digests, lambda d: d.size):
            req = fastpb.BatchReadBlobsRequest(instance_name=self.instance)
            req.digest_function = int(batch[0].function)
            for d in batch:
                req.digests.add(hash=d.hash, size_bytes=d.size)
            resp = await self._unary("BatchReadBlobs", req, fastpb.BatchReadBlobsResponse)
            by_key = {(d.hash, d.size): d for d in batch}
            for r in resp.responses:
                d = by_key[(r.digest.hash, r.digest.size_bytes)]
                if r.status.code == Status.NOT_FOUND.value:
                    raise BlobNotFound(d)
                if r.status.code:
                    raise from_status(
                        r.status.code, f"BatchReadBlobs of {d.blob_path}: {r.status.message}"
                    )
                _verify(d, r.data)
                out[d] = r.data
        return out

    async def fetch_to(self, digest: Digest, path: Path) -> None:
        name = ResourceName(self.instance, digest).format()
        hasher = new_hasher(digest.function)
        f = await trio.to_thread.run_sync(lambda: open(path, "xb"))
        size = 0
        try:
            async with open_stream(
                self.channel,
                "/google.bytestream.ByteStream/Read",
                Cardinality.UNARY_STREAM,
                fastpb.ReadRequest,
                fastpb.ReadResponse,
                metadata=self.metadata,
            ) as stream:
                await aio(stream.send_message, fastpb.ReadRequest(resource_name=name), end=True)
                while (resp := await aio(stream.recv_message)) is not None:
                    data = resp.data
                    await trio.to_thread.run_sync(_hash_and_write, hasher, f, data)
                    size += len(data)
        except GRPCError as e:
            if e.status is Status.NOT_FOUND:
                raise BlobNotFound(digest) from None
            raise from_status(e.status.value, f"reading {digest.blob_path}: {e.message}") from None
        except UNREACHABLE as e:
            raise Unavailable(f"reading {digest.blob_path} from the CAS: {e}") from None
        finally:
            f.close()
        if size != digest.size or hasher.hexdigest() != digest.hash:
            raise Internal(f"downloaded {digest.blob_path} does not match its digest")

    async def upload(self, blobs: dict[Digest, Path | bytes]) -> None:
        missing = await self.find_missing(list(blobs))
        small = [d for d in missing if d.size <= SMALL_BLOB]
        for batch in _batches(small, lambda d: d.size):
            req = fastpb.BatchUpdateBlobsRequest(instance_name=self.instance)
            req.digest_function = int(batch[0].function)
            for d in batch:
                src = blobs[d]
                data = (
                    src
                    if isinstance(src, bytes)
                    else await trio.to_thread.run_sync(Path(src).read_bytes)
                )
                r = req.requests.add(data=data)
                r.digest.hash = d.hash
                r.digest.size_bytes = d.size
            resp = await self._unary("BatchUpdateBlobs", req, fastpb.BatchUpdateBlobsResponse)
            for r in resp.responses:
                if r.status.code:
                    raise from_status(
                        r.status.code,
                        f"upload of {r.digest.hash}/{r.digest.size_bytes}: {r.status.message}",
                    )
        for d in missing:
            if d.size > SMALL_BLOB:
                await self._write(d, blobs[d])

    async def _write(self, digest: Digest, source: Path | bytes) -> None:
        name = ResourceName(self.instance, digest, upload_id=str(uuid.uuid4())).format()
        f = None if isinstance(source, bytes) else await trio.to_thread.run_sync(open, source, "rb")
        try:
            with remote_errors(f"ByteStream.Write of {digest.blob_path}"):
                async with open_stream(
                    self.channel,
                    "/google.bytestream.ByteStream/Write",
                    Cardinality.STREAM_UNARY,
                    fastpb.WriteRequest,
                    fastpb.WriteResponse,
                    metadata=self.metadata,
                ) as stream:
                    offset = 0
                    while True:
                        if f is None:
                            assert isinstance(source, bytes)
                            chunk = source[offset : offset + READ_CHUNK]
                        else:
                            chunk = await trio.to_thread.run_sync(f.read, READ_CHUNK)
                        _check_chunk(source, digest, offset, chunk)
                        last = offset + len(chunk) >= digest.size
                        request = fastpb.WriteRequest(
                            resource_name=name if offset == 0 else "",
                            write_offset=offset,
                            data=chunk,
                            finish_write=last,
                        )
                        await aio(stream.send_message, request, end=last)
                        offset += len(chunk)
                        if last:
                            break
                    await aio(stream.recv_message)
        finally:
            if f is not None:
                f.close()


def _check_chunk(source: Path | bytes, digest: Digest, offset: int, chunk: bytes) -> None:
    """Fail at once if the file no longer has the size it was hashed with: an empty read before
    the end would otherwise loop until the upload timeout."""
    what = "the output" if isinstance(source, bytes) else f"output file {str(source)!r}"
    if not chunk and offset < digest.size:
        raise Internal(
            f"{what} shrank to {offset} bytes while it was uploaded as {digest.blob_path} "
            f"({digest.size} bytes when hashed)"
        )
    if offset + len(chunk) > digest.size:
        raise Internal(
            f"{what} grew past the {digest.size} bytes it had when hashed, while it was "
            f"uploaded as {digest.blob_path}"
        )


def _hash_and_write(hasher, f, data: bytes) -> None:  # type: ignore[no-untyped-def]
    hasher.update(data)
    f.write(data)


def _verify(digest: Digest, data: bytes) -> None:
    h = new_hasher(digest.function)
    h.update(data)
    if len(data) != digest.size or h.hexdigest() != digest.hash:
        raise InvalidArgument(f"{digest.blob_path}: the data read does not match the digest")


FIND_MISSING_CHUNK = 10_000


def _batches(items: Sequence[Digest], size_of) -> list[list[Digest]]:  # type: ignore[no-untyped-def]
    out: list[list[Digest]] = []
    current: list[Digest] = []
    total = 0
    for d in items:
        if current and total + size_of(d) > BATCH_BYTES:
            out.append(current)
            current, total = [], 0
        current.append(d)
        total += size_of(d)
    if current:
        out.append(current)
    return out
