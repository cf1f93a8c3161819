"""CacheIndex: the worker cache's index, and the rule every part of the cache keeps: the index
changes only on the Trio thread (worker threads do file-system work and return results)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from reexec.cas.digest import digest_of
from reexec.cas.lru import LruIndex
from reexec.sandbox import cache_index
from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.input_fetcher import InputFetcher
from reexec.sandbox.local_cas import LocalCas
from tests.sandbox.fakes import FakeAccess, append, inode


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
