"""VerifyingStore: every write is hashed and sized against its digest before it is stored.

A mismatch is INVALID_ARGUMENT and the inner write is aborted, so nothing is stored. Files a
worker hands over (`adopt_file`) are hashed by the inner store that takes them, on the very
inode it keeps, so that capability and the others are forwarded unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager

import trio

from reexec.cas.digest import Digest, Hasher, new_hasher
from reexec.cas.store import BlobReader, BlobWriter, Store
from reexec.errors import InvalidArgument

# Below this, hashing inline is cheaper than a hop to a worker thread.
INLINE_HASH_LIMIT = 64 * 1024


async def hash_chunk(hasher: Hasher, data: bytes | bytearray | memoryview) -> None:
    """Feed `data` to `hasher`, off the event loop when it is large (hashlib drops the GIL)."""
    if len(data) <= INLINE_HASH_LIMIT:
        hasher.update(data)
    else:
        await trio.to_thread.run_sync(hasher.update, data)


def _mismatch(digest: Digest, actual_hash: str) -> InvalidArgument:
    return InvalidArgument(
        f"hash mismatch for {digest.blob_path}: the data's {digest.function.name} is {actual_hash}"
    )


def _check_length(digest: Digest, data: bytes) -> None:
    if len(data) != digest.size:
        raise InvalidArgument(f"size mismatch for {digest.blob_path}: got {len(data)} bytes")


def _check_hash(digest: Digest, hasher: Hasher) -> None:
    actual = hasher.hexdigest()
    if actual != digest.hash:
        raise _mismatch(digest, actual)


class VerifyingStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return await self.inner.find_missing(digests)

    def open_read(self, digest: Digest, offset: int = 0) -> AbstractAsyncContextManager[BlobReader]:
        return self.inner.open_read(digest, offset)

    async def get_bytes(self, digest: Digest) -> bytes:
        return await self.inner.get_bytes(digest)

    async def open_write(self, digest: Digest) -> BlobWriter:
        return _VerifyingWriter(digest, await self.inner.open_write(digest))

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        _check_length(digest, data)
        hasher = new_hasher(digest.function)
        await hash_chunk(hasher, data)
        _check_hash(digest, hasher)
        await self.inner.put_bytes(digest, data)

    def find_missing_nowait(self, digests: Sequence[Digest]) -> list[Digest] | None:
        return self.inner.find_missing_nowait(digests)

    def get_bytes_nowait(self, digest: Digest) -> bytes | None:
        return self.inner.get_bytes_nowait(digest)

    def put_bytes_nowait(self, digest: Digest, data: bytes) -> bool:
        # Only what hashes inline; larger blobs take the async path (hashed in a thread).
        if len(data) > INLINE_HASH_LIMIT:
            return False
        _check_length(digest, data)
        hasher = new_hasher(digest.function)
        hasher.update(data)
        _check_hash(digest, hasher)
        return self.inner.put_bytes_nowait(digest, data)

    def max_blob_bytes(self) -> int | None:
        return self.inner.max_blob_bytes()

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        return await self.inner.local_files(digests)

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        return await self.inner.adopt_file(digest, path)

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        return await self.inner.discard_if_same_file(digest, st_dev, st_ino)

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self.inner.hold(digests)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def stats(self) -> dict[str, int]:
        return self.inner.stats()


class _VerifyingWriter:
    def __init__(self, digest: Digest, inner: BlobWriter) -> None:
        self.digest = digest
        self._inner = inner
        self._hasher = new_hasher(digest.function)

    @property
    def committed_size(self) -> int:
        return self._inner.committed_size

    async def write(self, data: bytes) -> None:
        if self._inner.committed_size + len(data) > self.digest.size:
            raise InvalidArgument(
                f"size mismatch for {self.digest.blob_path}: more than {self.digest.size} bytes sent"
            )
        await hash_chunk(self._hasher, data)
        await self._inner.write(data)

    async def commit(self) -> None:
        if self._inner.committed_size != self.digest.size:
            raise InvalidArgument(
                f"size mismatch for {self.digest.blob_path}: got {self._inner.committed_size} bytes"
            )
        actual = self._hasher.hexdigest()
        if actual != self.digest.hash:
            await self._inner.abort()
            raise _mismatch(self.digest, actual)
        await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()
