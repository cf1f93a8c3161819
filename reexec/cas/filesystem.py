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
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
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


class FilesystemStore(Store):
    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = False,
        max_blob_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self._blobs_dir = self.root / "blobs"
        self._blobs_str = str(self._blobs_dir)
        self._tmp_dir = self.root / "tmp"
        self._fsync = fsync
        self._lru: LruIndex[Digest] = LruIndex(max_bytes)
        # A blob may take at most this much (never more than the whole store).
        limits = [n for n in (max_blob_bytes, max_bytes) if n is not None and n > 0]
        self._max_blob = min(limits) if limits else None
        # Renames into blobs/ and unlinks of evicted blobs are serialised so an eviction's
        # unlink can never remove a file that a concurrent upload just renamed into place.
        self._mutate = trio.Lock()
        self._started = False
        # Blobs dropped from the index other than by eviction (file vanished, discarded):
        # with the LRU's eviction count, lets callers tell that no blob has left since.
        self._forgotten = 0

    # -- start-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directories and rebuild the index from the file names on disk."""
        entries = await trio.to_thread.run_sync(self._scan)
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
                    st = f.stat(follow_symlinks=False)
                    if digest is None or st.st_size != digest.size:
                        log.warning("removing corrupt or foreign file %s", f.path)
                        _remove_quietly(f.path)
                        continue
                    found.append((st.st_mtime_ns, digest))
        found.sort(key=lambda e: e[0])
        return found

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
        touch = self._lru.touch
        return [d for d in dedupe(digests) if not is_empty(d) and not touch(d)]

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        check_offset(digest, offset)
        if is_empty(digest):
            yield BytesReader(b"")
            return
        if not self._lru.touch(digest):
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
        if not self._lru.touch(digest):
            raise BlobNotFound(digest)
        if digest.size <= INLINE_IO_LIMIT:
            # No suspension point: nothing can evict it meanwhile, no pin needed.
            return self._read_whole(digest, inline=True)
        self._lru.pin(digest)
        try:
            return await trio.to_thread.run_sync(self._read_whole, digest)
        finally:
            self._lru.unpin(digest)

    def _read_whole(self, digest: Digest, inline: bool = False) -> bytes:
        path = self.blob_path(digest)
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
        if self._lru.remove(digest) is not None:
            self._forgotten += 1

    async def open_write(self, digest: Digest) -> _FileWriter:
        check_blob_size(digest, self._max_blob)
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

    def _create_temp(self) -> tuple[int, str]:
        path = str(self._tmp_dir / uuid.uuid4().hex)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return fd, path

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        check_blob_size(digest, self._max_blob)
        if len(data) != digest.size:
            raise InvalidArgument(
                f"blob {digest.blob_path}: got {len(data)} bytes, the digest says {digest.size}"
            )
        if is_empty(digest) or self._lru.touch(digest):
            return
        async with self._mutate:
            if digest.size <= INLINE_IO_LIMIT:
                self._write_whole(digest, data)
            else:
                await trio.to_thread.run_sync(self._write_whole, digest, data)
            await self._add(digest)

    def _write_whole(self, digest: Digest, data: bytes) -> None:
        fd, tmp = self._create_temp()
        try:
            try:
                # A raw write may be short (a nearly full disk): write until all is written,
                # so the next write raises ENOSPC instead of installing a truncated blob.
                _write_all(fd, data)
                if os.fstat(fd).st_size != digest.size:
                    raise OSError(errno.EIO, f"{digest.blob_path}: wrote a short file")
                self._finish_file(fd)
            finally:
                os.close(fd)
            self._install(tmp, digest)
        except BaseException:
            _remove_quietly(tmp)
            raise

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
        touch = self._lru.touch
        return {d: self.blob_path_str(d) for d in dedupe(digests) if not is_empty(d) and touch(d)}

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        """Hardlink (when read-only and on this file system; else copy) into tmp/, hash what
        was linked, then install it. The hash is of the very inode that becomes the blob."""
        check_blob_size(digest, self._max_blob)
        if is_empty(digest) or self._lru.touch(digest):
            return True
        # Hashed before taking the lock: other commits and evictions need not wait for it.
        tmp = await trio.to_thread.run_sync(self._take_verified, digest, os.fspath(path))
        try:
            async with self._mutate:
                if self._lru.touch(digest):
                    return True  # stored meanwhile; tmp is removed below
                await trio.to_thread.run_sync(self._install, tmp, digest)
                tmp = None
                await self._add(digest)
        finally:
            if tmp is not None:
                # Bounded; an unlink the bound abandons finishes in its thread, and a temp
                # file left behind is removed by the next start's scan of tmp/.
                with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                    await trio.to_thread.run_sync(_remove_quietly, tmp, abandon_on_cancel=True)
        return True

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
        async with self._mutate:
            removed = await trio.to_thread.run_sync(self._unlink_if_inode, digest, st_dev, st_ino)
            if removed:
                self._drop(digest)
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

    def stats(self) -> dict[str, int]:
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
    def __init__(self, store: FilesystemStore, digest: Digest, fd: int, path: str) -> None:
        self._store = store
        self.digest = digest
        self.committed_size = 0
        self._fd: int | None = fd
        self._path = path
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

    def _finish(self, fd: int) -> None:
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
