"""TamperChecker: proving inputs intact after an action, in bounded time."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from reexec.cas.digest import Digest
from reexec.cas.store import BlobNotFound
from reexec.sandbox import tamper_checker
from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.input_fetcher import InputFetcher
from reexec.sandbox.tamper_checker import TamperChecker
from tests.sandbox.fakes import FakeAccess, append, inode


async def open_index(root: Path, max_bytes: int = 0) -> CacheIndex:
    index = CacheIndex(root, max_bytes)
    await index.start()
    return index


# -- TamperChecker ------------------------------------------------------------------------------


async def test_tamper_check_gives_up_in_bounded_time_and_distrusts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = FakeAccess()
    index = await open_index(tmp_path / "cache")
    es = [Entry(access.put(f"file {i}".encode()), False) for i in range(3)]
    await InputFetcher(index, access).ensure(es)
    release = threading.Event()
    real = tamper_checker.inspect_sync

    def stuck(items: list) -> tamper_checker.Verdict:  # type: ignore[type-arg]
        release.wait(10)  # e.g. hashing a huge input on a slow disk
        return real(items)

    monkeypatch.setattr(tamper_checker, "inspect_sync", stuck)
    monkeypatch.setattr(tamper_checker, "INLINE_MAX_FILES", 0)  # the thread, not the fast path
    t0 = time.monotonic()
    broken = await TamperChecker(index, access).check(es, timeout_s=0.2)
    release.set()
    assert time.monotonic() - t0 < 2
    assert sorted(broken) == sorted(es)  # nothing proven intact is trusted
    assert not any(index.has(e) or index.path(e).exists() for e in es)


@pytest.mark.parametrize("inline_max", [0, tamper_checker.INLINE_MAX_FILES])
async def test_same_verdicts_on_the_trio_thread_and_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max: int
) -> None:
    """Few inputs are inspected without the thread hop; the verdicts are the same, and a file
    whose mtime moved is still hashed (in the thread) before it is trusted or dropped."""
    monkeypatch.setattr(tamper_checker, "INLINE_MAX_FILES", inline_max)
    hops = 0
    real = tamper_checker.inspect_sync

    def counted(items: list) -> tamper_checker.Verdict:  # type: ignore[type-arg]
        nonlocal hops
        hops += 1
        return real(items)

    monkeypatch.setattr(tamper_checker, "inspect_sync", counted)
    access = FakeAccess()
    index = await open_index(tmp_path / "cache")
    es = [Entry(access.put(f"file {i}".encode()), False) for i in range(5)]
    await InputFetcher(index, access).ensure(es)
    intact, grown, chmodded, removed, touched = es
    append(index.path(grown), b"!")
    index.path(chmodded).chmod(0o644)
    index.path(removed).unlink()
    checker = TamperChecker(index, access)
    assert sorted(await checker.check(es)) == sorted([grown, chmodded, removed])
    assert hops == (1 if inline_max == 0 else 0)
    assert index.has(intact) and index.has(touched)

    # A moved mtime with the same content: hashed (so in the thread), then trusted.
    st = index.path(touched).stat()
    os.utime(index.path(touched), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert await checker.check([intact, touched]) == []
    assert hops == (2 if inline_max == 0 else 1)
    # Once recorded, the new mtime needs no hashing: back on the fast path.
    assert await checker.check([intact, touched]) == []
    assert hops == (3 if inline_max == 0 else 1)


async def test_tamper_check_reports_inodes_to_the_cas(tmp_path: Path) -> None:
    class Recording(FakeAccess):
        discarded: list[tuple[Digest, int, int]] = []

        async def discard_modified(self, files: Sequence[tuple[Digest, int, int]]) -> None:
            self.discarded.extend(files)

    access = Recording()
    index = await open_index(tmp_path / "cache")
    good, bad = Entry(access.put(b"good"), False), Entry(access.put(b"bad"), False)
    await InputFetcher(index, access).ensure([good, bad])
    ino = inode(index.path(bad))
    append(index.path(bad), b"!")
    checker = TamperChecker(index, access)
    assert await checker.check([good, bad]) == [bad]
    assert access.discarded == [(bad.digest, *ino)]
    assert checker.repaired == 1
    with pytest.raises(BlobNotFound):  # gone from the cache, fetched again on demand
        await InputFetcher(index, FakeAccess()).ensure([bad])
