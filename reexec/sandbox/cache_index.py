"""The worker cache's index: which entries are on disk, their mtimes, leases and busy files.

Layout under `root`:
    files/{function}/{hash[:2]}/{hash}-{size}{-x}    0444, or 0555 with the -x suffix
    tmp/                                             downloads and copies in progress
Executable and non-executable copies of the same content are separate entries, because
hardlinks share their inode's mode.

The index is changed only on the Trio thread. Worker threads (fetching, adopting, checking)
do file-system work and return what they did; their caller records it here. An entry is
"busy" while one task writes or removes its file: others wait for it instead of touching the
same path, so a removal can never delete a file another task just installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import trio

from reexec.cas.digest import Digest, DigestFunction
from reexec.cas.lru import LruIndex

log = logging.getLogger(__name__)


class Entry(NamedTuple):
    digest: Digest
    executable: bool

    @property
    def mode(self) -> int:
        return 0o555 if self.executable else 0o444


@dataclass(frozen=True)
class Installed:
    """A file a worker thread put in place, to be recorded by the Trio thread."""

    entry: Entry
    mtime_ns: int


class CacheIndex:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self._files_str = str(self.files)
        self.tmp = self.root / "tmp"
        self._lru: LruIndex[Entry] = LruIndex(max_bytes)
        self._mtimes: dict[Entry, int] = {}  # mtime at insertion, for tamper checks
        self._busy: dict[Entry, trio.Event] = {}

    async def start(self) -> None:
        """Rebuild the index from the files on disk (removing corrupt ones and tmp/)."""
        found = await trio.to_thread.run_sync(self._scan)
        for mtime, entry in found:
            self.add(Installed(entry, mtime))
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
                    if (
                        entry is None
                        or st.st_size != entry.digest.size
                        or st.st_mode & 0o7777 != entry.mode
                    ):
                        os.unlink(f.path)
                        continue
                    found.append((st.st_mtime_ns, entry))
        found.sort(key=lambda e: e[0])
        return found

    # -- paths (safe from any thread) -------------------------------------------------------------

    def path(self, entry: Entry) -> Path:
        return Path(self.path_str(entry))

    def path_str(self, entry: Entry) -> str:
        """The entry's file as a string: the input root builder calls this once per input file,
        and string formatting is several times cheaper than pathlib joins there."""
        d = entry.digest
        suffix = "-x" if entry.executable else ""
        return f"{self._files_str}/{d.function.name.lower()}/{d.hash[:2]}/{d.hash}-{d.size}{suffix}"

    def tmp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def install_sync(self, tmp: Path, entry: Entry) -> Installed:
        """Give `tmp` the entry's mode and rename it into place (worker thread; no index change)."""
        st = os.stat(tmp)
        if st.st_nlink > 1 and st.st_mode & 0o7777 != entry.mode:
            # A hardlink to someone else's file (the CAS store's blob): chmod would change
            # their copy too, and the mode of other entries sharing it. Copy this one.
            copy = self.tmp_path()
            shutil.copyfile(tmp, copy)
            os.unlink(tmp)
            tmp = copy
        os.chmod(tmp, entry.mode)
        final = self.path(entry)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        return Installed(entry, os.stat(final).st_mtime_ns)

    # -- reading the index (threads may read, never write) ------------------------------------

    def has(self, entry: Entry) -> bool:
        """Whether the entry is present; marks it most recently used."""
        return self._lru.touch(entry)

    def recorded_mtime(self, entry: Entry) -> int | None:
        return self._mtimes.get(entry)

    def busy(self, entry: Entry) -> trio.Event | None:
        """Set when the task writing or removing the entry's file is done; None if nobody is."""
        return self._busy.get(entry)

    # -- changes (Trio thread only) -----------------------------------------------------------

    def lease(self, entries: Iterable[Entry]) -> AbstractContextManager[None]:
        """Keep `entries` from eviction while an action uses them."""
        return self._lru.pinned(entries)

    def claim(self, entries: Iterable[Entry]) -> dict[Entry, trio.Event]:
        """Mark entries busy (the caller writes or removes their files); `release` after."""
        claims = {e: trio.Event() for e in entries if e not in self._busy}
        self._busy.update(claims)
        return claims

    def release(self, claims: dict[Entry, trio.Event]) -> None:
        for e, event in claims.items():
            del self._busy[e]
            event.set()

    def add(self, installed: Installed) -> None:
        """Record a file now in place (or its new mtime, if the entry was already present)."""
        self._lru.add(installed.entry, installed.entry.digest.size)
        self._mtimes[installed.entry] = installed.mtime_ns

    def set_mtime(self, entry: Entry, mtime_ns: int) -> None:
        """A check proved the file intact under a new mtime (the CAS touched a shared inode)."""
        if entry in self._mtimes:
            self._mtimes[entry] = mtime_ns

    async def evict(self) -> None:
        """Drop least recently used unleased entries beyond `max_bytes`."""
        victims = self._lru.take_evictions()
        if victims:
            await self.retire(victims)

    async def retire(self, entries: Iterable[Entry]) -> dict[Entry, tuple[int, int]]:
        """Remove entries from the index, then their files; returns the (st_dev, st_ino) of
        every file removed.

        The index forgets them first, in the same Trio step as the claim, so no task can see
        an entry absent-but-not-busy and install a fresh file that the unlink would remove.
        Files busy with another task are left to it (it is replacing them).
        """
        entries = list(dict.fromkeys(entries))
        for e in entries:
            self._lru.remove(e)
            self._mtimes.pop(e, None)
        claims = self.claim(entries)
        try:
            paths = [(e, self.path_str(e)) for e in claims]
            return await trio.to_thread.run_sync(_unlink_all, paths)
        finally:
            self.release(claims)

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "files": len(self._lru),
            "bytes": self._lru.total_bytes,
            "max_bytes": self._lru.max_bytes,
            "evictions": self._lru.evictions,
        }


def _parse(name: str, function: DigestFunction) -> Entry | None:
    parts = name.split("-")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        return None
    if len(parts) == 3 and parts[2] != "x":
        return None
    return Entry(Digest(parts[0], int(parts[1]), function), len(parts) == 3)


def _unlink_all(paths: list[tuple[Entry, str]]) -> dict[Entry, tuple[int, int]]:
    removed = {}
    for e, path in paths:
        try:
            st = os.lstat(path)
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed[e] = (st.st_dev, st.st_ino)
    return removed


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
