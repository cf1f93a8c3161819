"""Fetches an action's input files into the worker cache: in parallel, merged per blob.

Three ways in, chosen per blob: hardlinks from a store on this file system (all in one worker
thread), batches of small blobs (over a network), and one download per blob. Concurrent
requests for one entry share one fetch (the entry is claimed busy in the cache index; others
wait for it). Worker threads write files and return what they installed; the index is updated
on the Trio thread. A blob missing at any stage (FindMissingBlobs, or gone by the time it is
read) is reported in `MissingInputs`, one digest per blob.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from reexec.cas.digest import Digest, is_empty
from reexec.cas.store import BlobNotFound
from reexec.sandbox.cache_index import CacheIndex, Entry, Installed, unlink_quietly
from reexec.sandbox.cas_access import SMALL_BLOB, CasAccess

FETCH_CONCURRENCY = 16


@dataclass
class FetchStats:
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0


class MissingInputs(BlobNotFound):
    """Some input blobs are in neither the local cache nor the CAS."""

    def __init__(self, missing: list[Digest]) -> None:
        super().__init__(missing[0])
        self.missing = missing
        self.message = (
            f"{len(missing)} input blob(s) missing from the CAS, e.g. {missing[0].blob_path}"
        )


class InputFetcher:
    def __init__(
        self, index: CacheIndex, access: CasAccess, concurrency: int = FETCH_CONCURRENCY
    ) -> None:
        self.index = index
        self.access = access
        self._limit = trio.CapacityLimiter(concurrency)
        self.stats = FetchStats()

    async def ensure(self, entries: Iterable[Entry]) -> None:
        """Make every entry present, fetching what is missing.

        Raises MissingInputs naming every blob the CAS does not have either.
        """
        index = self.index
        wanted = [e for e in dict.fromkeys(entries) if not index.has(e)]
        if not wanted:
            return
        started = trio.current_time()
        missing: list[Digest] = []
        # Held in the CAS while fetching, so none is evicted between FindMissingBlobs and its read.
        with self.access.hold([e.digest for e in wanted]):
            await self._fetch(wanted, missing)
        self.stats.fetch_seconds += trio.current_time() - started
        if missing:
            raise MissingInputs(sorted(set(missing)))

    async def _fetch(self, wanted: list[Entry], missing: list[Digest]) -> None:
        index = self.index
        small = (
            [e for e in wanted if e.digest.size <= SMALL_BLOB and index.busy(e) is None]
            if self.access.prefers_batches
            else []
        )
        local = await self.access.local_sources([e.digest for e in wanted])
        linkable = [e for e in wanted if e.digest in local and index.busy(e) is None]
        try:
            async with trio.open_nursery() as nursery:
                if small:
                    nursery.start_soon(self._fetch_small, small, missing)
                if linkable:
                    nursery.start_soon(self._fetch_local, linkable, local, missing)
                batched = set(small) | set(linkable)
                for e in wanted:
                    if e not in batched:
                        nursery.start_soon(self._fetch_one, e, missing)
        except ExceptionGroup as group:
            # Callers handle ReexecError / OSError: report the first failure, not a group.
            raise _first_leaf(group) from group

    def _record(self, installed: list[Installed]) -> None:
        for item in installed:
            self.index.add(item)
            self.stats.fetched_blobs += 1
            self.stats.fetched_bytes += item.entry.digest.size

    async def _fetch_small(self, entries: list[Entry], missing: list[Digest]) -> None:
        index = self.index
        mine = [e for e in entries if index.busy(e) is None and not index.has(e)]
        claims = index.claim(mine)
        # Entries another call started fetching meanwhile: wait for those (or fetch them).
        later = [e for e in entries if e not in claims]
        try:
            digests = list(dict.fromkeys(e.digest for e in mine if not is_empty(e.digest)))
            absent = set(await self.access.find_missing(digests)) if digests else set()
            missing.extend(absent)
            present = [d for d in digests if d not in absent]
            data: dict[Digest, bytes] | None = {}
            if present:
                async with self._limit:
                    try:
                        data = await self.access.read_small(present)
                    except BlobNotFound:
                        data = None  # evicted since FindMissingBlobs: one by one, below
            if data is None:
                later += [e for e in mine if e.digest not in absent]
            else:
                ready = [(e, data.get(e.digest, b"")) for e in mine if e.digest not in absent]
                self._record(await trio.to_thread.run_sync(self._write_all, ready))
        finally:
            index.release(claims)
        await index.evict()
        for e in later:
            await self._fetch_one(e, missing)

    async def _fetch_local(
        self, entries: list[Entry], sources: dict[Digest, str], missing: list[Digest]
    ) -> None:
        """Hardlink blobs from a store on this file system, all in one worker thread."""
        index = self.index
        mine = [e for e in entries if index.busy(e) is None and not index.has(e)]
        claims = index.claim(mine)
        done: list[Installed] = []
        try:
            done = await trio.to_thread.run_sync(
                self._link_all, [(e, sources[e.digest]) for e in claims]
            )
            self._record(done)
        finally:
            index.release(claims)
        await index.evict()
        # Anything that could not be linked (evicted meanwhile) takes the ordinary path, which
        # also reports it missing.
        linked = {item.entry for item in done}
        for e in [e for e in entries if e not in linked]:
            await self._fetch_one(e, missing)

    def _link_all(self, items: list[tuple[Entry, str]]) -> list[Installed]:
        done = []
        for e, src in items:
            tmp = self.index.tmp_path()
            try:
                if is_empty(e.digest):
                    open(tmp, "xb").close()
                else:
                    os.link(src, tmp)
                done.append(self.index.install_sync(tmp, e))
            except OSError:
                unlink_quietly(tmp)
        return done

    def _write_all(self, ready: list[tuple[Entry, bytes]]) -> list[Installed]:
        done = []
        for e, blob in ready:
            tmp = self.index.tmp_path()
            with open(tmp, "xb") as f:
                f.write(blob)
            done.append(self.index.install_sync(tmp, e))
        return done

    async def _fetch_one(self, e: Entry, missing: list[Digest]) -> None:
        index = self.index
        while not index.has(e):
            pending = index.busy(e)
            if pending is None:
                break
            await pending.wait()
        else:
            return
        claims = index.claim([e])
        try:
            tmp = index.tmp_path()
            try:
                async with self._limit:
                    await self.access.fetch_to(e.digest, tmp)
                installed = await trio.to_thread.run_sync(index.install_sync, tmp, e)
            except BlobNotFound:
                missing.append(e.digest)
                return
            finally:
                await trio.to_thread.run_sync(unlink_quietly, tmp)
            self._record([installed])
        finally:
            index.release(claims)
        await index.evict()


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
