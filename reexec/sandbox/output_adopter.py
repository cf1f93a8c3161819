"""Moves an action's hashed output files into the worker cache (rename, never copy).

`adopt_sync` runs in the output collector's worker thread and only touches the file system;
`register` records the result on the Trio thread. An entry already in the cache is kept only if
its file is proven to hold the same bytes (hashed again); otherwise the fresh, just-hashed file
replaces it, so a cache file an action tampered with never becomes an upload source.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from reexec.cas.digest import Digest, new_hasher
from reexec.sandbox.cache_index import CacheIndex, Entry, Installed, unlink_quietly

_CHUNK = 1 << 20


class OutputAdopter:
    def __init__(self, index: CacheIndex) -> None:
        self.index = index

    def adopt_sync(self, src: Path, entry: Entry) -> Installed:
        """Move `src` (hashed as `entry.digest`) into the cache; worker thread only."""
        final = self.index.path(entry)
        kept = self._existing_if_identical(final, entry)
        if kept is not None:
            unlink_quietly(src)
            return Installed(entry, kept)
        if os.lstat(src).st_uid != os.geteuid():
            # Written by an action running as another user: as owner it could still chmod
            # and rewrite the cache entry (and a CAS blob linked to it) later.
            os.chown(src, os.geteuid(), os.getegid(), follow_symlinks=False)
        os.chmod(src, entry.mode)
        try:
            os.rename(src, final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # Another file system: copy beside the cache, then rename into place.
            tmp = self.index.tmp_path()
            shutil.copyfile(src, tmp)
            os.chmod(tmp, entry.mode)
            os.rename(tmp, final)
            unlink_quietly(src)
        return Installed(entry, os.stat(final).st_mtime_ns)

    @staticmethod
    def _existing_if_identical(final: Path, entry: Entry) -> int | None:
        """The mtime of the entry's existing file if it holds exactly `entry`, else None."""
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return None
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != entry.digest.size
            or st.st_mode & 0o7777 != entry.mode
            or not content_matches(final, entry.digest)
        ):
            return None
        return st.st_mtime_ns

    async def register(self, adopted: Sequence[Installed]) -> None:
        """Record adopted files in the index (Trio thread), then evict what no longer fits.

        Callers lease the entries first when they are about to read them (upload)."""
        for item in adopted:
            self.index.add(item)
        await self.index.evict()


def content_matches(path: str | os.PathLike[str], digest: Digest) -> bool:
    h = new_hasher(digest.function)
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == digest.hash
