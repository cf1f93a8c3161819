"""ShardStore: each blob lives in one of several stores, chosen by weighted rendezvous hashing.

Adding or removing a shard moves only that shard's share of blobs (`rendezvous.py`).

A shard that fails (any OSError, or UNAVAILABLE: down, unreachable) is marked down for
`retry_after_s` and the call goes to the next shard in the blob's rendezvous order, so the store
keeps working with a shard gone: blobs that lived on it are *missing* (FindMissingBlobs lists
them, Execute answers FAILED_PRECONDITION with MISSING details), clients upload them again and
those uploads land on the next shard. Never an internal error. When the shard is back, blobs are
looked up on their owner again; what was written elsewhere meanwhile is missing once more and
is uploaded again (a cache may always lose blobs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager, contextmanager
from typing import TypeVar

import trio

from reexec.cas.digest import Digest
from reexec.cas.rendezvous import Shard, rank
from reexec.cas.store import BlobNotFound, BlobReader, BlobWriter, Store, dedupe
from reexec.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# What makes a shard count as down (a refused connection, a lost stream, UNAVAILABLE).
_SHARD_DOWN = (OSError, Unavailable)


class ShardStore(Store):
    def __init__(
        self, shards: Sequence[tuple[str, float, Store]], *, retry_after_s: float = 5.0
    ) -> None:
        if not shards:
            raise ValueError("a shard store needs at least one shard")
        self._shards = [Shard(name, weight) for name, weight, _ in shards]
        self.stores = [store for _, _, store in shards]
        self.retry_after_s = retry_after_s
        self._down_until = [0.0] * len(self.stores)
        self.failures = 0

    # -- which shard -------------------------------------------------------------------------

    def _order(self, digest: Digest) -> list[int]:
        # The key names the blob completely (function, hash, size), as the CAS does.
        return rank(self._shards, f"{int(digest.function)}/{digest.hash}/{digest.size}".encode())

    def shard_of(self, digest: Digest) -> int:
        """The shard that owns `digest` while every shard is up."""
        return self._order(digest)[0]

    def _live_order(self, digest: Digest) -> list[int]:
        now = trio.current_time()
        return [i for i in self._order(digest) if self._down_until[i] <= now]

    def _failed(self, index: int, e: BaseException) -> None:
        self.failures += 1
        self._down_until[index] = trio.current_time() + self.retry_after_s
        log.warning(
            "shard %s failed (%s); using the next shard for %gs",
            self._shards[index].name,
            e,
            self.retry_after_s,
        )

    async def _on_owner(self, digest: Digest, call: Callable[[Store], Awaitable[T]]) -> T:
        """`call` on the first live shard in `digest`'s order; Unavailable if none answers."""
        for index in self._live_order(digest):
            try:
                return await call(self.stores[index])
            except _SHARD_DOWN as e:
                self._failed(index, e)
        raise Unavailable(f"no shard of this store is available for {digest.blob_path}")

    def _group(self, digests: Sequence[Digest]) -> dict[int, list[Digest]]:
        """Digests by their first live shard (digests with none are left out)."""
        groups: dict[int, list[Digest]] = {}
        for d in digests:
            live = self._live_order(d)
            if live:
                groups.setdefault(live[0], []).append(d)
        return groups

    # -- the store ---------------------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        digests = dedupe(digests)
        present: set[Digest] = set()
        pending = list(digests)
        # Each round asks every digest's first live shard; a shard failing in a round is marked
        # down and its digests are asked of their next shard in the following round.
        for _ in range(len(self.stores)):
            if not pending:
                break
            failed: list[Digest] = []
            async with trio.open_nursery() as nursery:
                for index, group in self._group(pending).items():
                    nursery.start_soon(self._ask, index, group, present, failed)
            pending = failed
        return [d for d in digests if d not in present]

    async def _ask(
        self, index: int, group: list[Digest], present: set[Digest], failed: list[Digest]
    ) -> None:
        try:
            missing = set(await self.stores[index].find_missing(group))
        except _SHARD_DOWN as e:
            self._failed(index, e)
            failed.extend(group)
            return
        present.update(d for d in group if d not in missing)

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        for index in self._live_order(digest):
            cm = self.stores[index].open_read(digest, offset)
            try:
                reader = await cm.__aenter__()
            except _SHARD_DOWN as e:
                self._failed(index, e)
                continue
            try:
                yield reader
            except BaseException as e:
                if not await cm.__aexit__(type(e), e, e.__traceback__):
                    raise
            else:
                await cm.__aexit__(None, None, None)
            return
        raise BlobNotFound(digest)

    async def get_bytes(self, digest: Digest) -> bytes:
        try:
            return await self._on_owner(digest, lambda s: s.get_bytes(digest))
        except Unavailable:
            raise BlobNotFound(digest) from None

    async def open_write(self, digest: Digest) -> BlobWriter:
        return await self._on_owner(digest, lambda s: s.open_write(digest))

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        await self._on_owner(digest, lambda s: s.put_bytes(digest, data))

    def max_blob_bytes(self) -> int | None:
        # Any blob may land on any shard, so the smallest limit is the store's limit.
        limits = [x for s in self.stores if (x := s.max_blob_bytes()) is not None]
        return min(limits) if limits else None

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        found: dict[Digest, str] = {}
        for index, group in self._group(digests).items():
            try:
                found.update(await self.stores[index].local_files(group))
            except _SHARD_DOWN as e:
                self._failed(index, e)
        return found

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        return await self._on_owner(digest, lambda s: s.adopt_file(digest, path))

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        return await self._on_owner(
            digest, lambda s: s.discard_if_same_file(digest, st_dev, st_ino)
        )

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
        try:
            now = trio.current_time()
        except RuntimeError:  # outside Trio (a report written after the run)
            now = float("inf")
        out: dict[str, int] = {
            "shard_failures": self.failures,
            "shards_down": sum(1 for t in self._down_until if t > now),
        }
        for shard, store in zip(self._shards, self.stores, strict=True):
            for key, value in store.stats().items():
                out[f"{shard.name}.{key}"] = value
        return out
