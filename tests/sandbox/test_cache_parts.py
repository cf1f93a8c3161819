"""The worker cache's parts, each on a temp dir: CacheIndex, InputFetcher, OutputAdopter,
TamperChecker, and the rule they share: the index changes only on the Trio thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from reexec.cas.digest import Digest, digest_of
from reexec.cas.lru import LruIndex
from reexec.cas.store import BlobNotFound
from reexec.sandbox import cache_index, tamper_checker
from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.input_fetcher import InputFetcher, MissingInputs
from reexec.sandbox.local_cas import LocalCas
from reexec.sandbox.output_adopter import OutputAdopter
from reexec.sandbox.tamper_checker import TamperChecker
from tests.sandbox.fakes import FakeAccess, append, inode, overwrite


async def open_index(root: Path, max_bytes: int = 0) -> CacheIndex:
    index = CacheIndex(root, max_bytes)
    await index.start()
    return index


# -- the rule: index changes on the Trio thread only ----------------------------------------------


def _on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


class _GuardedDict(dict):  # type: ignore[type-arg]
    def __setitem__(self, key: Any, value: Any) -> None:
        assert _on_trio_thread(), "index changed from a worker thread"
        super().__setitem__(key, value)

    def pop(self, *args: Any) -> Any:
        assert _on_trio_thread(), "index changed from a worker thread"
        return super().pop(*args)

    def __delitem__(self, key: Any) -> None:
        assert _on_trio_thread(), "index changed from a worker thread"
        super().__delitem__(key)


class _GuardedLru(LruIndex):  # type: ignore[type-arg]
    def add(self, key: Any, size: int) -> bool:
        assert _on_trio_thread(), "index changed from a worker thread"
        return super().add(key, size)

    def remove(self, key: Any) -> int | None:
        assert _on_trio_thread(), "index changed from a worker thread"
        return super().remove(key)

    def take_evictions(self, incoming: int = 0) -> list[Any]:
        assert _on_trio_thread(), "index changed from a worker thread"
        return super().take_evictions(incoming)


@contextmanager
def guarded(index: CacheIndex) -> Iterator[None]:
    lru = _GuardedLru(index._lru.max_bytes)
    for key in index._lru.keys_oldest_first():
        lru.add(key, index._lru.size_of(key) or 0)
    index._lru = lru
    index._mtimes = _GuardedDict(index._mtimes)
    index._busy = _GuardedDict(index._busy)
    yield


async def test_every_index_change_is_on_the_trio_thread(tmp_path: Path) -> None:
    """Fetch (each path), adopt, evict and repair with guards that fail off the Trio thread."""
    for batched in (False, True):
        access = FakeAccess(prefers_batches=batched)
        cache = LocalCas(tmp_path / f"cache-{batched}", 60, access)
        await cache.start()
        with guarded(cache.index):
            es = [Entry(access.put(bytes([65 + i]) * 10), False) for i in range(8)]
            await cache.ensure(es[:4])
            await cache.ensure(es[4:])  # evicts
            out = tmp_path / f"out-{batched}"
            out.write_bytes(b"output")
            adopted = await trio.to_thread.run_sync(
                cache.adopter.adopt_sync, out, Entry(digest_of(b"output"), False)
            )
            await cache.adopter.register([adopted])
            append(cache.path(es[-1]), b"!")
            assert await cache.tamper.check(es[4:]) == [es[-1]]


# -- CacheIndex ---------------------------------------------------------------------------------


async def test_retire_forgets_first_and_a_waiting_fetch_installs_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tamper check used to unlink from a worker thread while the index still listed the
    file; now the index forgets it first and the path is busy until the unlink is done."""
    unlinking = threading.Event()
    go = threading.Event()
    real_unlink_all = cache_index._unlink_all

    def slow_unlink_all(paths: list) -> dict:  # type: ignore[type-arg]
        unlinking.set()
        go.wait(10)
        return real_unlink_all(paths)

    monkeypatch.setattr(cache_index, "_unlink_all", slow_unlink_all)
    access = FakeAccess()
    index = await open_index(tmp_path / "cache")
    fetcher = InputFetcher(index, access)
    e = Entry(access.put(b"content"), False)
    await fetcher.ensure([e])
    first = inode(index.path(e))
    removed = {}
    async with trio.open_nursery() as nursery:

        async def retire() -> None:
            removed.update(await index.retire([e]))

        nursery.start_soon(retire)
        await trio.to_thread.run_sync(unlinking.wait)
        assert not index.has(e)  # forgotten before its file is touched
        assert index.busy(e) is not None
        nursery.start_soon(fetcher.ensure, [e])
        await trio.testing.wait_all_tasks_blocked()
        assert access.fetches[e.digest] == 1  # the fetch waits for the unlink
        go.set()
    assert removed == {e: first}
    assert index.has(e) and index.path(e).read_bytes() == b"content"
    assert access.fetches[e.digest] == 2


async def test_eviction_spares_leases_and_records_mtimes(tmp_path: Path) -> None:
    access = FakeAccess()
    index = await open_index(tmp_path / "cache", max_bytes=20)
    fetcher = InputFetcher(index, access)
    a, b, c = (Entry(access.put(bytes([65 + i]) * 10), False) for i in range(3))
    await fetcher.ensure([a, b])
    assert index.recorded_mtime(a) == os.stat(index.path(a)).st_mtime_ns
    with index.lease([a]):
        await fetcher.ensure([c])
    assert index.has(a) and index.has(c) and not index.path(b).exists()
    assert index.recorded_mtime(b) is None


# -- InputFetcher -------------------------------------------------------------------------------


async def test_batch_read_finding_a_blob_gone_falls_back_and_reports_it(tmp_path: Path) -> None:
    class Evicting(FakeAccess):
        async def read_small(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
            self.blobs.pop(gone, None)  # evicted between FindMissingBlobs and the read
            return await super().read_small(digests)

    access = Evicting(prefers_batches=True)
    here = access.put(b"here")
    gone = access.put(b"gone")
    index = await open_index(tmp_path / "cache")
    with pytest.raises(MissingInputs) as info:
        await InputFetcher(index, access).ensure([Entry(here, False), Entry(gone, False)])
    assert info.value.missing == [gone]
    assert index.has(Entry(here, False))
    assert list(index.tmp.iterdir()) == []


# -- OutputAdopter ------------------------------------------------------------------------------


async def test_adopter_replaces_a_tampered_entry_and_keeps_an_identical_one(
    tmp_path: Path,
) -> None:
    """Issue 9 item 8: an existing cache file used to be reused as the upload source unchecked."""
    access = FakeAccess()
    index = await open_index(tmp_path / "cache")
    e = Entry(access.put(b"the output"), False)
    await InputFetcher(index, access).ensure([e])
    adopter = OutputAdopter(index)
    kept = inode(index.path(e))

    out = tmp_path / "out"
    out.write_bytes(b"the output")
    adopted = adopter.adopt_sync(out, e)
    assert inode(index.path(e)) == kept and not out.exists()  # proven identical: kept

    overwrite(index.path(e), b"THE OUTPUT")  # an action rewrote the cached copy
    out.write_bytes(b"the output")
    fresh = inode(out)
    adopted = adopter.adopt_sync(out, e)
    assert inode(index.path(e)) == fresh
    assert index.path(e).read_bytes() == b"the output"
    await adopter.register([adopted])
    assert index.recorded_mtime(e) == adopted.mtime_ns


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
    t0 = time.monotonic()
    broken = await TamperChecker(index, access).check(es, timeout_s=0.2)
    release.set()
    assert time.monotonic() - t0 < 2
    assert sorted(broken) == sorted(es)  # nothing proven intact is trusted
    assert not any(index.has(e) or index.path(e).exists() for e in es)


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
