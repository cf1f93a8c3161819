"""SizePartitionStore: blobs up to a threshold in one store, larger ones in another.

Small blobs (Actions, Commands, Directories, most sources) are many and read often; large ones
are few and read in chunks. E.g. memory for small and a filesystem for large. The digest says
the size, so every operation goes to exactly one store, without asking the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager

from reexec.cas.digest import Digest
from reexec.cas.store import BlobReader, BlobWriter, Store, dedupe


class SizePartitionStore(Store):
    def __init__(self, threshold_bytes: int, small: Store, large: Store) -> None:
        self.threshold = threshold_bytes
        self.small = small
        self.large = large

    def _for(self, digest: Digest) -> Store:
        return self.small if digest.size <= self.threshold else self.large

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        digests = dedupe(digests)
        small = [d for d in digests if d.size <= self.threshold]
        large = [d for d in digests if d.size > self.threshold]
        missing = set(await self.small.find_missing(small) if small else [])
        missing.update(await self.large.find_missing(large) if large else [])
        return [d for d in digests if d in missing]

    def find_missing_nowait(self, digests: Sequence[Digest]) -> list[Digest] | None:
        digests = dedupe(digests)
        small = [d for d in digests if d.size <= self.threshold]
        large = [d for d in digests if d.size > self.threshold]
        missing: set[Digest] = set()
        for store, part in ((self.small, small), (self.large, large)):
            if part:
                answer = store.find_missing_nowait(part)
                if answer is None:
                    return (
                        None  # the other store's touches are harmless: the async path repeats them
                    )
                missing.update(answer)
        return [d for d in digests if d in missing]

    def get_bytes_nowait(self, digest: Digest) -> bytes | None:
        return self._for(digest).get_bytes_nowait(digest)

    def put_bytes_nowait(self, digest: Digest, data: bytes) -> bool:
        return self._for(digest).put_bytes_nowait(digest, data)

    def open_read(self, digest: Digest, offset: int = 0) -> AbstractAsyncContextManager[BlobReader]:
        return self._for(digest).open_read(digest, offset)

    async def get_bytes(self, digest: Digest) -> bytes:
        return await self._for(digest).get_bytes(digest)

    async def open_write(self, digest: Digest) -> BlobWriter:
        return await self._for(digest).open_write(digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        await self._for(digest).put_bytes(digest, data)

    def max_blob_bytes(self) -> int | None:
        # Blobs above the threshold all go to the large store: its limit is the store's.
        return self.large.max_blob_bytes()

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        small = [d for d in digests if d.size <= self.threshold]
        large = [d for d in digests if d.size > self.threshold]
        return {**await self.small.local_files(small), **await self.large.local_files(large)}

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        return await self._for(digest).adopt_file(digest, path)

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        return await self._for(digest).discard_if_same_file(digest, st_dev, st_ino)

    @contextmanager
    def _hold_both(self, digests: Sequence[Digest]) -> Iterator[None]:
        small = [d for d in digests if d.size <= self.threshold]
        large = [d for d in digests if d.size > self.threshold]
        with self.small.hold(small), self.large.hold(large):
            yield

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self._hold_both(digests)

    async def aclose(self) -> None:
        await self.small.aclose()
        await self.large.aclose()

    def stats(self) -> dict[str, int]:
        return {f"small_{k}": v for k, v in self.small.stats().items()} | {
            f"large_{k}": v for k, v in self.large.stats().items()
        }
