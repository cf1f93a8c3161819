"""MemoryStore: blobs in a dict, least recently used evicted beyond `max_bytes`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from reexec.cas.digest import Digest, is_empty
from reexec.cas.lru import LruIndex
from reexec.cas.store import (
    BlobNotFound,
    BlobReader,
    BytesReader,
    Store,
    check_offset,
    dedupe,
)
from reexec.errors import InvalidArgument


class MemoryStore(Store):
    def __init__(self, max_bytes: int) -> None:
        self._blobs: dict[Digest, bytes] = {}
        self._lru: LruIndex[Digest] = LruIndex(max_bytes)

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        blobs = self._blobs
        touch = self._lru.touch
        return [d for d in dedupe(digests) if not is_empty(d) and not (d in blobs and touch(d))]

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        check_offset(digest, offset)
        if is_empty(digest):
            yield BytesReader(b"")
            return
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(digest)
        self._lru.touch(digest)
        # Pinned like the filesystem store's reads: a blob being read stays listed.
        self._lru.pin(digest)
        try:
            yield BytesReader(data, offset)
        finally:
            self._lru.unpin(digest)

    async def get_bytes(self, digest: Digest) -> bytes:
        if is_empty(digest):
            return b""
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(digest)
        self._lru.touch(digest)
        return data

    async def open_write(self, digest: Digest) -> _MemoryWriter:
        return _MemoryWriter(self, digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        if len(data) != digest.size:
            raise InvalidArgument(
                f"blob {digest.blob_path}: got {len(data)} bytes, the digest says {digest.size}"
            )
        self._insert(digest, bytes(data))

    def _insert(self, digest: Digest, data: bytes) -> None:
        if is_empty(digest):
            return
        if self._lru.add(digest, len(data)):
            self._blobs[digest] = data
            for victim in self._lru.take_evictions():
                del self._blobs[victim]

    def stats(self) -> dict[str, int]:
        return {
            "blobs": len(self._blobs),
            "bytes": self._lru.total_bytes,
            "max_bytes": self._lru.max_bytes,
            "evictions": self._lru.evictions,
        }


class _MemoryWriter:
    def __init__(self, store: MemoryStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self.committed_size = 0
        self._buf = bytearray()

    async def write(self, data: bytes) -> None:
        if self.committed_size + len(data) > self.digest.size:
            raise InvalidArgument(
                f"blob {self.digest.blob_path}: more data than the {self.digest.size} bytes declared"
            )
        self._buf += data
        self.committed_size += len(data)

    async def commit(self) -> None:
        if self.committed_size != self.digest.size:
            raise InvalidArgument(
                f"blob {self.digest.blob_path}: got {self.committed_size} bytes, "
                f"the digest says {self.digest.size}"
            )
        self._store._insert(self.digest, bytes(self._buf))
        self._buf = bytearray()

    async def abort(self) -> None:
        self._buf = bytearray()
