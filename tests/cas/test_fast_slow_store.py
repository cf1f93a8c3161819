"""FastSlowStore: the Store contract, read-through filling and write-through."""

from __future__ import annotations

from pathlib import Path

import pytest

from reexec.cas.digest import Digest, digest_of
from reexec.cas.fast_slow import FastSlowStore
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore, _MemoryWriter
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import Unavailable
from tests.cas.store_contract import StoreContract, blob, read_all, write_chunked


async def fs_store(root: Path, max_bytes: int = 0) -> FilesystemStore:
    store = FilesystemStore(root, max_bytes)
    await store.start()
    return store


class TestMemoryOverFilesystemContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        return FastSlowStore(MemoryStore(0), await fs_store(tmp_path / "slow"))

    async def inspect(self, store: Store, digest: Digest) -> bool:
        assert isinstance(store, FastSlowStore)
        in_fast, in_slow = await store.fast.has(digest), await store.slow.has(digest)
        assert not (in_fast and not in_slow), "fast holds a blob the slow store lacks"
        return in_slow


class TestFilesystemOverMemoryContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        return FastSlowStore(await fs_store(tmp_path / "fast"), MemoryStore(0))


class FlakyStore(MemoryStore):
    """A MemoryStore whose writes fail with UNAVAILABLE while `failing` is set."""

    def __init__(self) -> None:
        super().__init__(0)
        self.failing = False

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        if self.failing:
            raise Unavailable("slow store is down")
        await super().put_bytes(digest, data)

    async def open_write(self, digest: Digest) -> _MemoryWriter:
        store = self

        class Writer(_MemoryWriter):
            async def commit(self) -> None:
                if store.failing:
                    raise Unavailable("slow store is down")
                await super().commit()

        return Writer(self, digest)


@pytest.fixture
async def tiers(tmp_path: Path) -> tuple[FilesystemStore, FilesystemStore, FastSlowStore]:
    fast = await fs_store(tmp_path / "fast")
    slow = await fs_store(tmp_path / "slow")
    return fast, slow, FastSlowStore(fast, slow)


def tmp_empty(store: FilesystemStore) -> bool:
    return not list((store.root / "tmp").iterdir())


async def test_find_missing_consults_both(tiers: tuple) -> None:
    fast, slow, store = tiers
    a, b, c = (digest_of(blob(10, i)) for i in range(3))
    await fast.put_bytes(a, blob(10, 0))
    await slow.put_bytes(b, blob(10, 1))
    assert await store.find_missing([c, a, b, c]) == [c]
    assert await store.find_missing([a]) == []


async def test_read_through_fills_fast(tiers: tuple) -> None:
    fast, slow, store = tiers
    data = blob(3_000_000, 1)
    d = digest_of(data)
    await write_chunked(slow, d, data, chunk=1 << 20)
    assert await read_all(store, d, chunk=1 << 20) == data
    assert await fast.get_bytes(d) == data
    assert tmp_empty(fast)


async def test_read_of_exactly_size_bytes_fills_fast(tiers: tuple) -> None:
    """ByteStream.Read stops once it has sent `size` bytes; it never asks for the final b""."""
    fast, slow, store = tiers
    data = blob(5000, 2)
    d = digest_of(data)
    await slow.put_bytes(d, data)
    got = b""
    async with store.open_read(d) as reader:
        while len(got) < d.size:
            got += await reader.read(d.size - len(got))
    assert got == data
    assert await fast.get_bytes(d) == data


async def test_partial_read_does_not_fill_fast(tiers: tuple) -> None:
    fast, slow, store = tiers
    data = blob(5000, 3)
    d = digest_of(data)
    await slow.put_bytes(d, data)
    async with store.open_read(d) as reader:
        assert await reader.read(1000) == data[:1000]
    assert not await fast.has(d)
    assert not fast.blob_path(d).exists()
    assert tmp_empty(fast)
    # A later full read still works and fills fast with the right bytes.
    assert await read_all(store, d) == data
    assert fast.blob_path(d).read_bytes() == data


async def test_reader_abandoned_by_exception_does_not_fill_fast(tiers: tuple) -> None:
    fast, slow, store = tiers
    data = blob(5000, 4)
    d = digest_of(data)
    await slow.put_bytes(d, data)
    with pytest.raises(ValueError, match="client went away"):
        async with store.open_read(d) as reader:
            await reader.read(4999)
            raise ValueError("client went away")
    assert not await fast.has(d)
    assert tmp_empty(fast)


async def test_exception_in_body_propagates_unchanged(tiers: tuple) -> None:
    """A BlobNotFound raised by the caller's own code must not be taken for a fast-store miss."""
    _fast, slow, store = tiers
    data = blob(100, 5)
    d = digest_of(data)
    other = digest_of(b"something else")
    await store.put_bytes(d, data)  # in both tiers
    with pytest.raises(BlobNotFound) as e:
        async with store.open_read(d):
            raise BlobNotFound(other)
    assert e.value.digest == other
    # Also when the blob is only in the slow store (the tee path).
    d2 = digest_of(blob(100, 6))
    await slow.put_bytes(d2, blob(100, 6))
    with pytest.raises(BlobNotFound) as e:
        async with store.open_read(d2):
            raise BlobNotFound(other)
    assert e.value.digest == other


async def test_offset_read_on_fast_miss(tiers: tuple) -> None:
    fast, slow, store = tiers
    data = blob(10_000, 7)
    d = digest_of(data)
    await slow.put_bytes(d, data)
    assert await read_all(store, d, offset=4321) == data[4321:]
    assert await fast.get_bytes(d) == data
    assert await read_all(store, d, offset=10_000) == b""


async def test_offset_read_of_blob_larger_than_fast(tmp_path: Path) -> None:
    fast = MemoryStore(max_bytes=1000)
    slow = await fs_store(tmp_path / "slow")
    store = FastSlowStore(fast, slow)
    data = blob(5000, 8)
    d = digest_of(data)
    await slow.put_bytes(d, data)
    assert await read_all(store, d, offset=100) == data[100:]
    assert await read_all(store, d) == data
    assert await store.get_bytes(d) == data


async def test_get_bytes_fills_fast(tiers: tuple) -> None:
    fast, slow, store = tiers
    data = blob(300, 9)
    d = digest_of(data)
    await slow.put_bytes(d, data)
    assert await store.get_bytes(d) == data
    assert await fast.get_bytes(d) == data
    with pytest.raises(BlobNotFound):
        await store.get_bytes(digest_of(b"nowhere"))


async def test_writes_go_to_both(tiers: tuple) -> None:
    fast, slow, store = tiers
    a, b = blob(100, 10), blob(2_000_000, 11)
    da, db = digest_of(a), digest_of(b)
    await store.put_bytes(da, a)
    await write_chunked(store, db, b, chunk=300_000)
    for tier in (fast, slow):
        assert await tier.get_bytes(da) == a
        assert await tier.get_bytes(db) == b
        assert tmp_empty(tier)


async def test_slow_failure_leaves_nothing_in_fast(tmp_path: Path) -> None:
    fast = await fs_store(tmp_path / "fast")
    slow = FlakyStore()
    store = FastSlowStore(fast, slow)
    slow.failing = True
    a, b = blob(100, 12), blob(100_000, 13)
    da, db = digest_of(a), digest_of(b)
    with pytest.raises(Unavailable):
        await store.put_bytes(da, a)
    with pytest.raises(Unavailable):
        await write_chunked(store, db, b)
    for d in (da, db):
        assert not await fast.has(d)
        assert not await slow.has(d)
        assert not fast.blob_path(d).exists()
    assert tmp_empty(fast)
    # Once the slow store recovers, the same writes succeed everywhere.
    slow.failing = False
    await store.put_bytes(da, a)
    await write_chunked(store, db, b)
    assert await fast.find_missing([da, db]) == []
    assert await slow.find_missing([da, db]) == []


async def test_slow_failure_leaves_nothing_in_memory_fast() -> None:
    fast = MemoryStore(0)
    slow = FlakyStore()
    slow.failing = True
    store = FastSlowStore(fast, slow)
    data = blob(100, 14)
    d = digest_of(data)
    with pytest.raises(Unavailable):
        await store.put_bytes(d, data)
    assert not await fast.has(d)
