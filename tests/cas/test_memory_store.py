"""MemoryStore: the Store contract plus LRU eviction."""

from __future__ import annotations

from pathlib import Path

from reexec.cas.digest import digest_of
from reexec.cas.memory import MemoryStore
from reexec.cas.store import Store
from tests.cas.store_contract import StoreContract, blob, read_all


class TestMemoryStoreContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        return MemoryStore(max_bytes=0)


async def test_eviction_in_lru_order() -> None:
    store = MemoryStore(max_bytes=300)
    ds = [digest_of(blob(100, i)) for i in range(4)]
    for i, d in enumerate(ds[:3]):
        await store.put_bytes(d, blob(100, i))
    assert await store.find_missing([ds[0]]) == []  # touches ds[0]: ds[1] is now oldest
    await store.put_bytes(ds[3], blob(100, 3))
    assert await store.find_missing(ds) == [ds[1]]
    await store.get_bytes(ds[2])  # ds[0] is oldest now
    await store.put_bytes(ds[1], blob(100, 1))
    assert await store.find_missing(ds) == [ds[0]]
    stats = store.stats()
    assert stats == {
        "blobs": 3,
        "bytes": 300,
        "max_bytes": 300,
        "reserved_bytes": 0,
        "evictions": 2,
    }


async def test_streaming_write_counts_towards_eviction() -> None:
    store = MemoryStore(max_bytes=250)
    a, b, c = (digest_of(blob(100, i)) for i in range(3))
    for i, d in enumerate((a, b)):
        await store.put_bytes(d, blob(100, i))
    writer = await store.open_write(c)
    await writer.write(blob(100, 2))
    await writer.commit()
    assert await store.find_missing([a, b, c]) == [a]


async def test_blob_being_read_is_not_evicted() -> None:
    store = MemoryStore(max_bytes=250)
    a, b, c = (digest_of(blob(100, i)) for i in range(3))
    await store.put_bytes(a, blob(100, 0))
    async with store.open_read(a) as reader:
        first = await reader.read(10)
        await store.put_bytes(b, blob(100, 1))
        await store.put_bytes(c, blob(100, 2))  # over budget: a is oldest but pinned
        assert await store.has(a)
        rest = await reader.read(1000)
    assert first + rest == blob(100, 0)
    assert await store.find_missing([a, b, c]) == [b]
    # Unpinned now: the next insertion may evict it.
    await store.put_bytes(b, blob(100, 1))
    assert await store.find_missing([a, b, c]) == [a]
    assert await read_all(store, c) == blob(100, 2)
