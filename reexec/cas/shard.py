"""ShardStore: each blob lives in one of several stores, chosen by weighted rendezvous hashing.

Adding or removing a shard moves only that shard's share of blobs (`rendezvous.py`). A shard
that fails (down, unreachable: any OSError or UNAVAILABLE) makes its blobs *missing*, never an
internal error: FindMissingBlobs lists them, so clients upload them again (to the same shard,
once it is back) and Execute answers FAILED_PRECONDITION with MISSING details. Writes to a
failed shard fail with UNAVAILABLE, which clients retry.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager, contextmanager

import trio

from reexec.cas.digest import Digest
from reexec.cas.rendezvous import Shard, pick
from reexec.cas.store import BlobNotFound, BlobReader, BlobWriter, Store, dedupe
from reexec.errors import Unavailable

log = logging.getLogger(__name__)


class ShardStore(Store):
    def __init__(self, shards: Sequence[tuple[str, float, Store]]) -> None:
        if not shards:
            raise ValueError("a shard store needs at least one shard")
        self._shards = [Shard(name, weight) for name, weight, _ in shards]
        self.stores = [store for _, _, store in shards]
        self.failures = 0

    def shard_of(self, digest: Digest) -> int:
        # The key names the blob completely (function, hash, size), as the CAS does.
        return pick(self._shards, f"{int(digest.function)}/{digest.hash}/{digest.size}".encode())

    def _group(self, digests: Sequence[Digest]) -> dict[int, list[Digest]]:
        groups: dict[int, list[Digest]] = {}
        for d in digests:
            groups.setdefault(self.shard_of(d), []).append(d)
        return groups

    def _failed(self, index: int, e: BaseException) -> None:
        self.failures += 1
        log.warning("shard %s failed: %s", self._shards[index].name, e)

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        digests = dedupe(digests)
        missing: set[Digest] = set()

        async def ask(index: int, group: list[Digest]) -> None:
            try:
                missing.update(await self.stores[index].find_missing(group))
            except (OSError, Unavailable) as e:
                self._failed(index, e)
                missing.update(group)

        async with trio.open_nursery() as nursery:
            for index, group in self._group(digests).items():
                nursery.start_soon(ask, index, group)
        return [d for d in digests if d in missing]

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        index = self.shard_of(digest)
        try:
            cm = self.stores[index].open_read(digest, offset)
            reader = await cm.__aenter__()
        except (OSError, Unavailable) as e:
            self._failed(index, e)
            raise BlobNotFound(digest) from None
        try:
            yield reader
        except BaseException as e:
            if not await cm.__aexit__(type(e), e, e.__traceback__):
                raise
        else:
            await cm.__aexit__(None, None, None)

    async def get_bytes(self, digest: Digest) -> bytes:
        index = self.shard_of(digest)
        try:
            return await self.stores[index].get_bytes(digest)
        except (OSError, Unavailable) as e:
            self._failed(index, e)
            raise BlobNotFound(digest) from None

    async def open_write(self, digest: Digest) -> BlobWriter:
        index = self.shard_of(digest)
        try:
            return await self.stores[index].open_write(digest)
        except OSError as e:
            self._failed(index, e)
            raise Unavailable(f"shard {self._shards[index].name} is unavailable: {e}") from None

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        index = self.shard_of(digest)
        try:
            await self.stores[index].put_bytes(digest, data)
        except OSError as e:
            self._failed(index, e)
            raise Unavailable(f"shard {self._shards[index].name} is unavailable: {e}") from None

    def max_blob_bytes(self) -> int | None:
        # Any blob may land on any shard, so the smallest limit is the store's limit.
        limits = [x for s in self.stores if (x := s.max_blob_bytes()) is not None]
        return min(limits) if limits else None

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        found: dict[Digest, str] = {}
        for index, group in self._group(digests).items():
            try:
                found.update(await self.stores[index].local_files(group))
            except (OSError, Unavailable) as e:
                self._failed(index, e)
        return found

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        return await self.stores[self.shard_of(digest)].adopt_file(digest, path)

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        return await self.stores[self.shard_of(digest)].discard_if_same_file(digest, st_dev, st_ino)

    @contextmanager
    def _hold_all(self, digests: Sequence[Digest]) -> Iterator[None]:
        with ExitStack() as stack:
            for index, group in self._group(digests).items():
                stack.enter_context(self.stores[index].hold(group))
            yield

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self._hold_all(digests)

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {"shard_failures": self.failures}
        for shard, store in zip(self._shards, self.stores, strict=True):
            for key, value in store.stats().items():
                out[f"{shard.name}.{key}"] = value
        return out
