"""FilesystemStore: one read-only file per blob under sharded directories.

Layout under `root`:
    blobs/{function}/{hash[:2]}/{hash}-{size}   committed blobs, mode 0444
    tmp/                                        uploads in progress
A blob becomes visible only by rename(2) of a complete temp file, so a crash (even SIGKILL)
never leaves a partial blob under blobs/. On start the index is rebuilt from file names and
sizes alone (no content is read); files whose size disagrees with their name are removed.
Least recently used blobs are evicted beyond `max_bytes`; blobs being read or held by an
in-flight action are pinned. Open writers reserve their declared size against `max_bytes`
(released on commit or abort), and no blob larger than `max_blob_bytes` is accepted, so neither
one huge blob nor many partial uploads can push everything else out.

Shared by several processes (`shared`, with `[server] processes = N`; see fs_shared.py), the
same directory is served by N processes, each with its own index:
- the file system says which blobs exist: a miss in the index is checked with the file, and a
  hit is confirmed by setting the file's mtime to now, the use time every process can see (at
  most once a second per blob and process: TOUCH_INTERVAL_NS);
- blobs are installed by rename(2) only where none is (never replacing one) and evicted by
  unlink(2), both under the ledger's cross-process lock, and the ledger counts stored and
  reserved bytes of all processes, so `max_bytes` bounds their sum;
- a process evicts from its own index, oldest first, but skips a blob whose mtime is newer than
  its own last use of it (another process used it since) and one another process is reading
  (readers hold flock(LOCK_SH) on the open file; the evictor takes LOCK_EX non-blocking);
- uploads go to a temp directory per process slot, so a restarted process removes only its
  dead predecessor's leftovers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path

import trio

from reexec.cas.digest import (
    SUPPORTED_FUNCTIONS,
    Digest,
    DigestFunction,
    hex_length,
    is_empty,
    new_hasher,
)
from reexec.cas.fs_shared import Ledger, ProcessShare
from reexec.cas.lru import LruIndex
from reexec.cas.store import (
    READ_CHUNK,
    BlobNotFound,
    BlobReader,
    BytesReader,
    Store,
    check_blob_size,
    check_offset,
    dedupe,
)
from reexec.cas.write_cost import WriteCost
from reexec.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

# Writes are gathered into chunks of this size before a thread writes them: one thread hop per
# MiB instead of one per client chunk (Bazel sends 16 KiB chunks).
WRITE_BUFFER = 1 << 20

# get_bytes/put_bytes of blobs up to this size do their file I/O on the event loop: a local
# 4 KiB read or write costs ~15 us, a trio.to_thread hop ~100 us of CPU.
INLINE_IO_LIMIT = 64 * 1024

# Removing a temp file after a failed or aborted upload; see the call sites.
CLEANUP_TIMEOUT_S = 10.0

_LOWER_HEX = re.compile(r"[0-9a-f]+")

# Shared mode: presence checks of more digests than this run in a thread (a utime(2) or
# stat(2) each, ~2 us); evictions check and unlink at most this many files per batch.
INLINE_CHECKS = 64
EVICT_BATCH = 64

# Shared mode: a blob used this recently by this process is not touched again (one utime(2) per
# blob and second at most): other processes see its use time to within this interval.
TOUCH_INTERVAL_NS = 1_000_000_000

# What an evictor found when it tried to remove one blob (shared mode).
_EVICTED, _GONE, _IN_USE = "evicted", "gone", "in use"


class FilesystemStore(Store):
    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = False,
        max_blob_bytes: int | None = None,
        shared: ProcessShare | None = None,
    ) -> None:
        """`shared`: this process's slot among several serving the same directory."""
        self.root = Path(root)
        self._blobs_dir = self.root / "blobs"
        self._blobs_str = str(self._blobs_dir)
        self._tmp_dir = self.root / "tmp"
        self._share = shared
        self._ledger: Ledger | None = None
        # Shared mode: when this process last used each indexed blob (the mtime it set or saw).
        self._used: dict[Digest, int] = {}
        if shared is not None:
            self._tmp_dir = self.root / "tmp" / f"slot-{shared.slot}"
        self._fsync = fsync
        self._lru: LruIndex[Digest] = LruIndex(max_bytes)
        # A blob may take at most this much (never more than the whole store).
        limits = [n for n in (max_blob_bytes, max_bytes) if n is not None and n > 0]
        self._max_blob = min(limits) if limits else None
        # Renames into blobs/ and unlinks of evicted blobs are serialised so an eviction's
        # unlink can never remove a file that a concurrent upload just renamed into place.
        self._mutate = trio.Lock()
        # Where small blobs are written: on the event loop while that is cheap, else a thread.
        self.write_cost = WriteCost()
        self._started = False
        # Blobs dropped from the index other than by eviction (file vanished, discarded):
        # with the LRU's eviction count, lets callers tell that no blob has left since.
        self._forgotten = 0

    # -- start-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directories and rebuild the index from the file names on disk."""
        entries = await trio.to_thread.run_sync(self._scan)
        if self._share is not None:
            await self._start_shared(entries)
            return
        for _, digest in entries:
            self._lru.add(digest, digest.size)
        self._started = True
        victims = self._lru.take_evictions()
        if victims:
            await trio.to_thread.run_sync(self._unlink_all, victims)
        log.info(
            "filesystem store %s: %d blobs, %d bytes (max %d)",
            self.root,
            len(self._lru),
            self._lru.total_bytes,
            self._lru.max_bytes,
        )

    def _scan(self) -> list[tuple[int, Digest]]:
        self._blobs_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in os.scandir(self._tmp_dir):
            if leftover.is_dir(follow_symlinks=False):
                log.warning("ignoring unexpected directory %s", leftover.path)
                continue
            _remove_quietly(leftover.path)
        return self._scan_blobs()

    def _scan_blobs(self) -> list[tuple[int, Digest]]:
        """Every committed blob with its mtime, oldest first."""
        found: list[tuple[int, Digest]] = []
        for fn_entry in os.scandir(self._blobs_dir):
            try:
                function = DigestFunction[fn_entry.name.upper()]
            except KeyError:
                function = None
            if function is None or not fn_entry.is_dir(follow_symlinks=False):
                log.warning("ignoring unknown entry %s", fn_entry.path)
                continue
            for shard in os.scandir(fn_entry.path):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for f in os.scandir(shard.path):
                    if f.is_dir(follow_symlinks=False):
                        # Never ours; unlink(2) cannot remove it and must not abort start().
                        log.warning("ignoring unexpected directory %s", f.path)
                        continue
                    digest = _parse_file_name(f.name, function, shard.name)
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # evicted meanwhile by another process sharing the store
                    if digest is None or st.st_size != digest.size:
                        log.warning("removing corrupt or foreign file %s", f.path)
                        _remove_quietly(f.path)
                        continue
                    found.append((st.st_mtime_ns, digest))
        found.sort(key=lambda e: e[0])
        return found

    # -- shared by several processes ---------------------------------------------------------

    async def _start_shared(self, entries: list[tuple[int, Digest]]) -> None:
        assert self._share is not None
        self._ledger = Ledger(self.root / "ledger", self._share)
        self._lru.replace((d, d.size) for _, d in entries)
        self._used = {d: mtime for mtime, d in entries}
        async with self._exclusive():
            first = self._ledger.join(self._lru.total_bytes)
            if first:
                # No process of this run has written yet (joining comes first): whatever
                # tmp/ holds is a previous run's leftovers.
                await trio.to_thread.run_sync(self._remove_other_temps)
            await self._evict_shared()
        self._started = True
        state = self._ledger.read()
        log.info(
            "filesystem store %s (process slot %d%s): %d blobs, %d bytes (max %d)",
            self.root,
            self._share.slot,
            ", reset the shared ledger" if first else "",
            len(self._lru),
            state.stored,
            self._lru.max_bytes,
        )

    def _remove_other_temps(self) -> None:
        for entry in os.scandir(self.root / "tmp"):
            if entry.path == str(self._tmp_dir):
                continue
            if entry.is_dir(follow_symlinks=False):
                for leftover in os.scandir(entry.path):
                    if not leftover.is_dir(follow_symlinks=False):
                        _remove_quietly(leftover.path)
            else:
                _remove_quietly(entry.path)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """This process's `_mutate` and, when shared, the ledger's cross-process lock."""
        async with self._mutate:
            ledger = self._ledger
            if ledger is None:
                yield
                return
            if not ledger.try_lock():
                # Held by another process for a few syscalls: wait in a thread, not the loop.
                try:
                    await trio.to_thread.run_sync(ledger.lock)
                except BaseException:
                    ledger.unlock()  # taken just before a cancellation was delivered
                    raise
            try:
                yield
            finally:
                ledger.unlock()

    def _use_all(self, digests: Sequence[Digest]) -> list[int | None]:
        """Set each blob's mtime to now (the use every process sees); None where it is gone."""
        out: list[int | None] = []
        known = self._used
        for d in digests:
            path = self.blob_path_str(d)
            # Blobs this process has not seen are mostly absent: access(2) answers that without
            # raising (half the cost of a failed utime(2)).
            if d not in known and not os.access(path, os.F_OK):
                out.append(None)
                continue
            now = time.time_ns()
            try:
                os.utime(path, ns=(now, now))
            except FileNotFoundError:
                out.append(None)
            else:
                out.append(now)
        return out

    def _note_uses(self, digests: Sequence[Digest], used: list[int | None]) -> list[Digest]:
        """Apply `_use_all`'s answers to the index (on the loop); returns the missing ones."""
        missing: list[Digest] = []
        for d, t in zip(digests, used, strict=True):
            if t is None:
                self._used.pop(d, None)
                self._drop(d)
                missing.append(d)
            else:
                self._lru.add(d, d.size)  # most recently used, added if another process wrote it
                self._used[d] = t
        return missing

    def _not_recent(self, digests: Sequence[Digest], verify: bool) -> tuple[int, list[Digest]]:
        """The recency bound and the digests whose files must be checked: those this process
        did not use within TOUCH_INTERVAL_NS (with `verify`, all of them)."""
        now = time.time_ns()
        recent = now + 1 if verify else now - TOUCH_INTERVAL_NS
        used_at = self._used
        return recent, [d for d in digests if used_at.get(d, 0) < recent]

    def _settle_check(
        self,
        digests: Sequence[Digest],
        recent: int,
        check: list[Digest],
        used: list[int | None],
    ) -> list[Digest]:
        """Touch the recently used digests in the index, apply `_use_all`'s answers for the
        checked ones; returns the missing ones."""
        if len(check) < len(digests):
            used_at = self._used
            touch = self._lru.touch
            for d in digests:
                if used_at.get(d, 0) >= recent:
                    touch(d)
        return self._note_uses(check, used)

    def _check_shared_nowait(
        self, digests: Sequence[Digest], *, verify: bool = False
    ) -> list[Digest] | None:
        """`_check_shared`'s answer when at most INLINE_CHECKS files need a system call (done
        inline), else None."""
        recent, check = self._not_recent(digests, verify)
        if len(check) > INLINE_CHECKS:
            return None
        return self._settle_check(digests, recent, check, self._use_all(check) if check else [])

    async def _check_shared(
        self, digests: Sequence[Digest], *, verify: bool = False
    ) -> list[Digest]:
        """Which of `digests` (deduplicated, none empty) are missing; marks the rest used.

        Unless `verify`, a blob this process used less than TOUCH_INTERVAL_NS ago is taken as
        present without a system call: its mtime already says it was used that recently. That
        answer is stale if another process evicted the blob meanwhile, which FindMissingBlobs
        may be (a client whose Execute then finds it missing uploads it again) but a write
        must not: "already stored" would drop the upload.
        """
        recent, check = self._not_recent(digests, verify)
        if len(check) <= INLINE_CHECKS:
            used = self._use_all(check) if check else []
        else:
            used = await trio.to_thread.run_sync(self._use_all, check)
        return self._settle_check(digests, recent, check, used)

    async def _present(self, digest: Digest, *, verify: bool = False) -> bool:
        """Whether the blob is stored, marking it used (by the index, or the file if shared;
        `verify`: always by the file)."""
        if self._share is None:
            return self._lru.touch(digest)
        return not await self._check_shared([digest], verify=verify)

    def _open_shared(self, path: str) -> object | None:
        """The blob's file, open and read-locked (an evictor skips it meanwhile); None if it is
        gone or being evicted this very moment."""
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_nlink == 0:
                raise FileNotFoundError(path)  # evicted between our open and our lock
        except (BlockingIOError, FileNotFoundError):
            f.close()
            return None
        return f

    async def _install_shared(self, tmp: str, digest: Digest, mtime: int | None) -> bool:
        """Rename a complete temp file into blobs/ unless the blob is there already (another
        process stored it), count it, and evict what no longer fits. Returns whether `tmp` was
        taken; if not, the caller removes it. Caller holds `_exclusive`.

        Every install and eviction holds the ledger's lock, so "not there, then rename" cannot
        race with another installer (no blob is ever replaced, so each is counted once) nor with
        an evictor. `mtime`: the temp file's, which the blob keeps (None: set it to now).
        """
        ledger = self._ledger
        assert ledger is not None
        final = self.blob_path_str(digest)
        installed = not os.access(final, os.F_OK)
        if installed:
            # Counted before the rename: killed in between, the count is too high, never low.
            ledger.add_stored(digest.size)
            try:
                if self._fsync:
                    await trio.to_thread.run_sync(self._rename_in, tmp, final)
                else:
                    self._rename_in(tmp, final)
            except BaseException:
                ledger.add_stored(-digest.size)
                raise
        if installed and mtime is not None:
            self._note_uses([digest], [mtime])
        else:
            # The blob that was there (or an adopted file's old inode) is now the most
            # recently used, for every process.
            self._note_uses([digest], self._use_all([digest]))
        # Never the blob just stored: this index may know little else (other processes wrote
        # the rest), and the client is about to be told it is stored.
        with self._lru.pinned([digest]):
            await self._evict_shared()
        return installed

    def _rename_in(self, tmp: str, final: str) -> None:
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(tmp, final)
        if self._fsync:
            _fsync_dir(Path(final).parent)

    async def _evict_shared(self) -> None:
        """Evict until the stored and reserved bytes of every process fit in `max_bytes`.
        Caller holds `_exclusive`.

        Candidates come from this process's index, oldest first; each is checked at its file
        (`_try_evict`). What another process used since this one did goes back as the most
        recently used. At most three passes over the index: as it is; rebuilt from the
        directory (other processes stored what this one never saw), ordered by the mtimes,
        every process's last use; and, if every blob was used again meanwhile, once more in
        that order without the recency check. Blobs being read (or pinned in this process) are
        never taken: only they can keep the store over `max_bytes`, as pinned blobs do in a
        single process.
        """
        ledger = self._ledger
        assert ledger is not None
        max_bytes = self._lru.max_bytes
        if max_bytes <= 0:
            return
        budget = len(self._lru)  # keys to examine in this pass
        passes = 0
        while True:
            state = ledger.read()
            excess = state.stored + state.reserved_total - max_bytes
            if excess <= 0:
                return
            batch = self._lru.take_oldest(excess, EVICT_BATCH) if budget > 0 else []
            if not batch:
                if passes == 2:
                    log.warning(
                        "filesystem store %s: %d bytes over max_bytes, all of them in use",
                        self.root,
                        excess,
                    )
                    return
                if passes == 0:
                    entries = await trio.to_thread.run_sync(self._scan_blobs)
                    self._lru.replace((d, d.size) for _, d in entries)
                    self._used = {d: mtime for mtime, d in entries}
                passes += 1
                budget = len(self._lru)
                continue
            budget -= len(batch)
            evicted = 0
            for d, size in batch:
                verdict, mtime = self._try_evict(d, recency=passes < 2)
                if verdict is _EVICTED:
                    ledger.add_stored(-size)  # after the unlink: killed before, too high
                    self._used.pop(d, None)
                    evicted += 1
                elif verdict is _GONE:
                    self._used.pop(d, None)
                    self._forgotten += 1
                else:
                    self._lru.add(d, size)
                    if mtime:
                        self._used[d] = mtime
            self._lru.evictions += evicted
            await trio.lowlevel.checkpoint()

    def _try_evict(self, digest: Digest, *, recency: bool = True) -> tuple[str, int]:
        """Unlink the blob unless another process reads it or (with `recency`) used it after
        this one did. Returns the verdict and, when it stays, the file's mtime."""
        path = self.blob_path_str(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _GONE, 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _IN_USE, 0  # a reader holds LOCK_SH
            st = os.fstat(fd)
            if st.st_nlink == 0:
                return _GONE, 0
            if recency and st.st_mtime_ns > self._used.get(digest, 0):
                return _IN_USE, st.st_mtime_ns
            # Counted first, so whoever sees the blob gone sees the count changed.
            assert self._ledger is not None
            self._ledger.add_evictions(1)
            os.unlink(path)
            return _EVICTED, 0
        finally:
            os.close(fd)

    # -- paths ------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        """Where a committed blob lives (for hardlinking by a co-located worker)."""
        return Path(self.blob_path_str(digest))

    def blob_path_str(self, digest: Digest) -> str:
        # Formatted, not joined with pathlib: workers ask for thousands of these per action.
        d = digest
        return f"{self._blobs_str}/{d.function.name.lower()}/{d.hash[:2]}/{d.hash}-{d.size}"

    # -- Store ------------------------------------------------------------------------------

    def max_blob_bytes(self) -> int | None:
        return self._max_blob

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        if self._share is not None:
            return await self._check_shared([d for d in dedupe(digests) if not is_empty(d)])
        return [d for d in self._lru.touch_missing(digests) if not is_empty(d)]

    def find_missing_nowait(self, digests: Sequence[Digest]) -> list[Digest] | None:
        if self._share is not None:
            return self._check_shared_nowait([d for d in dedupe(digests) if not is_empty(d)])
        return [d for d in self._lru.touch_missing(digests) if not is_empty(d)]

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        check_offset(digest, offset)
        if is_empty(digest):
            yield BytesReader(b"")
            return
        if not await self._present(digest):
            raise BlobNotFound(digest)
        self._lru.pin(digest)
        try:
            f = await trio.to_thread.run_sync(self._open_at, digest, offset)
            try:
                yield _FileReader(f, digest.size)
            finally:
                f.close()
        finally:
            self._lru.unpin(digest)

    def _open_at(self, digest: Digest, offset: int) -> object:
        path = self.blob_path(digest)
        if self._share is not None:
            f = self._open_shared(str(path))
            if f is None:
                self._forget(digest)
                raise BlobNotFound(digest)
            if offset:
                f.seek(offset)  # type: ignore[attr-defined]
            return f  # marked used by _present
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            self._forget(digest)
            raise BlobNotFound(digest) from None
        if offset:
            f.seek(offset)
        _touch_quietly(path)
        return f

    async def get_bytes(self, digest: Digest) -> bytes:
        if is_empty(digest):
            return b""
        if not await self._present(digest):
            raise BlobNotFound(digest)
        if digest.size <= INLINE_IO_LIMIT:
            # No suspension point: nothing can evict it meanwhile, no pin needed.
            return self._read_whole(digest, inline=True)
        self._lru.pin(digest)
        try:
            return await trio.to_thread.run_sync(self._read_whole, digest)
        finally:
            self._lru.unpin(digest)

    def get_bytes_nowait(self, digest: Digest) -> bytes | None:
        if is_empty(digest):
            return b""
        if digest.size > INLINE_IO_LIMIT:
            return None
        if self._share is None:
            present = self._lru.touch(digest)
        else:
            missing = self._check_shared_nowait([digest])
            if missing is None:
                return None
            present = not missing
        if not present:
            raise BlobNotFound(digest)
        return self._read_whole(digest, inline=True)

    def _read_whole(self, digest: Digest, inline: bool = False) -> bytes:
        path = self.blob_path(digest)
        if self._share is not None:
            f = self._open_shared(str(path))
            if f is None:
                if inline:
                    self._drop(digest)
                else:
                    self._forget(digest)
                raise BlobNotFound(digest)
            with f:  # type: ignore[attr-defined]
                return f.read()  # type: ignore[attr-defined,no-any-return]
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read()
        except FileNotFoundError:
            if inline:
                self._drop(digest)
            else:
                self._forget(digest)
            raise BlobNotFound(digest) from None
        _touch_quietly(path)
        return data

    def _forget(self, digest: Digest) -> None:
        # Called from a worker thread: hop back so the index is only mutated on the loop.
        try:
            trio.from_thread.run_sync(self._drop, digest)
        except RuntimeError:
            self._drop(digest)

    def _drop(self, digest: Digest) -> None:
        """Remove a blob from the index that did not leave by eviction (on the loop)."""
        self._used.pop(digest, None)
        if self._lru.remove(digest) is not None:
            self._forgotten += 1

    async def open_write(self, digest: Digest) -> _FileWriter:
        check_blob_size(digest, self._max_blob)
        if self._ledger is not None:
            return await self._open_write_shared(digest)
        if not self._lru.try_reserve(digest.size):
            raise ResourceExhausted(
                f"blob {digest.blob_path}: uploads in progress already reserve "
                f"{self._lru.reserved_bytes} of this CAS's {self._lru.max_bytes} bytes; retry later"
            )
        try:
            if self._lru.over_capacity():
                async with self._mutate:
                    # Make room for the reservation now, not at commit: partial uploads count.
                    victims = self._lru.take_evictions()
                    if victims:
                        await trio.to_thread.run_sync(self._unlink_all, victims)
            fd, path = await trio.to_thread.run_sync(self._create_temp)
        except BaseException:
            self._lru.release(digest.size)
            raise
        return _FileWriter(self, digest, fd, path)

    async def _open_write_shared(self, digest: Digest) -> _FileWriter:
        ledger = self._ledger
        assert ledger is not None
        async with self._exclusive():
            reserved = ledger.read().reserved_total
            if self._lru.max_bytes > 0 and reserved + digest.size > self._lru.max_bytes:
                raise ResourceExhausted(
                    f"blob {digest.blob_path}: uploads in progress already reserve {reserved} "
                    f"of this CAS's {self._lru.max_bytes} bytes; retry later"
                )
            ledger.add_reserved(digest.size)
            self._lru.reserved_bytes += digest.size  # this process's share, for stats
            try:
                # Make room for the reservation now, not at commit: partial uploads count.
                await self._evict_shared()
            except BaseException:
                ledger.add_reserved(-digest.size)
                self._lru.release(digest.size)
                raise
        try:
            fd, path = await trio.to_thread.run_sync(self._create_temp)
        except BaseException:
            await self._release_shared(digest.size)
            raise
        return _FileWriter(self, digest, fd, path)

    async def _release_shared(self, size: int) -> None:
        """Give back an upload's reservation (bounded: it runs in cleanup)."""
        with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            async with self._exclusive():
                assert self._ledger is not None
                self._ledger.add_reserved(-size)
                self._lru.release(size)

    def _create_temp(self) -> tuple[int, str]:
        path = str(self._tmp_dir / uuid.uuid4().hex)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return fd, path

    def _check_put(self, digest: Digest, data: bytes) -> None:
        check_blob_size(digest, self._max_blob)
        if len(data) != digest.size:
            raise InvalidArgument(
                f"blob {digest.blob_path}: got {len(data)} bytes, the digest says {digest.size}"
            )

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        self._check_put(digest, data)
        if is_empty(digest) or await self._present(digest, verify=True):
            return
        if self._ledger is not None:
            await self._put_shared(digest, data)
            return
        small = digest.size <= INLINE_IO_LIMIT
        if small and self.write_cost.inline():
            async with self._mutate:
                self.write_cost.note(self._write_small(digest, data))
                await self._add(digest)
            return
        # The temp file is written without the lock, so uploads write in parallel (creating a
        # file can take a millisecond of kernel time); only the install needs the lock. Its
        # bytes are reserved meanwhile, as an upload's are.
        if not self._lru.try_reserve(digest.size):
            raise ResourceExhausted(
                f"blob {digest.blob_path}: uploads in progress already reserve "
                f"{self._lru.reserved_bytes} of this CAS's {self._lru.max_bytes} bytes; retry later"
            )
        try:
            started = time.perf_counter()
            tmp, _ = await trio.to_thread.run_sync(self._write_temp, digest, data)
        except BaseException:
            self._lru.release(digest.size)
            raise
        if small:
            self.write_cost.note(time.perf_counter() - started)  # with the hop: a rough figure
        await self._install_local(tmp, digest, reserved=digest.size)

    def put_bytes_nowait(self, digest: Digest, data: bytes) -> bool:
        """Small blobs only, on an unshared store, when nothing is being installed or evicted
        (the `_mutate` lock is free, and no eviction is needed to make room): then the inline
        write below is exactly `put_bytes` holding the lock."""
        if (
            self._share is not None
            or digest.size > INLINE_IO_LIMIT
            or not self.write_cost.inline()
            or self._mutate.locked()
            or self._lru.over_capacity(digest.size)
        ):
            return False
        self._check_put(digest, data)
        if is_empty(digest) or self._lru.touch(digest):
            return True
        self.write_cost.note(self._write_small(digest, data))
        self._lru.add(digest, digest.size)
        return True

    async def _put_shared(self, digest: Digest, data: bytes) -> None:
        # The temp file is written without the lock: only the rename needs it.
        started = time.perf_counter()
        if digest.size <= INLINE_IO_LIMIT and self.write_cost.inline():
            tmp, mtime = self._write_temp(digest, data)
        else:
            tmp, mtime = await trio.to_thread.run_sync(self._write_temp, digest, data)
        if digest.size <= INLINE_IO_LIMIT:
            # Measured around the hop too: a rough figure, enough to come back once cheap.
            self.write_cost.note(time.perf_counter() - started)
        await self._install_or_remove(tmp, digest, mtime)

    async def _install_or_remove(self, tmp: str, digest: Digest, mtime: int | None) -> None:
        """`_install_shared` under the lock; the temp file is removed if it was not taken."""
        taken = False
        try:
            async with self._exclusive():
                taken = await self._install_shared(tmp, digest, mtime)
        finally:
            if not taken:
                with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                    await trio.to_thread.run_sync(_remove_quietly, tmp, abandon_on_cancel=True)

    def _write_small(self, digest: Digest, data: bytes) -> float:
        """`_write_whole`; returns how long it took, for `write_cost`."""
        started = time.perf_counter()
        self._write_whole(digest, data)
        return time.perf_counter() - started

    def _write_whole(self, digest: Digest, data: bytes) -> None:
        tmp, _ = self._write_temp(digest, data)
        try:
            self._install(tmp, digest)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def _write_temp(self, digest: Digest, data: bytes) -> tuple[str, int]:
        """A complete, read-only temp file holding `data`, and its mtime."""
        fd, tmp = self._create_temp()
        try:
            try:
                # A raw write may be short (a nearly full disk): write until all is written,
                # so the next write raises ENOSPC instead of installing a truncated blob.
                _write_all(fd, data)
                st = os.fstat(fd)
                if st.st_size != digest.size:
                    raise OSError(errno.EIO, f"{digest.blob_path}: wrote a short file")
                self._finish_file(fd)
            finally:
                os.close(fd)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return tmp, st.st_mtime_ns

    def _finish_file(self, fd: int) -> None:
        if self._fsync:
            os.fsync(fd)
        os.fchmod(fd, 0o444)

    def _install(self, tmp: str, digest: Digest) -> None:
        final = self.blob_path(digest)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        if self._fsync:
            # The rename lives in the directory: without this a power loss can lose the blob
            # that was already reported stored.
            _fsync_dir(final.parent)

    async def _add(self, digest: Digest) -> None:
        """Record a just-installed blob and evict what no longer fits. Caller holds _mutate."""
        self._lru.add(digest, digest.size)
        victims = self._lru.take_evictions()
        if victims:
            await trio.to_thread.run_sync(self._unlink_all, victims)

    def _unlink_all(self, digests: list[Digest]) -> None:
        for d in digests:
            _remove_quietly(self.blob_path(d))

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        if self._share is not None:
            wanted = [d for d in dedupe(digests) if not is_empty(d)]
            missing = set(await self._check_shared(wanted, verify=True))
            return {d: self.blob_path_str(d) for d in wanted if d not in missing}
        touch = self._lru.touch
        return {d: self.blob_path_str(d) for d in dedupe(digests) if not is_empty(d) and touch(d)}

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        """Hardlink (when read-only and on this file system; else copy) into tmp/, hash what
        was linked, then install it. The hash is of the very inode that becomes the blob."""
        check_blob_size(digest, self._max_blob)
        if is_empty(digest) or await self._present(digest, verify=True):
            return True
        # Hashed before taking the lock: other commits and evictions need not wait for it.
        tmp = await trio.to_thread.run_sync(self._take_verified, digest, os.fspath(path))
        if self._ledger is not None:
            # A hardlinked file keeps its old mtime: the install sets it to now.
            await self._install_or_remove(tmp, digest, None)
            return True
        await self._install_local(tmp, digest)
        return True

    async def _install_local(self, tmp: str | None, digest: Digest, reserved: int = 0) -> None:
        """Install a complete temp file as `digest` under the lock (unshared store), unless the
        blob was stored meanwhile; the temp file is removed if it was not taken. `reserved`
        bytes (the caller's `try_reserve`) are released exactly once."""
        try:
            async with self._mutate:
                # The bytes move from reserved to stored (in _add) without leaving the count.
                self._lru.release(reserved)
                reserved = 0
                if self._lru.touch(digest):
                    return  # stored meanwhile; tmp is removed below
                if self.write_cost.inline() and not self._fsync:
                    self._install(tmp, digest)  # a rename: cheap where small writes are
                else:
                    await trio.to_thread.run_sync(self._install, tmp, digest)
                tmp = None
                await self._add(digest)
        finally:
            if reserved:  # cancelled while waiting for the lock
                self._lru.release(reserved)
            if tmp is not None:
                # Bounded; an unlink the bound abandons finishes in its thread, and a temp
                # file left behind is removed by the next start's scan of tmp/.
                with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                    await trio.to_thread.run_sync(_remove_quietly, tmp, abandon_on_cancel=True)

    def _take_verified(self, digest: Digest, source: str) -> str:
        """A temp file holding `source` (the same inode where possible), proven to match."""
        tmp = str(self._tmp_dir / uuid.uuid4().hex)
        try:
            if os.stat(source).st_mode & 0o7777 != 0o444:
                raise OSError("not read-only: copy")
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o444)
        try:
            if not _file_matches(tmp, digest):
                raise InvalidArgument(
                    f"{source} does not hold {digest.blob_path}: its size or hash differs"
                )
        except BaseException:
            _remove_quietly(tmp)
            raise
        return tmp

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self._lru.pinned(d for d in digests if not is_empty(d))

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        """Remove the blob if its file is this inode (a co-located worker, which hardlinked it,
        found it modified). Returns whether it was removed."""
        async with self._exclusive():
            removed = await trio.to_thread.run_sync(self._unlink_if_inode, digest, st_dev, st_ino)
            if removed:
                self._drop(digest)
                if self._ledger is not None:
                    self._ledger.add_stored(-digest.size)
        return removed

    def _unlink_if_inode(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        path = self.blob_path(digest)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != (st_dev, st_ino):
            return False
        _remove_quietly(path)
        return True

    async def aclose(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def stats(self) -> dict[str, int]:
        if self._ledger is not None:
            # Shared: bytes and evictions of all processes; blobs this process has indexed.
            state = self._ledger.read()
            return {
                "blobs": len(self._lru),
                "bytes": state.stored,
                "max_bytes": self._lru.max_bytes,
                "reserved_bytes": state.reserved_total,
                "evictions": state.evictions,
                "forgotten": self._forgotten,
                "process_slot": self._share.slot if self._share else 0,
            }
        return {
            "blobs": len(self._lru),
            "bytes": self._lru.total_bytes,
            "max_bytes": self._lru.max_bytes,
            "reserved_bytes": self._lru.reserved_bytes,
            "evictions": self._lru.evictions,
            "forgotten": self._forgotten,
        }


class _FileReader:
    def __init__(self, f: object, size: int) -> None:
        self._f = f
        self.size = size

    async def read(self, n: int = READ_CHUNK) -> bytes:
        return await trio.to_thread.run_sync(self._f.read, n)  # type: ignore[attr-defined]


class _FileWriter:
    def __init__(
        self, store: FilesystemStore, digest: Digest, fd: int | None, path: str | None
    ) -> None:
        self._store = store
        self.digest = digest
        self.committed_size = 0
        self._fd: int | None = fd
        self._path: str | None = path
        self._buf = bytearray()
        self._reserved = digest.size  # released exactly once, on commit or abort

    def _release(self) -> None:
        self._store._lru.release(self._reserved)
        self._reserved = 0

    async def write(self, data: bytes) -> None:
        if self._fd is None:
            raise InvalidArgument(f"upload of {self.digest.blob_path} is already finished")
        if self.committed_size + len(data) > self.digest.size:
            raise InvalidArgument(
                f"blob {self.digest.blob_path}: more data than the {self.digest.size} bytes declared"
            )
        self._buf += data
        self.committed_size += len(data)
        if len(self._buf) >= WRITE_BUFFER:
            await self._flush()

    async def _flush(self) -> None:
        buf, self._buf = self._buf, bytearray()
        fd = self._fd
        assert fd is not None
        await trio.to_thread.run_sync(_write_all, fd, buf)

    async def commit(self) -> None:
        if self.committed_size != self.digest.size:
            raise InvalidArgument(
                f"blob {self.digest.blob_path}: got {self.committed_size} bytes, "
                f"the digest says {self.digest.size}"
            )
        await self._flush()
        store = self._store
        if store._ledger is not None:
            await self._commit_shared()
            return
        async with store._mutate:
            # Taken only once the lock is held: a cancellation while waiting for it leaves the
            # fd with the writer, so abort() can still close it and remove the temp file.
            fd, self._fd = self._fd, None
            assert fd is not None
            # The bytes move from reserved to stored (in _add) without leaving the count.
            self._release()
            if store._lru.touch(self.digest):
                await trio.to_thread.run_sync(_close_and_remove, fd, self._path)
                return
            await trio.to_thread.run_sync(self._finish, fd)
            await store._add(self.digest)

    async def _commit_shared(self) -> None:
        store = self._store
        fd, self._fd = self._fd, None
        assert fd is not None and self._path is not None
        try:
            mtime = await trio.to_thread.run_sync(self._seal, fd)
            async with store._exclusive():
                assert store._ledger is not None
                # The bytes move from reserved to stored under one hold of the lock.
                store._ledger.add_reserved(-self._reserved)
                self._release()
                if await store._install_shared(self._path, self.digest, mtime):
                    self._path = None  # it is the blob now
        finally:
            await self._clean_up_shared()

    def _seal(self, fd: int) -> int:
        """Make the temp file read-only (and durable with fsync), close it; its mtime."""
        try:
            self._store._finish_file(fd)
            return os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)

    async def _clean_up_shared(self) -> None:
        """Give back the reservation if still held and remove the temp file unless it became
        the blob. Bounded, shielded: it runs on every way out."""
        if self._reserved:
            size, self._reserved = self._reserved, 0
            await self._store._release_shared(size)
        path, self._path = self._path, None
        if path is not None:
            with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await trio.to_thread.run_sync(_remove_quietly, path, abandon_on_cancel=True)

    def _finish(self, fd: int) -> None:
        assert self._path is not None
        try:
            try:
                self._store._finish_file(fd)
            finally:
                os.close(fd)
            self._store._install(self._path, self.digest)
        except BaseException:
            _remove_quietly(self._path)
            raise

    async def abort(self) -> None:
        fd, self._fd = self._fd, None
        self._buf = bytearray()
        if self._store._ledger is not None:
            if fd is not None:
                os.close(fd)
            await self._clean_up_shared()
            return
        self._release()
        if fd is not None:
            with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await trio.to_thread.run_sync(
                    _close_and_remove, fd, self._path, abandon_on_cancel=True
                )


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _close_and_remove(fd: int, path: str) -> None:
    try:
        os.close(fd)
    finally:
        _remove_quietly(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_matches(path: str, digest: Digest) -> bool:
    h = new_hasher(digest.function)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size == digest.size and h.hexdigest() == digest.hash


def _remove_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _touch_quietly(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _parse_file_name(name: str, function: DigestFunction, shard: str) -> Digest | None:
    """The digest a file named `{hash}-{size}` in `{function}/{shard}/` holds, if it is one
    of ours: the hash must fit the function and the shard, the size must be canonical."""
    hash_hex, sep, size_text = name.partition("-")
    if not sep or not size_text.isascii() or not size_text.isdigit():
        return None
    if function not in SUPPORTED_FUNCTIONS or len(hash_hex) != hex_length(function):
        return None
    if not _LOWER_HEX.fullmatch(hash_hex) or hash_hex[:2] != shard:
        return None
    if str(int(size_text)) != size_text:
        return None
    return Digest(hash_hex, int(size_text), function)
