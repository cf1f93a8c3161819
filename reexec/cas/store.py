"""The blob store interface every CAS backend and decorator implements.

Modelled on a three-verb blob store (find missing, read, write) with streaming variants:
`open_read` yields a reader for ranged, chunked reads of large blobs and `open_write` returns a
writer that can be fed chunk by chunk (ByteStream uploads, resumable). The empty blob is always
present in every store.

Besides the verbs, a store declares what it can do for a co-located worker (`reexecd serve`),
so no caller needs to know which class sits under which decorator:
- `local_files`: hand out files holding blobs, to hardlink instead of copying;
- `adopt_file`: take a local file as a blob after proving it matches its digest;
- `discard_if_same_file`: drop a blob whose very inode a worker found modified;
- `hold`: keep blobs an in-flight action uses from eviction.
The defaults say "cannot" (or do nothing); decorators forward or answer for their inner stores.

The `*_nowait` methods are synchronous fast paths for the gRPC edge: RPCs that a local store
answers without waiting (FindMissingBlobs, reads and writes of small blobs) are served on
grpclib's side of the process without a crossing into Trio, which costs more than the work.
Each either gives the same answer its async twin would, or says it cannot (None/False) and the
caller takes the async path. They run on the event loop's thread between two Trio checkpoints,
so they must not block (beyond small local file I/O), wait, or call Trio APIs that need the
current task.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from typing import Protocol

from reexec.cas.digest import Digest, is_empty
from reexec.errors import NotFound, OutOfRange, ResourceExhausted

READ_CHUNK = 1 << 20


class BlobNotFound(NotFound):
    def __init__(self, digest: Digest) -> None:
        super().__init__(f"blob {digest.blob_path} not found")
        self.digest = digest


class BlobReader(Protocol):
    """Sequential reader positioned at the requested offset."""

    size: int

    async def read(self, n: int = READ_CHUNK) -> bytes:
        """Up to `n` bytes; b"" at the end of the blob."""
        ...


class BlobWriter(Protocol):
    """Accepts a blob's bytes in order; nothing is visible until `commit` succeeds."""

    digest: Digest
    committed_size: int

    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> None:
        """Make the blob visible. Raises InvalidArgument if the data does not match the digest."""
        ...

    async def abort(self) -> None: ...


class BytesReader:
    """A BlobReader over bytes already in memory."""

    def __init__(self, data: bytes | memoryview, offset: int = 0) -> None:
        self._data = memoryview(data)
        self.size = len(self._data)
        self._pos = offset

    async def read(self, n: int = READ_CHUNK) -> bytes:
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk


class Store(abc.ABC):
    """Abstract blob store. Subclasses implement the four primitives."""

    @abc.abstractmethod
    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The subset of `digests` not present, in input order, without duplicates."""

    @abc.abstractmethod
    def open_read(self, digest: Digest, offset: int = 0) -> AbstractAsyncContextManager[BlobReader]:
        """Async context manager yielding a BlobReader; raises BlobNotFound or OutOfRange."""

    @abc.abstractmethod
    async def open_write(self, digest: Digest) -> BlobWriter:
        """A writer for `digest`. The caller must `commit` or `abort` it."""

    async def has(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])

    async def get_bytes(self, digest: Digest) -> bytes:
        """The whole blob; meant for small blobs (Actions, Commands, Directories, batches)."""
        if is_empty(digest):
            return b""
        async with self.open_read(digest) as reader:
            parts: list[bytes] = []
            while chunk := await reader.read(READ_CHUNK):
                parts.append(chunk)
        return b"".join(parts)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        if is_empty(digest) and not data:
            return
        writer = await self.open_write(digest)
        try:
            await writer.write(data)
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    def find_missing_nowait(self, digests: Sequence[Digest]) -> list[Digest] | None:
        """`find_missing`'s answer if it can be given without waiting, else None."""
        return None

    def get_bytes_nowait(self, digest: Digest) -> bytes | None:
        """`get_bytes`'s answer (raising as it does) if it can be given without waiting, else
        None."""
        return None

    def put_bytes_nowait(self, digest: Digest, data: bytes) -> bool:
        """Do what `put_bytes` does (raising as it does) if it can be done without waiting and
        return True; else do nothing and return False."""
        return False

    def max_blob_bytes(self) -> int | None:
        """The largest blob this store will ever accept; None if it sets no limit of its own.

        Services refuse larger uploads up front (RESOURCE_EXHAUSTED) instead of buffering
        bytes that can never be committed; decorators forward their inner store's answer.
        """
        return None

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        """Files on this host holding exactly the bytes this store serves for some of `digests`.

        A co-located worker hardlinks them instead of copying. Default: none (the store keeps
        no files; read through `open_read`). The store may evict an entry right after this
        returns: a hardlink then fails with FileNotFoundError and the caller reads instead.
        """
        return {}

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        """Store the local file `path` as the blob `digest`, once it is proven to match.

        The file is hashed (a mismatch is InvalidArgument, nothing is stored) and taken without
        copying where possible; the caller must not modify it afterwards. Returns False if this
        store cannot take files: the caller then writes the bytes through `open_write`.
        """
        return False

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        """Drop `digest` if the store keeps it in that very inode (a worker that hardlinked it
        found it modified, so the stored copy is corrupt too). Returns whether it was dropped."""
        return False

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        """Keep `digests` from eviction while the context is open, including blobs written
        during it: an in-flight action's outputs must not evict each other (or its inputs)."""
        return nullcontext()

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources at shutdown."""

    def stats(self) -> dict[str, int]:
        return {}


def check_offset(digest: Digest, offset: int) -> None:
    if offset < 0:
        raise OutOfRange(f"read offset {offset} is negative")
    if offset > digest.size:
        raise OutOfRange(f"read offset {offset} is past the end of {digest.blob_path}")


def check_blob_size(digest: Digest, limit: int | None) -> None:
    """RESOURCE_EXHAUSTED if the blob is larger than a store's `max_blob_bytes()`."""
    if limit is not None and digest.size > limit:
        raise ResourceExhausted(
            f"blob {digest.blob_path} is {digest.size} bytes, larger than the {limit} bytes "
            "this CAS accepts for one blob"
        )


def blob_limit(max_bytes: int, fraction: float) -> int | None:
    """The largest blob a store of `max_bytes` takes: `fraction` of it (None: unbounded)."""
    return int(max_bytes * fraction) if max_bytes > 0 else None


def dedupe(digests: Sequence[Digest]) -> list[Digest]:
    return list(dict.fromkeys(digests))
