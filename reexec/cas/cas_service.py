"""ContentAddressableStorage service: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree.

All four use the upb classes from `reexec.fastpb`: these messages carry thousands of digests
or directories, where generic pure-Python decoding would dominate the server's time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import aclosing

import trio
import zstandard
from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.digest import Digest, make_digest, make_digests
from reexec.cas.limits import check_blob_size
from reexec.cas.pool import for_each
from reexec.cas.resource import SUPPORTED_COMPRESSORS, Compressor
from reexec.cas.store import BlobNotFound, Store
from reexec.cas.tree_size import MAX_TREE_ENTRIES
from reexec.errors import InvalidArgument, NotFound, ReexecError
from reexec.rpc import (
    SLOW,
    Cardinality,
    Service,
    Stream,
    aio,
    check_instance,
    os_error_status,
    parse_page_token,
    streaming,
    unary,
)

log = logging.getLogger(__name__)

# Parallel store writes/reads within one batch request.
BATCH_CONCURRENCY = 16
# FindMissingBlobs digests validated and looked up between two checkpoints (~10 ms of CPU).
FIND_MISSING_CHUNK = 4096
# GetTree pages are cut at this many bytes of Directory messages when the client sets no size.
DEFAULT_TREE_PAGE_BYTES = 1 << 20
# GetTree parses a level of the tree with more than this many bytes of Directory messages in a
# worker thread (the work grows with the entries, which the bytes bound).
THREAD_BYTES = 64 << 10
# Loops over a tree level on the event loop give other tasks a turn this often.
CHECKPOINT_EVERY = 4096


def _wire_digests(wire: Sequence[fastpb.Message], function: int) -> list[Digest]:
    """Validated Digest records of a repeated wire Digest field."""
    return make_digests([d.hash for d in wire], [d.size_bytes for d in wire], function)


class CasService(Service):
    SERVICE = "build.bazel.remote.execution.v2.ContentAddressableStorage"

    def __init__(
        self, cas: Store, *, instances: Sequence[str] = (), max_batch_total_size_bytes: int
    ) -> None:
        self.cas = cas
        self.instances = tuple(instances)
        self.max_batch = max_batch_total_size_bytes

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "FindMissingBlobs": unary(
                self.find_missing_blobs,
                fastpb.FindMissingBlobsRequest,
                fastpb.FindMissingBlobsResponse,
                nowait=self.find_missing_blobs_nowait,
            ),
            "BatchUpdateBlobs": unary(
                self.batch_update_blobs,
                fastpb.BatchUpdateBlobsRequest,
                fastpb.BatchUpdateBlobsResponse,
            ),
            "BatchReadBlobs": unary(
                self.batch_read_blobs, fastpb.BatchReadBlobsRequest, fastpb.BatchReadBlobsResponse
            ),
            "GetTree": streaming(
                self.get_tree,
                Cardinality.UNARY_STREAM,
                fastpb.GetTreeRequest,
                fastpb.GetTreeResponse,
            ),
        }

    def find_missing_blobs_nowait(self, request: fastpb.Message):  # type: ignore[no-untyped-def]
        """`find_missing_blobs` when the store answers without waiting and the request is
        small enough to need no checkpoint; else SLOW."""
        check_instance(self.instances, request.instance_name)
        wire = request.blob_digests
        if len(wire) > FIND_MISSING_CHUNK:
            return SLOW
        missing = self.cas.find_missing_nowait(_wire_digests(wire, request.digest_function))
        if missing is None:
            return SLOW
        response = fastpb.FindMissingBlobsResponse()
        add = response.missing_blob_digests.add
        for d in missing:
            add(hash=d.hash, size_bytes=d.size)
        return response

    async def find_missing_blobs(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        """Validated and looked up FIND_MISSING_CHUNK digests at a time, with a checkpoint in
        between: the largest request we accept (~110,000 digests in 8 MiB) takes ~0.3 s of
        CPU, which must not stall every other RPC on the event loop."""
        check_instance(self.instances, request.instance_name)
        wire = request.blob_digests
        function = request.digest_function
        response = fastpb.FindMissingBlobsResponse()
        add = response.missing_blob_digests.add
        chunked = len(wire) > FIND_MISSING_CHUNK
        reported: set[Digest] = set()
        # Read out of the wire messages once (slicing a upb repeated field costs as much).
        hashes, sizes = [d.hash for d in wire], [d.size_bytes for d in wire]
        for start in range(0, len(wire), FIND_MISSING_CHUNK):
            if start:
                await trio.lowlevel.checkpoint()
            end = start + FIND_MISSING_CHUNK
            digests = make_digests(hashes[start:end], sizes[start:end], function)
            for d in await self.cas.find_missing(digests):
                if chunked:
                    # Each chunk's answer is free of duplicates; across chunks it may not be.
                    if d in reported:
                        continue
                    reported.add(d)
                add(hash=d.hash, size_bytes=d.size)
        return response

    async def batch_update_blobs(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        check_instance(self.instances, request.instance_name)
        total = sum(len(r.data) for r in request.requests)
        if total > self.max_batch:
            raise InvalidArgument(
                f"BatchUpdateBlobs carries {total} bytes, over max_batch_total_size_bytes "
                f"{self.max_batch}; upload large blobs with ByteStream.Write"
            )
        function = request.digest_function
        entries = list(request.requests)
        statuses: list[tuple[int, str]] = [(0, "")] * len(entries)

        async def one(i: int, entry: fastpb.Message) -> None:
            try:
                digest = make_digest(entry.digest.hash, entry.digest.size_bytes, function)
                check_blob_size(self.cas, digest.size, f"blob {digest.blob_path}")
                data = _decompress_batch_entry(entry.compressor, entry.data, digest)
                await self.cas.put_bytes(digest, data)
            except ReexecError as e:
                statuses[i] = (e.status.value, e.message)
            except OSError as e:  # per blob, as REAPI batch statuses are
                status, message = os_error_status(e, f"BatchUpdateBlobs of {entry.digest.hash}")
                statuses[i] = (status.value, message)

        await for_each(entries, one, BATCH_CONCURRENCY)
        response = fastpb.BatchUpdateBlobsResponse()
        for entry, (code, message) in zip(entries, statuses, strict=True):
            r = response.responses.add()
            r.digest.CopyFrom(entry.digest)
            r.status.code = code
            r.status.message = message
        return response

    async def batch_read_blobs(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        check_instance(self.instances, request.instance_name)
        function = request.digest_function
        wire = list(request.digests)
        total = sum(max(d.size_bytes, 0) for d in wire)
        if total > self.max_batch:
            raise InvalidArgument(
                f"BatchReadBlobs asks for {total} bytes, over max_batch_total_size_bytes "
                f"{self.max_batch}; read large blobs with ByteStream.Read"
            )
        results: list[tuple[int, str, bytes]] = [(0, "", b"")] * len(wire)

        async def one(i: int, d: fastpb.Message) -> None:
            try:
                digest = make_digest(d.hash, d.size_bytes, function)
                results[i] = (0, "", await self.cas.get_bytes(digest))
            except ReexecError as e:
                results[i] = (e.status.value, e.message, b"")
            except OSError as e:
                status, message = os_error_status(e, f"BatchReadBlobs of {d.hash}")
                results[i] = (status.value, message, b"")

        await for_each(wire, one, BATCH_CONCURRENCY)
        response = fastpb.BatchReadBlobsResponse()
        for d, (code, message, data) in zip(wire, results, strict=True):
            r = response.responses.add()
            r.digest.CopyFrom(d)
            r.data = data
            r.status.code = code
            r.status.message = message
        return response

    async def get_tree(self, stream: Stream) -> None:
        request = await aio(stream.recv_message)
        # aclosing: a client that leaves mid-tree closes the generators here and now, not
        # whenever the garbage collector gets to them (outside any cancel scope).
        async with aclosing(self.tree_pages(request)) as pages:
            async for response in pages:
                await aio(stream.send_message, response)

    async def tree_pages(self, request: fastpb.Message):  # type: ignore[no-untyped-def]
        """GetTreeResponse pages of the tree's Directory messages in breadth-first order.

        The page token is the breadth-first index of the page's first directory, so a client can
        resume with any token we handed out. Subtrees missing from the CAS are skipped; only a
        missing root is NOT_FOUND.
        """
        check_instance(self.instances, request.instance_name)
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        root = make_digest(
            request.root_digest.hash, request.root_digest.size_bytes, request.digest_function
        )
        offset = parse_page_token(request.page_token)
        try:
            await self.cas.get_bytes(root)
        except BlobNotFound:
            raise NotFound(f"root directory {root.blob_path} is not in the CAS") from None
        page = fastpb.GetTreeResponse()
        page_bytes = 0
        index = 0
        async with aclosing(self._walk(root)) as walk:
            async for raw in walk:
                if index < offset:
                    index += 1
                    continue
                # REAPI lets the server cut pages shorter than page_size: a page never passes
                # DEFAULT_TREE_PAGE_BYTES, whatever page_size asks (2^31 would be one huge message).
                full = (request.page_size and len(page.directories) >= request.page_size) or (
                    page_bytes + len(raw) > DEFAULT_TREE_PAGE_BYTES and page_bytes
                )
                if full:
                    page.next_page_token = str(index)
                    yield page
                    page = fastpb.GetTreeResponse()
                    page_bytes = 0
                page.directories.add().MergeFromString(raw)
                page_bytes += len(raw)
                index += 1
        yield page

    async def _walk(self, root: Digest):  # type: ignore[no-untyped-def]
        """The raw bytes of each distinct directory of the tree once, breadth-first.

        A subtree named by many parents is sent once, so a DAG that expands exponentially costs
        only its distinct directories; those are bounded by MAX_TREE_ENTRIES (a tree with more
        could never be an input root). Levels larger than THREAD_BYTES are parsed in a
        worker thread, so the event loop does no work that grows with the tree.
        """
        seen = {root}
        level = [root]
        function = int(root.function)
        while level:
            raws = await self._read_level(level)
            if sum(map(len, raws.values())) > THREAD_BYTES:
                children = await trio.to_thread.run_sync(_level_children, raws, function)
            else:
                children = _level_children(raws, function)
            for raw in raws.values():
                yield raw
            next_level: list[Digest] = []
            for n, d in enumerate(children):
                if n % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                    await trio.lowlevel.checkpoint()
                if d not in seen:
                    if len(seen) > MAX_TREE_ENTRIES:
                        raise InvalidArgument(
                            f"the tree under {root.blob_path} has more than "
                            f"{MAX_TREE_ENTRIES:,} directories"
                        )
                    seen.add(d)
                    next_level.append(d)
            level = next_level

    async def _read_level(self, level: list[Digest]) -> dict[Digest, bytes]:
        """The directories of `level` that are in the CAS, in `level`'s order."""
        found: list[bytes | None] = [None] * len(level)

        async def one(i: int, digest: Digest) -> None:
            try:
                found[i] = await self.cas.get_bytes(digest)
            except BlobNotFound:
                pass

        await for_each(level, one, BATCH_CONCURRENCY)
        return {d: raw for d, raw in zip(level, found, strict=True) if raw is not None}


def _level_children(raws: dict[Digest, bytes], function: int) -> list[Digest]:
    """Subdirectory digests of one level's directories, in order (may run in a thread)."""
    out: list[Digest] = []
    for digest, raw in raws.items():
        try:
            directory = fastpb.Directory.FromString(raw)
        except DecodeError:
            raise InvalidArgument(f"{digest.blob_path} is not a valid Directory") from None
        for child in directory.directories:
            out.append(make_digest(child.digest.hash, child.digest.size_bytes, function))
    return out


def _decompress_batch_entry(compressor: int, data: bytes, digest: Digest) -> bytes:
    try:
        kind = Compressor(compressor)
    except ValueError:
        raise InvalidArgument(f"unknown compressor value {compressor}") from None
    if kind not in SUPPORTED_COMPRESSORS:
        raise InvalidArgument(
            f"compressor {kind.name} is not supported (supported: IDENTITY, ZSTD)"
        )
    if kind is Compressor.ZSTD:
        try:
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=digest.size)
        except zstandard.ZstdError as e:
            raise InvalidArgument(f"blob {digest.blob_path}: invalid zstd data: {e}") from None
    return data
