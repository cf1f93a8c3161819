"""MemoryStore: blobs in a dict, least recently used evicted beyond `max_bytes`.

Open writers buffer in memory, so they reserve their declared size against `max_bytes` until
they commit or abort. The store keeps no files: it cannot hand out or adopt local files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager

from reexec.cas.digest import Digest, is_empty
from reexec.cas.lru import LruIndex
from reexec.cas.store import (
    BlobNotFound,
    BlobReader,
    BytesReader,
    Store,
    check_blob_size,
    check_offset,
    dedupe,
)
from reexec.errors import InvalidArgument, ResourceExhausted


class MemoryStore(Store):
    def __init__(self, max_bytes: int, *, max_blob_bytes: int | None = None) -> None:
        self._blobs: dict[Digest, bytes] = {}
        self._lru: LruIndex[Digest] = LruIndex(max_bytes)
        limits = [n for n in (max_blob_bytes, max_bytes) if n is not None and n > 0]
        self._max_blob = min(limits) if limits else None

    def max_blob_bytes(self) -> int | None:
        return self._max_blob

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return self.find_missing_nowait(digests)  # never None here

    def find_missing_nowait(self, digests: Sequence[Digest]) -> list[Digest] | None:
        blobs = self._blobs
        touch = self._lru.touch
        return [d for d in dedupe(digests) if not is_empty(d) and not (d in blobs and touch(d))]

    def get_bytes_nowait(self, digest: Digest) -> bytes | None:
        if is_empty(digest):
            return b""
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(digest)
        self._lru.touch(digest)
        return data

    def put_bytes_nowait(self, digest: Digest, data: bytes) -> bool:
        check_blob_size(digest, self._max_blob)
        if len(data) != digest.size:
            raise InvalidArgument(
                f"blob {digest.blob_path}: got {len(data)} bytes, the digest says {digest.size}"
            )
        self._insert(digest, bytes(data))
        return True

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
        return self.get_bytes_nowait(digest)  # never None here

    async def open_write(self, digest: Digest) -> _MemoryWriter:
        check_blob_size(digest, self._max_blob)
        if not self._lru.try_reserve(digest.size):
            raise ResourceExhausted(
                f"blob {digest.blob_path}: uploads in progress already reserve "
                f"{self._lru.reserved_bytes} of this CAS's {self._lru.max_bytes} bytes; retry later"
            )
        self._evict()
        return _MemoryWriter(self, digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        self.put_bytes_nowait(digest, data)

    def _insert(self, digest: Digest, data: bytes) -> None:
        if is_empty(digest):
            return
        if self._lru.add(digest, len(data)):
            self._blobs[digest] = data
            self._evict()

    def _evict(self) -> None:
        for victim in self._lru.take_evictions():
            del self._blobs[victim]

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self._lru.pinned(d for d in digests if not is_empty(d))

    def stats(self) -> dict[str, int]:
        return {
            "blobs": len(self._blobs),
            "bytes": self._lru.total_bytes,
            "max_bytes": self._lru.max_bytes,
            "reserved_bytes": self._lru.reserved_bytes,
            "evictions": self._lru.evictions,
        }


class _MemoryWriter:
    def __init__(self, store: MemoryStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self.committed_size = 0
        self._buf = bytearray()
        self._reserved = digest.size  # released exactly once, on commit or abort

    def _release(self) -> None:
        self._store._lru.release(self._reserved)
        self._reserved = 0

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
        self._release()
        self._store._insert(self.digest, bytes(self._buf))
        self._buf = bytearray()

    async def abort(self) -> None:
        self._release()
        self._buf = bytearray()
