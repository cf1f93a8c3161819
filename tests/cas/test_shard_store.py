"""ShardStore: the Store contract, blobs spread by weight, a failed shard's blobs are missing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from reexec.cas.digest import Digest, digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.shard import ShardStore
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import Unavailable
from tests.cas.store_contract import StoreContract, blob, read_all


class TestShardStoreContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        fs = FilesystemStore(tmp_path / "fs", 1 << 30)
        await fs.start()
        return ShardStore([("m1", 1, MemoryStore(0)), ("m2", 2, MemoryStore(0)), ("fs", 1, fs)])


class Down(MemoryStore):
    """A shard that went away: every call fails like a lost connection."""

    down = False

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return await super().find_missing(digests)

    async def get_bytes(self, digest: Digest) -> bytes:
        if self.down:
            raise Unavailable("shard down")
        return await super().get_bytes(digest)

    async def open_write(self, digest: Digest):  # type: ignore[no-untyped-def]
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return await super().open_write(digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        await super().put_bytes(digest, data)


async def test_blobs_spread_by_weight_and_each_lives_in_one_shard() -> None:
    a, b = MemoryStore(0), MemoryStore(0)
    store = ShardStore([("a", 1, a), ("b", 3, b)])
    digests = []
    for i in range(400):
        data = blob(50, i)
        d = digest_of(data)
        digests.append(d)
        await store.put_bytes(d, data)
    in_a = [d for d in digests if await a.has(d)]
    in_b = [d for d in digests if await b.has(d)]
    assert len(in_a) + len(in_b) == 400 and not set(in_a) & set(in_b)
    assert 60 < len(in_a) < 140  # about a quarter
    assert await store.find_missing(digests) == []


async def test_a_failed_shard_makes_its_blobs_missing_and_writes_go_to_the_next() -> None:
    up, down = MemoryStore(0), Down(0)
    store = ShardStore([("up", 1, up), ("down", 1, down)], retry_after_s=0.3)
    digests = []
    for i in range(40):
        data = blob(80, i)
        d = digest_of(data)
        digests.append(d)
        await store.put_bytes(d, data)
    on_down = [d for d in digests if store.shard_of(d) == 1]
    assert on_down and not await down.find_missing(on_down)
    down.down = True
    # Missing, never an error: clients upload them again.
    assert await store.find_missing(digests) == on_down
    assert store.stats()["shards_down"] == 1
    with pytest.raises(BlobNotFound):
        await store.get_bytes(on_down[0])
    # The upload lands on the next shard and is served from there while "down" is down.
    lost = on_down[0]
    data = blob(80, digests.index(lost))
    await store.put_bytes(lost, data)
    assert await up.has(lost) and await store.get_bytes(lost) == data
    assert await read_all(store, lost) == data
    assert lost not in await store.find_missing(digests)
    # Back up: blobs are looked up on their owner again.
    down.down = False
    await trio.sleep(0.35)
    assert await store.find_missing(digests) == []
    assert store.stats()["shards_down"] == 0 and store.stats()["shard_failures"] >= 1


async def test_every_shard_down() -> None:
    a, b = Down(0), Down(0)
    store = ShardStore([("a", 1, a), ("b", 1, b)])
    d = digest_of(b"x")
    await store.put_bytes(d, b"x")
    a.down = b.down = True
    assert await store.find_missing([d]) == [d]
    with pytest.raises(BlobNotFound):
        await store.get_bytes(d)
    with pytest.raises(Unavailable):
        await store.put_bytes(digest_of(b"y"), b"y")


async def test_limit_is_the_smallest_shard_limit() -> None:
    store = ShardStore([("a", 1, MemoryStore(1000, max_blob_bytes=500)), ("b", 1, MemoryStore(0))])
    assert store.max_blob_bytes() == 500
