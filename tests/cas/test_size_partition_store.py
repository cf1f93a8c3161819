"""SizePartitionStore: the Store contract; small blobs in one store, large in the other."""

from __future__ import annotations

from pathlib import Path

from reexec.cas.digest import digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.size_partition import SizePartitionStore
from reexec.cas.store import Store
from tests.cas.store_contract import StoreContract, blob


class TestSizePartitionStoreContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        fs = FilesystemStore(tmp_path / "fs", 1 << 30)
        await fs.start()
        return SizePartitionStore(4096, MemoryStore(0), fs)


async def test_small_and_large_go_to_their_stores(tmp_path: Path) -> None:
    small, large = MemoryStore(0), MemoryStore(0)
    store = SizePartitionStore(100, small, large)
    s, big = blob(100, 1), blob(101, 2)
    ds, dl = digest_of(s), digest_of(big)
    await store.put_bytes(ds, s)
    await store.put_bytes(dl, big)
    assert await small.has(ds) and not await large.has(ds)
    assert await large.has(dl) and not await small.has(dl)
    assert await store.find_missing([dl, ds]) == []
    assert await store.get_bytes(dl) == big
