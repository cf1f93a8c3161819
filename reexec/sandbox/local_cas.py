"""The worker's local CAS cache: read-only files to hardlink into input roots.

Layout under `root`:
    files/{hash[:2]}/{hash}-{size}{-x}    0444, or 0555 with the -x suffix
    tmp/                                  downloads in progress
Executable and non-executable copies of the same content are separate entries, because
hardlinks share their inode's mode. Concurrent requests for one blob share one download.
Entries leased by a running action are never evicted; others go least recently used first
when the cache grows past `max_bytes`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import trio

from reexec.cas.digest import Digest, DigestFunction, is_empty, new_hasher
from reexec.cas.lru import LruIndex
from reexec.cas.store import BlobNotFound
from reexec.sandbox.cas_access import SMALL_BLOB, CasAccess

log = logging.getLogger(__name__)

FETCH_CONCURRENCY = 16


class Entry(NamedTuple):
    digest: Digest
    executable: bool


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


class LocalCas:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int, access: CasAccess) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self._files_str = str(self.files)
        self.tmp = self.root / "tmp"
        self.access = access
        self._lru: LruIndex[Entry] = LruIndex(max_bytes)
        self._inflight: dict[Entry, trio.Event] = {}
        self._mtimes: dict[Entry, int] = {}  # mtime at insertion, for tamper checks
        self._broken_files: dict[Entry, tuple[int, int]] = {}  # (st_dev, st_ino) of removed
        self._limit = trio.CapacityLimiter(FETCH_CONCURRENCY)
        self.stats = FetchStats()
        self.repaired = 0

    async def start(self) -> None:
        found = await trio.to_thread.run_sync(self._scan)
        for mtime, entry in found:
            self._lru.add(entry, entry.digest.size)
            self._mtimes[entry] = mtime
        log.info(
            "worker cache %s: %d files, %d bytes", self.root, len(self._lru), self._lru.total_bytes
        )

    def _scan(self) -> list[tuple[int, Entry]]:
        self.files.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        found = []
        for fn_dir in os.scandir(self.files):
            try:
                function = DigestFunction[fn_dir.name.upper()]
            except KeyError:
                continue
            for shard in os.scandir(fn_dir.path):
                for f in os.scandir(shard.path):
                    entry = _parse(f.name, function)
                    st = f.stat(follow_symlinks=False)
                    mode = 0o555 if entry and entry.executable else 0o444
                    if (
                        entry is None
                        or st.st_size != entry.digest.size
                        or st.st_mode & 0o7777 != mode
                    ):
                        os.unlink(f.path)
                        continue
                    found.append((st.st_mtime_ns, entry))
        found.sort(key=lambda e: e[0])
        return found

    def path(self, entry: Entry) -> Path:
        return Path(self.path_str(entry))

    def path_str(self, entry: Entry) -> str:
        """The entry's file as a string: the materialiser calls this once per input file, and
        string formatting is several times cheaper than pathlib joins there."""
        d = entry.digest
        suffix = "-x" if entry.executable else ""
        return f"{self._files_str}/{d.function.name.lower()}/{d.hash[:2]}/{d.hash}-{d.size}{suffix}"

    # -- leases ---------------------------------------------------------------------------------

    @contextmanager
    def lease(self, entries: Iterable[Entry]) -> Iterator[None]:
        """Keep `entries` from eviction while an action uses them."""
        held = list(dict.fromkeys(entries))
        for e in held:
            self._lru.pin(e)
        try:
            yield
        finally:
            for e in held:
                self._lru.unpin(e)

    # -- fetching -------------------------------------------------------------------------------

    async def ensure(self, entries: Iterable[Entry]) -> None:
        """Make every entry present, fetching what is missing (in parallel, merged).

        Raises MissingInputs naming every blob the CAS does not have either.
        """
        wanted = [e for e in dict.fromkeys(entries) if not self._lru.touch(e)]
        if not wanted:
            return
        started = trio.current_time()
        missing: list[Digest] = []
        small = (
            [e for e in wanted if e.digest.size <= SMALL_BLOB and e not in self._inflight]
            if self.access.prefers_batches
            else []
        )
        local = await self.access.local_sources([e.digest for e in wanted])
        linkable = [e for e in wanted if e.digest in local and e not in self._inflight]
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
        self.stats.fetch_seconds += trio.current_time() - started
        if missing:
            raise MissingInputs(sorted(set(missing)))

    async def _fetch_small(self, entries: list[Entry], missing: list[Digest]) -> None:
        mine = [e for e in entries if e not in self._inflight and not self._lru.touch(e)]
        mine_set = set(mine)
        # Entries another call started fetching meanwhile: wait for those (or fetch them).
        others = [e for e in entries if e not in mine_set]
        events = {e: trio.Event() for e in mine}
        self._inflight.update(events)
        try:
            digests = list(dict.fromkeys(e.digest for e in mine if not is_empty(e.digest)))
            absent = set(await self.access.find_missing(digests)) if digests else set()
            missing.extend(absent)
            present = [d for d in digests if d not in absent]
            data: dict[Digest, bytes] = {}
            if present:
                async with self._limit:
                    data = await self.access.read_small(present)
            ready = [(e, data.get(e.digest, b"")) for e in mine if e.digest not in absent]
            await trio.to_thread.run_sync(self._write_all, ready)
            for e, blob in ready:
                self._added(e)
                self.stats.fetched_blobs += 1
                self.stats.fetched_bytes += len(blob)
        finally:
            for e, ev in events.items():
                del self._inflight[e]
                ev.set()
        self._evict_soon()
        for e in others:
            await self._fetch_one(e, missing)

    async def _fetch_local(
        self, entries: list[Entry], sources: dict[Digest, str], missing: list[Digest]
    ) -> None:
        """Hardlink blobs from a store on this file system, all in one worker thread."""
        mine = [e for e in entries if e not in self._inflight and not self._lru.touch(e)]
        mine_set = set(mine)
        others = [e for e in entries if e not in mine_set]
        events = {e: trio.Event() for e in mine}
        self._inflight.update(events)
        try:
            done = await trio.to_thread.run_sync(
                self._link_all, [(e, sources[e.digest]) for e in mine]
            )
            for e in done:
                self._added(e)
                self.stats.fetched_blobs += 1
                self.stats.fetched_bytes += e.digest.size
        finally:
            for e, ev in events.items():
                del self._inflight[e]
                ev.set()
        self._evict_soon()
        # Anything that could not be linked (evicted meanwhile) takes the ordinary path, which
        # also reports it missing.
        failed = set(done)
        for e in [e for e in mine if e not in failed] + others:
            await self._fetch_one(e, missing)

    def _link_all(self, items: list[tuple[Entry, str]]) -> list[Entry]:
        done = []
        for e, src in items:
            tmp = self.tmp / uuid.uuid4().hex
            try:
                if is_empty(e.digest):
                    open(tmp, "xb").close()
                else:
                    os.link(src, tmp)
                self._install(tmp, e)
            except OSError:
                _unlink_quietly(tmp)
                continue
            done.append(e)
        return done

    def _write_all(self, ready: list[tuple[Entry, bytes]]) -> None:
        for e, blob in ready:
            tmp = self.tmp / uuid.uuid4().hex
            with open(tmp, "xb") as f:
                f.write(blob)
            self._install(tmp, e)

    def _install(self, tmp: Path, e: Entry) -> None:
        mode = 0o555 if e.executable else 0o444
        st = os.stat(tmp)
        if st.st_nlink > 1 and st.st_mode & 0o7777 != mode:
            # A hardlink to someone else's file (the CAS store's blob): chmod would change
            # their copy too, and the mode of other entries sharing it. Copy this one.
            copy = self.tmp / uuid.uuid4().hex
            shutil.copyfile(tmp, copy)
            os.unlink(tmp)
            tmp = copy
        os.chmod(tmp, mode)
        final = self.path(e)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        self._mtimes[e] = os.stat(final).st_mtime_ns

    async def _fetch_one(self, e: Entry, missing: list[Digest]) -> None:
        while True:
            if self._lru.touch(e):
                return
            pending = self._inflight.get(e)
            if pending is None:
                break
            await pending.wait()
        event = self._inflight[e] = trio.Event()
        try:
            tmp = self.tmp / uuid.uuid4().hex
            try:
                async with self._limit:
                    await self.access.fetch_to(e.digest, tmp)
                await trio.to_thread.run_sync(self._install, tmp, e)
            except BlobNotFound:
                missing.append(e.digest)
                return
            finally:
                await trio.to_thread.run_sync(_unlink_quietly, tmp)
            self._added(e)
            self.stats.fetched_blobs += 1
            self.stats.fetched_bytes += e.digest.size
        finally:
            del self._inflight[e]
            event.set()
        self._evict_soon()

    def _added(self, e: Entry) -> None:
        self._lru.add(e, e.digest.size)

    def _evict_soon(self) -> None:
        victims = self._lru.take_evictions()
        for v in victims:
            self._mtimes.pop(v, None)
            _unlink_quietly(self.path(v))

    # -- outputs --------------------------------------------------------------------------------

    def adopt_sync(self, src: Path, e: Entry) -> Path:
        """Move a freshly hashed output file into the cache (from a worker thread).

        Returns the cache path. If the entry already exists, `src` is simply removed.
        """
        final = self.path(e)
        if final.exists():
            _unlink_quietly(src)
            return final
        if os.lstat(src).st_uid != os.geteuid():
            # Written by an action running as another user: as owner it could still chmod
            # and rewrite the cache entry (and a CAS blob linked to it) later.
            os.chown(src, os.geteuid(), os.getegid(), follow_symlinks=False)
        os.chmod(src, 0o555 if e.executable else 0o444)
        try:
            os.rename(src, final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, final)
        except OSError:
            shutil.copyfile(src, final)  # another file system
            os.chmod(final, 0o555 if e.executable else 0o444)
        self._mtimes[e] = os.stat(final).st_mtime_ns
        return final

    def register_adopted(self, entries: Iterable[Entry]) -> None:
        """Index entries added by `adopt_sync` (call on the Trio thread)."""
        for e in entries:
            self._added(e)
        self._evict_soon()

    # -- tamper safety --------------------------------------------------------------------------

    def check_intact_sync(self, entries: Iterable[Entry]) -> list[Entry]:
        """Entries whose file changed since insertion (size, mode, content); run in a thread.

        A changed mtime alone is not proof (the CAS store touches blobs that share the inode
        when it reads them): such files are hashed again. Broken files are removed so the next
        action fetches a fresh copy.
        """
        broken = []
        for e in entries:
            path = self.path(e)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                broken.append(e)
                continue
            mode = 0o555 if e.executable else 0o444
            recorded = self._mtimes.get(e, st.st_mtime_ns)
            if (
                st.st_size != e.digest.size
                or st.st_mode & 0o7777 != mode
                or not stat.S_ISREG(st.st_mode)
                or (st.st_mtime_ns != recorded and not _content_matches(path, e.digest))
            ):
                broken.append(e)
                self._broken_files[e] = (st.st_dev, st.st_ino)
                _unlink_quietly(path)
            elif st.st_mtime_ns != recorded:
                self._mtimes[e] = st.st_mtime_ns
        return broken

    def forget(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self._lru.remove(e)
            self._mtimes.pop(e, None)
            self._broken_files.pop(e, None)
            self.repaired += 1

    async def drop_broken(self, entries: Iterable[Entry]) -> None:
        """`forget` entries `check_intact_sync` found broken, and have the CAS drop blobs that
        were the very same file (hardlinked from or to it): those are corrupted too."""
        entries = list(entries)
        files = [(e.digest, *self._broken_files[e]) for e in entries if e in self._broken_files]
        self.forget(entries)
        if files:
            await self.access.discard_modified(files)

    def stats_dict(self) -> dict[str, int]:
        return {
            "files": len(self._lru),
            "bytes": self._lru.total_bytes,
            "max_bytes": self._lru.max_bytes,
            "evictions": self._lru.evictions,
            "fetched_blobs": self.stats.fetched_blobs,
            "fetched_bytes": self.stats.fetched_bytes,
            "repaired": self.repaired,
        }


def _parse(name: str, function: DigestFunction) -> Entry | None:
    parts = name.split("-")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        return None
    if len(parts) == 3 and parts[2] != "x":
        return None
    return Entry(Digest(parts[0], int(parts[1]), function), len(parts) == 3)


def _content_matches(path: Path, digest: Digest) -> bool:
    h = new_hasher(digest.function)
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == digest.hash


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
