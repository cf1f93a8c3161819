"""After an action ran, proves the cache files it had hardlinked are still intact.

An action can modify its input files (root ignores the 0444 mode; the same user may chmod);
those are the cache's files, and in `reexecd serve` possibly the CAS store's too. A file whose
size, mode or type changed is broken; a changed mtime alone is not proof (the CAS store touches
blobs that share the inode when it reads them), so such files are hashed again.

A worker thread inspects the files and returns its verdict (a few files whose mtimes did not
move are inspected on the Trio thread: a few lstat calls cost less than the hop); the Trio thread then forgets the
broken entries and removes their files (`CacheIndex.retire`, so nothing can be fetched into
the path while it is removed), and has the CAS drop blobs that were the very same inode.
The inspection is bounded by `timeout_s`: entries it could not prove intact in time are
treated as broken (re-fetched later), never trusted.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.output_adopter import content_matches

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    broken: dict[Entry, tuple[int, int] | None] = field(default_factory=dict)
    """Broken entries, with the (st_dev, st_ino) of the modified file if one exists."""
    new_mtimes: dict[Entry, int] = field(default_factory=dict)
    """Intact entries whose mtime moved (proven by hashing)."""


# Actions with at most this many linked inputs have them inspected on the Trio thread: one
# lstat each (microseconds) costs less than the hop to a worker thread. A file that must be
# hashed again (its mtime moved) sends the whole inspection to the thread.
INLINE_MAX_FILES = 64


def inspect_sync(items: list[tuple[Entry, str, int | None]]) -> Verdict:
    """Judge each (entry, path, recorded mtime); file-system work only (a worker thread)."""
    verdict = _inspect(items, hash_moved=True)
    assert verdict is not None
    return verdict


def inspect_quick(items: list[tuple[Entry, str, int | None]]) -> Verdict | None:
    """`inspect_sync` without hashing, for the Trio thread: None as soon as a file would have to
    be hashed (then `inspect_sync` must judge them in a thread)."""
    return _inspect(items, hash_moved=False)


def _inspect(items: list[tuple[Entry, str, int | None]], *, hash_moved: bool) -> Verdict | None:
    verdict = Verdict()
    for e, path, recorded in items:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            verdict.broken[e] = None
            continue
        moved = recorded is not None and st.st_mtime_ns != recorded
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != e.digest.size
            or st.st_mode & 0o7777 != e.mode
        ):
            verdict.broken[e] = (st.st_dev, st.st_ino)
        elif moved:
            if not hash_moved:
                return None
            if content_matches(path, e.digest):
                verdict.new_mtimes[e] = st.st_mtime_ns
            else:
                verdict.broken[e] = (st.st_dev, st.st_ino)
    return verdict


class TamperChecker:
    def __init__(self, index: CacheIndex, access: CasAccess) -> None:
        self.index = index
        self.access = access
        self.repaired = 0

    async def check(self, entries: Iterable[Entry], timeout_s: float = 60.0) -> list[Entry]:
        """Remove every entry whose file changed; returns those entries."""
        index = self.index
        items = [(e, index.path_str(e), index.recorded_mtime(e)) for e in dict.fromkeys(entries)]
        verdict = inspect_quick(items) if len(items) <= INLINE_MAX_FILES else None
        if verdict is None:
            with trio.move_on_after(timeout_s):
                # Abandoning the thread on timeout is safe: it only reads files.
                verdict = await trio.to_thread.run_sync(inspect_sync, items, abandon_on_cancel=True)
        if verdict is None:
            log.warning(
                "checking %d input file(s) took over %gs: dropping them from the cache",
                len(items),
                timeout_s,
            )
            verdict = Verdict(broken=dict.fromkeys((e for e, _, _ in items), None))
        for e, mtime in verdict.new_mtimes.items():
            index.set_mtime(e, mtime)
        if not verdict.broken:
            return []
        removed = await index.retire(verdict.broken)
        self.repaired += len(verdict.broken)
        # The inode judged broken; where the check gave up, the inode that was removed.
        files = [
            (e.digest, *inode)
            for e, known in verdict.broken.items()
            if (inode := known or removed.get(e)) is not None
        ]
        if files:
            await self.access.discard_modified(files)
        return list(verdict.broken)
